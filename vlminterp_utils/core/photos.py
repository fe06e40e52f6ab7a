"""Real photos as chapter items: any `datasets.Dataset` with an image and labelled objects (masks or boxes).

Neo et al. work on COCO, where every object has a label and a segmentation. This module turns such rows into the
same `Example`s the shapes world makes, so chapter 1's ablations and knockouts and chapter 2's judge run on real
photos unchanged: every object becomes a `PhotoObject` with a pixel mask (from its mask, or filled from its box),
and every question is about one object, which the example carries as its target.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import Example, Scene

POLLING_QUESTION = "Is there a {label} in the image?"


@dataclass
class PhotoObject:
    """One labelled object of a photo."""

    label: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, exclusive ends

    @property
    def name(self) -> str:
        return self.label

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.label.lower().split())

    @property
    def center(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())


def box_mask(box, size: tuple[int, int], fmt: str = "xywh") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A filled mask of a box (COCO's `xywh`, or `xyxy`), clipped to the image, and the box as xyxy ints."""
    width, height = size
    x0, y0, a, b = (float(v) for v in box)
    x1, y1 = (x0 + a, y0 + b) if fmt == "xywh" else (a, b)
    if fmt not in ("xywh", "xyxy"):
        raise ValueError(f"box format must be 'xywh' (COCO) or 'xyxy', not {fmt!r}")
    ix0, iy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    ix1, iy1 = min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height)
    mask = np.zeros((height, width), bool)
    mask[iy0:iy1, ix0:ix1] = True
    return mask, (ix0, iy0, ix1, iy1)


def _objects_of(row: dict, image: Image.Image, objects: str, label: str, mask: str, bbox: str, bbox_format: str,
                names) -> list[PhotoObject]:
    found = row[objects]
    if isinstance(found, dict):  # datasets' "list of dicts" arrives as a dict of lists
        keys = list(found)
        found = [dict(zip(keys, values)) for values in zip(*found.values())]
    out = []
    for obj in found:
        name = obj[label]
        name = names[name] if names is not None and not isinstance(name, str) else str(name)
        if obj.get(mask) is not None:
            m = np.asarray(obj[mask], bool)
            if m.shape != (image.height, image.width):
                raise ValueError(f"an object mask of shape {m.shape} does not fit its image "
                                 f"({image.height}, {image.width}); give one (H, W) mask per object")
            ys, xs = np.nonzero(m)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
        elif obj.get(bbox) is not None:
            m, box = box_mask(obj[bbox], image.size, bbox_format)
        else:
            raise ValueError(f"object {name!r} has neither a {mask!r} nor a {bbox!r}: give one of them")
        if m.any():
            out.append(PhotoObject(name, m, box))
    return out


def examples_from_dataset(dataset, image: str = "image", objects: str = "objects", label: str = "category",
                          mask: str = "mask", bbox: str = "bbox", bbox_format: str = "xywh",
                          question: str = POLLING_QUESTION, n: int | None = None, names=None) -> list[Example]:
    """Polling examples ("Is there a {label} in the image?" -> "yes") from labelled photos, one per row, about
    the row's largest object (the one whose tokens are easiest to ablate whole).

    `objects` is a column holding, per row, a list of objects (or datasets' dict of lists) with a `label` and a
    `mask` ((H, W) bool) or a `bbox` (`bbox_format`). Integer labels are named through `names` (for instance
    `dataset.features["objects"].feature["category"].names`).
    """
    missing = [c for c in (image, objects) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the dataset has no column {missing[0]!r}; its columns: {dataset.column_names}. Name "
                         "the image and objects columns with image=... and objects=...")
    out = []
    for index, row in enumerate(dataset):
        if n is not None and len(out) == n:
            break
        picture = row[image]
        if not isinstance(picture, Image.Image):
            raise TypeError(f"column {image!r} must hold images (datasets.Image), got {type(picture).__name__}")
        picture = picture.convert("RGB")
        objs = _objects_of(row, picture, objects, label, mask, bbox, bbox_format, names)
        if not objs:
            continue
        target = int(np.argmax([o.mask.sum() for o in objs]))
        scene = Scene(picture, objs, background=(0, 0, 0), seed=(index,))
        out.append(Example(scene, question.format(label=objs[target].label), "yes", "polling", index, (target,)))
    return out
