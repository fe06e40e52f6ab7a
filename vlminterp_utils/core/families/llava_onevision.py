"""`llava_onevision`: LLaVA-NeXT's tiling with "anyres_max": a large tile grid is shrunk to about N tiles' worth."""
from __future__ import annotations

import numpy as np

from .. import geometry
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """`LlavaOnevisionForConditionalGeneration`: the base image's grid, then the tiles' grid with padding removed
    and a row-end token after each row, as in LLaVA-NeXT; when the kept grid holds more than `vision_aspect_ratio`
    ("anyres_max_9": 9) tiles' worth of tokens, the model shrinks it by bilinear interpolation, so a token there
    shows a region larger than one patch (`geometry.anyres_regions`)."""

    family = "llava_onevision"

    @property
    def max_tiles(self) -> int:
        return int(str(self.config.vision_aspect_ratio).removeprefix("anyres_max_"))

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        if self.strategy != "full" and self.extra_tokens:
            raise ValueError("LLaVA-OneVision with a CLS token kept is not supported")
        return geometry.anyres_regions(image_size, self.config.image_grid_pinpoints, self.image_size,
                                       self.patch_size, newline=True, max_tiles=self.max_tiles)
