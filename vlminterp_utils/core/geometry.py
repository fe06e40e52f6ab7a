"""Where each visual token looks: the region of the original image it covers, and which tokens an object touches.

A visual token is one patch of the image *as the vision tower receives it*, after the processor's resize, centre
crop, or (LLaVA-NeXT) tiling. Mapping that patch back through the processor's transforms gives a box in the
original image's pixels: `(x0, y0, x1, y1)`, ends exclusive. Tokens that show no patch (LLaVA-NeXT's row-end
tokens, a CLS token kept by the "full" strategy) get a row of NaN. Pixels that no patch sees (a crop's margins, the
last pixels of a 384 px image cut into 14 px patches) lie in no box, so they belong to no token.
"""
from __future__ import annotations

import math

import numpy as np


def patch_boxes(rows: int, cols: int, patch: float) -> np.ndarray:
    """(rows * cols, 4) boxes of a row-major grid of square patches, in the vision tower's input pixels."""
    r, c = np.divmod(np.arange(rows * cols), cols)  # (n,) row and column of each token, row by row
    return np.stack([c * patch, r * patch, (c + 1) * patch, (r + 1) * patch], axis=1).astype(float)  # (n, 4)


def resized_size(width: int, height: int, size: dict) -> tuple[int, int]:
    """The (width, height) a HF image processor resizes to, for its `size` setting."""
    if "shortest_edge" in size:  # the short side to this length, the aspect ratio kept (CLIP)
        short, long = sorted((width, height))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    if "height" in size and "width" in size:  # a fixed size, aspect ratio not kept (SigLIP, shapes-llava)
        return int(size["width"]), int(size["height"])
    raise ValueError(f"unsupported resize setting {size}; expected 'shortest_edge' or 'height' and 'width'")


def size_setting(size) -> dict:
    """A processor's size setting as a plain dict of the keys that are set (HF's SizeDict or a dict)."""
    keys = ("height", "width", "shortest_edge")
    items = size.items() if isinstance(size, dict) else ((k, getattr(size, k, None)) for k in keys)
    return {k: v for k, v in items if k in keys and v is not None}


def resize_crop_regions(image_size: tuple[int, int], image_processor, side: int, patch: int) -> np.ndarray:
    """Boxes, in original pixels, of the patches of one square model input made by resize (+ centre crop)."""
    width, height = image_size
    size = size_setting(getattr(image_processor, "size", None) or {}) or {"height": side, "width": side}
    rw, rh = resized_size(width, height, size) if getattr(image_processor, "do_resize", True) else (width, height)
    left = top = 0
    if getattr(image_processor, "do_center_crop", False):
        crop = size_setting(getattr(image_processor, "crop_size", None) or {}) or {"height": side, "width": side}
        left, top = (rw - crop["width"]) // 2, (rh - crop["height"]) // 2
    boxes = patch_boxes(side // patch, side // patch, patch)  # floor: a remainder of pixels is seen by no patch
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] + left) * width / rw
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] + top) * height / rh
    return boxes


def select_best_resolution(height: int, width: int, resolutions) -> tuple[int, int]:
    """LLaVA-NeXT's choice of tiling canvas: the most effective resolution, then the least wasted (as HF)."""
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def fit_in_canvas(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[int, int, int, int]:
    """LLaVA-NeXT's resize into its canvas, aspect ratio kept, pasted at the centre (HF's _resize_for_patching and
    _pad_for_patching): the new width and height, and the paste offsets x and y."""
    if canvas_w / width < canvas_h / height:
        new_w, new_h = canvas_w, min(math.ceil(height * canvas_w / width), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * canvas_h / height), canvas_w), canvas_h
    return new_w, new_h, (canvas_w - new_w) // 2, (canvas_h - new_h) // 2


def anyres_regions(image_size: tuple[int, int], grid_pinpoints, side: int, patch: int,
                   newline: bool = True, max_tiles: int | None = None) -> np.ndarray:
    """Boxes of every LLaVA-NeXT visual token in sequence order: the base image's grid, then the tiles' grid
    (padding rows or columns removed, as the model does), one NaN row-end token after each of its rows.

    `max_tiles` (LLaVA-OneVision's "anyres_max_9": 9): when the kept grid holds more than about that many tiles'
    worth of tokens (by a factor over 1.1 in area), the model shrinks it by bilinear interpolation to
    int(rows / r) x int(cols / r) tokens, r the square root of the factor; each of those then shows an equal
    share of the kept region."""
    width, height = image_size
    n = side // patch
    base = patch_boxes(n, n, patch)
    base[:, [0, 2]] *= width / side
    base[:, [1, 3]] *= height / side
    canvas_h, canvas_w = select_best_resolution(height, width, grid_pinpoints)
    new_w, new_h, paste_x, paste_y = fit_in_canvas(width, height, canvas_w, canvas_h)
    rows, cols = canvas_h // side * n, canvas_w // side * n
    # the model's unpad_image, on the token grid
    if width / height > cols / rows:
        kept = int(round(height * cols / width, 7))
        pad = (rows - kept) // 2
        keep_rows, keep_cols = range(pad, rows - pad), range(cols)
    else:
        kept = int(round(width * rows / height, 7))
        pad = (cols - kept) // 2
        keep_rows, keep_cols = range(rows), range(pad, cols - pad)
    # the kept region in grid cells, and its grid after OneVision's shrinking (none for LLaVA-NeXT)
    n_rows, n_cols = len(keep_rows), len(keep_cols)
    out_rows, out_cols = n_rows, n_cols
    if max_tiles is not None:
        ratio = math.sqrt(n_rows * n_cols / (max_tiles * n * n))
        if ratio > 1.1:
            out_rows, out_cols = int(n_rows // ratio), int(n_cols // ratio)
    step_r, step_c = n_rows / out_rows, n_cols / out_cols  # kept cells per token
    tiles = []
    for i in range(out_rows):
        for j in range(out_cols):
            r, c = keep_rows[0] + i * step_r, keep_cols[0] + j * step_c
            x0, y0 = c * patch - paste_x, r * patch - paste_y
            x1, y1 = x0 + step_c * patch, y0 + step_r * patch
            tiles.append([x0 * width / new_w, y0 * height / new_h, x1 * width / new_w, y1 * height / new_h])
        if newline:
            tiles.append([np.nan] * 4)
    return np.concatenate([base, np.array(tiles, float)])


def pixel_edge(coord, limit: int):
    """The first whole pixel at or after a box edge at `coord`, in [0, limit]: pixel j lies inside [x0, x1) when its
    centre j + 0.5 does, so the pixels of a box run from pixel_edge(x0) to pixel_edge(x1) - 1."""
    return np.clip(np.ceil(np.asarray(coord) - 0.5), 0, limit).astype(int)


def tokens_touching(mask: np.ndarray, regions: np.ndarray, buffer: int = 0) -> np.ndarray:
    """(n_tokens,) bool: tokens whose box, grown by `buffer` box widths on every side, holds a pixel of `mask`.

    A pixel belongs to a box when its centre does. On a regular grid, growing by `buffer` boxes is the Chebyshev
    dilation of the touched cells by `buffer` cells. NaN boxes (tokens that are no patch) touch nothing.
    """
    if buffer < 0:
        raise ValueError(f"buffer must be >= 0, got {buffer}")
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    out = np.zeros(len(regions), bool)
    valid = ~np.isnan(regions).any(1)
    boxes = regions[valid]
    grow = buffer * np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    x0, x1 = pixel_edge(boxes[:, 0] - grow[:, 0], w), pixel_edge(boxes[:, 2] + grow[:, 0], w)
    y0, y1 = pixel_edge(boxes[:, 1] - grow[:, 1], h), pixel_edge(boxes[:, 3] + grow[:, 1], h)
    counts = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    out[valid] = counts > 0
    return out


def bottom_row(regions: np.ndarray) -> np.ndarray:
    """(n_tokens,) bool: the patches along the bottom edge of what the vision tower sees (its last grid row)."""
    valid = ~np.isnan(regions).any(1)
    bottom = np.where(valid, regions[:, 3], -np.inf)
    heights = regions[valid, 3] - regions[valid, 1]
    return valid & (bottom > bottom.max() - heights.min() / 2)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize: the (height, width) nearest the image's whose sides are multiples of `factor` (a patch
    times the merge size) and whose area lies in [min_pixels, max_pixels], aspect ratio kept as well as that
    allows. The processor's own function (`transformers...image_processing_pil_qwen2_vl.smart_resize`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as resize
    return resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def merged_patch_regions(image_size: tuple[int, int], resized: tuple[int, int], cell: int) -> np.ndarray:
    """Boxes, in original pixels, of Qwen-VL's visual tokens: the image resized to `resized` (height, width), cut
    into `cell` px squares (2 x 2 patches merged into one token), row by row, as the merger orders them."""
    width, height = image_size
    new_h, new_w = resized
    boxes = patch_boxes(new_h // cell, new_w // cell, cell)
    boxes[:, [0, 2]] *= width / new_w
    boxes[:, [1, 3]] *= height / new_h
    return boxes


def idefics3_resized(width: int, height: int, longest_edge: int, tile: int) -> tuple[int, int]:
    """(height, width) of Idefics3's (SmolVLM's) image before it is cut into tiles: the longest side to
    `longest_edge`, aspect ratio kept (at most 4096 px a side), then each side rounded up to a whole number of
    `tile` px tiles (as the processor's `resize` and `resize_for_vision_encoder`)."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        MAX_IMAGE_SIZE, _resize_output_size_rescale_to_max_len, _resize_output_size_scale_below_upper_bound)
    h, w = _resize_output_size_rescale_to_max_len(height, width, max_len=longest_edge)
    h, w = _resize_output_size_scale_below_upper_bound(h, w, max_len=MAX_IMAGE_SIZE)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def tiled_regions(image_size: tuple[int, int], resized: tuple[int, int] | None, tile: int, side: int) -> np.ndarray:
    """Boxes of Idefics3's (SmolVLM's) visual tokens in sequence order: for each tile of the `resized` image
    (row by row), its `side` x `side` tokens row by row, then the same grid over the global image (the whole
    image squashed into one tile). `resized=None`: no splitting, the global image alone."""
    width, height = image_size
    cell = tile / side
    grid = patch_boxes(side, side, cell)  # one tile's tokens, in the tile's pixels
    boxes = []
    if resized is not None:
        new_h, new_w = resized
        for r in range(new_h // tile):
            for c in range(new_w // tile):
                tile_boxes = grid + [c * tile, r * tile, c * tile, r * tile]
                boxes.append(tile_boxes * [width / new_w, height / new_h, width / new_w, height / new_h])
    boxes.append(grid * [width / tile, height / tile, width / tile, height / tile])
    return np.concatenate(boxes)
