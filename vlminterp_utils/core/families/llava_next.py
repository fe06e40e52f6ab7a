"""`llava_next`: LLaVA-NeXT's "anyres" tiling, the base image's grid and then the tiles'."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import geometry
from .base import SizeDependentTokens
from .llava import LlavaAdapter


class LlavaNextAdapter(SizeDependentTokens, LlavaAdapter):
    """`LlavaNextForConditionalGeneration` (LLaVA-NeXT, "anyres"): the base image's grid, then a grid over tiles
    of a larger canvas with a row-end token after each row. The number of visual tokens depends on the image's
    size; `grid` is the base image's."""

    family = "llava_next"

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        """Only the tiny-image note: anyres tiles keep any aspect ratio."""
        return [note for note in super().input_notes(image_size) if note.startswith("tiny")]

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        if self.strategy != "default" and self.extra_tokens:
            raise ValueError("LLaVA-NeXT with a CLS token kept ('full' strategy) is not supported")
        return geometry.anyres_regions(image_size, self.config.image_grid_pinpoints, self.image_size,
                                       self.patch_size, newline=True)

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable anyres inputs: the base image and the tiles of its canvas (resized keeping the aspect
        ratio, centred on black, cut row by row), as the processor makes them, up to the resampling filter."""
        n, _, h, w = pixels.shape
        side = self.image_size
        canvas_h, canvas_w = geometry.select_best_resolution(h, w, self.config.image_grid_pinpoints)
        new_w, new_h, left, top = geometry.fit_in_canvas(w, h, canvas_w, canvas_h)
        resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
        canvas = F.pad(resized, (left, canvas_w - new_w - left, top, canvas_h - new_h - top))
        tiles = canvas.unfold(2, side, side).unfold(3, side, side)  # (n, 3, rows, cols, side, side)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3, side, side)
        base = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)[:, None]
        values = self.normalize(torch.cat([base, tiles], 1).flatten(0, 1)).unflatten(0, (n, -1))
        sizes = torch.tensor([[h, w]] * n, device=pixels.device)
        return {"pixel_values": values.to(next(self.model.parameters()).dtype), "image_sizes": sizes}

    def display_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        rows, cols = self.grid
        shown = np.zeros(len(self.token_regions(image_size)), bool)
        shown[:rows * cols] = True  # the base image's grid, which covers the whole image once
        return shown
