"""`gemma3`: a SigLIP tower at a fixed size, its patches average-pooled to a square of tokens, and image tokens
that attend to each other both ways.

Gemma 3 resizes every image to the tower's square (896 px in 14 px patches: 64 x 64 patches), without keeping its
aspect ratio, and its projector average-pools the patches in k x k blocks to `mm_tokens_per_image` tokens (256:
16 x 16, each token showing a 56 px square). The prompt holds the image as `<start_of_image>`, the pooled tokens,
`<end_of_image>`. Inside the LLM, the tokens of one image attend to each other in both directions (a
bidirectional block in an otherwise causal mask, built from `token_type_ids`): the knockout edits the mask each
layer receives, so it keeps that block, and its replay (`CleanRun`) re-uses the masks the model built. With the
optional pan-and-scan (`adapter.pan_and_scan = True`, off by default as in the processor), an image much wider or
taller than square is also cut into 2 to 4 crops side by side, each squashed to the square and pooled alike: the
tokens are the whole image's, then each crop's in turn (`token_regions` says which part each shows).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .. import geometry
from .base import VLMAdapter


class Gemma3Adapter(VLMAdapter):
    """`Gemma3ForConditionalGeneration`."""

    family = "gemma3"
    pan_and_scan = False  # the processor's `do_pan_and_scan`, which `inputs` passes on with `pan_and_scan_settings`

    @property
    def image_size(self) -> int:
        """Side of the square the tower sees (and the scenes the chapters draw), in pixels."""
        return int(self.config.vision_config.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of visual tokens: the pooled square."""
        side = int(round(int(self.config.mm_tokens_per_image) ** 0.5))
        return side, side

    @property
    def cell(self) -> int:
        """Side of the square one visual token shows, in the tower's input pixels (a pool of patches)."""
        return self.image_size // self.grid[0]

    def check_visual_count(self, n: int) -> None:
        if n % self.n_visual_tokens:
            raise ValueError(f"found {n} image tokens per sequence, but Gemma 3 pools the image, and each "
                             f"pan-and-scan crop, to {self.n_visual_tokens}")

    def crops(self, image_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """The pan-and-scan crops of an image, boxes (x0, y0, x1, y1) in its pixels, in the processor's order
        (none when it is off or the image is near square): the processor's own rule, `Gemma3ImageProcessor
        .pan_and_scan`."""
        if not self.pan_and_scan:
            return []
        setting = self.pan_and_scan_settings
        width, height = image_size
        min_crop = setting["pan_and_scan_min_crop_size"]
        max_crops = setting["pan_and_scan_max_num_crops"]
        min_ratio = setting["pan_and_scan_min_ratio_to_activate"]
        long, short = max(width, height), min(width, height)
        if long / short < min_ratio:
            return []
        n = max(2, min(int(math.floor(long / short + 0.5)), int(math.floor(long / min_crop))))
        n = min(max_crops, n)
        across, down = (n, 1) if width >= height else (1, n)
        crop_w, crop_h = int(math.ceil(width / across)), int(math.ceil(height / down))
        if min(crop_w, crop_h) < min_crop:
            return []
        return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
                for y in range(0, crop_h * down, crop_h) for x in range(0, crop_w * across, crop_w)]

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        """The whole image's pooled grid, then each pan-and-scan crop's (each view squashed to the square)."""
        width, height = image_size
        rows, cols = self.grid
        views = [(0, 0, width, height), *self.crops(image_size)]
        out = []
        for x0, y0, x1, y1 in views:
            boxes = geometry.patch_boxes(rows, cols, self.cell)
            boxes[:, [0, 2]] = x0 + boxes[:, [0, 2]] * (x1 - x0) / self.image_size
            boxes[:, [1, 3]] = y0 + boxes[:, [1, 3]] * (y1 - y0) / self.image_size
            out.append(boxes)
        return np.concatenate(out)

    def display_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        shown = np.zeros(len(self.token_regions(image_size)), bool)
        shown[:self.n_visual_tokens] = True  # the whole image's grid
        return shown

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        width, height = image_size
        notes = []
        if min(width, height) < self.patch_size:
            notes.append(f"tiny image: {width}x{height} px is smaller than one {self.patch_size} px patch, so the "
                         f"model sees it blown up to {self.image_size} px of a few flat colours; pass the image "
                         "at its real size")
        if width != height:
            notes.append(f"squashed image: the processor resizes a {width}x{height} image to {self.image_size}x"
                         f"{self.image_size} without keeping its aspect ratio, so shapes look stretched to the "
                         "model; pad it to a square first with models.pad_to_square")
        return notes

    @property
    def pan_and_scan_settings(self) -> dict:
        """The crop rule's settings, the processor's defaults (a minimum crop of 256 px, at most 4 crops, from
        an aspect ratio of 1.2), or what a reader set in `adapter.pan_and_scan_overrides`."""
        keys = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")
        defaults = getattr(self.processor, "images_kwargs", {})
        return {k: getattr(self, "pan_and_scan_overrides", {}).get(k, defaults.get(k)) for k in keys}

    def processor_options(self) -> dict:
        return {"do_pan_and_scan": self.pan_and_scan, **(self.pan_and_scan_settings if self.pan_and_scan else {})}

    def images_per_prompt(self, images: list) -> list:
        return [[image] for image in images]  # Gemma 3's processor counts images per prompt

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bidirectional block over image tokens is built from these: text 0, image 1."""
        return {"token_type_ids": (input_ids == self.image_token_id).long()}

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs for (batch, 3, side, side) pixels in [0, 1] at the tower's own size (a
        square, which pan-and-scan never crops)."""
        if pixels.shape[-1] != pixels.shape[-2]:
            raise ValueError(f"MIMIC's pixels must be square for Gemma 3, got {tuple(pixels.shape[-2:])}: a "
                             "non-square image would be squashed, or cut by pan-and-scan into crops")
        return {"pixel_values": self.normalize(pixels).to(next(self.model.parameters()).dtype)}

    def vision_states(self, vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every tower layer's patch tokens, (batch, patches, width) per layer (SigLIP has no CLS token)."""
        out = self.vision_tower(pixel_values=vision["pixel_values"], output_hidden_states=True)
        return tuple(out.hidden_states[1:])

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.base_model.vision_tower

    @property
    def projector(self) -> nn.Module:
        """Average pooling of k x k patches, a norm and a linear map to the LLM's width."""
        return self.model.base_model.multi_modal_projector
