"""`idefics3` and `smolvlm`: SmolVLM's tiles, a global image and pixel shuffle.

The processor resizes an image so its longest side is `size["longest_edge"]` (aspect ratio kept), rounds each side
up to whole tiles of `max_image_size["longest_edge"]` px (the tower's input), and cuts it into those tiles, row by
row, followed by the global image: the whole image squashed into one tile. An image that fits in one tile is the
global image alone. Each tile goes through the vision tower; the connector's pixel shuffle folds each s x s block
of patches into one token (`scale_factor` s), so a tile gives `image_seq_len` tokens, row by row. Between tiles
the prompt holds text: `<fake_token_around_image>`, `<row_i_col_j>` before each tile, `<global-img>` before the
global image; those are not image tokens, and `visual_positions` (the `<image>` tokens) skips them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .base import SizeDependentTokens, VLMAdapter


class Idefics3Adapter(SizeDependentTokens, VLMAdapter):
    """`Idefics3ForConditionalGeneration` (SmolVLM-256M/500M/2.2B) and `SmolVLMForConditionalGeneration`."""

    family = "idefics3"

    @property
    def tile(self) -> int:
        """Side of one tile, in the resized image's pixels: the tower's input size."""
        return int(self.config.vision_config.image_size)

    @property
    def side(self) -> int:
        """Tokens along a tile's side, after the pixel shuffle."""
        return self.tile // self.patch_size // int(self.config.scale_factor)

    @property
    def image_size(self) -> int:
        """Side of the square scenes the chapters draw: one tile (the processor still resizes it, to
        `longest_edge`, and cuts that into tiles when splitting is on)."""
        return self.tile

    @property
    def grid(self) -> tuple[int, int]:
        """One tile's tokens (the global image's grid)."""
        return self.side, self.side

    @property
    def splitting(self) -> bool:
        return bool(getattr(self.image_processor, "do_image_splitting", False))

    def resized(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """(height, width) of the image cut into tiles, or None when it is the global image alone."""
        if not self.splitting:
            return None
        width, height = image_size
        size = self.image_processor.size
        longest = int(size["longest_edge"] if isinstance(size, dict) else size.longest_edge)
        h, w = geometry.idefics3_resized(width, height, longest, self.tile)
        return (h, w) if h > self.tile or w > self.tile else None

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        return geometry.tiled_regions(image_size, self.resized(image_size), self.tile, self.side)

    def display_tokens(self, image_size: tuple[int, int]) -> np.ndarray:
        shown = np.zeros(len(self.token_regions(image_size)), bool)
        shown[-self.side ** 2:] = True  # the global image's grid, which covers the whole image once
        return shown

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        width, height = image_size
        notes = []
        if min(width, height) < self.patch_size:
            notes.append(f"tiny image: {width}x{height} px is smaller than one {self.patch_size} px patch, so the "
                         "model sees it blown up to tiles of a few flat colours; pass the image at its real size")
        if width != height and not self.splitting:
            notes.append(f"squashed image: without image splitting the processor resizes a {width}x{height} image "
                         f"to {self.tile}x{self.tile}, so shapes look stretched to the model; pad it to a square "
                         "first with models.pad_to_square")
        return notes

    def images_per_prompt(self, images: list) -> list:
        return [[image] for image in images]  # the processor counts images per prompt

    # ------------------------------------------------------------------------------------------ pixels
    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable inputs for (batch, 3, H, W) pixels in [0, 1]: the tiles of the resized image row by row,
        then the global image, as the processor makes them, up to its resampling filter (Lanczos there, bicubic
        here)."""
        n, _, h, w = pixels.shape
        resized = self.resized((w, h))
        tile = self.tile
        views = []
        if resized is not None:
            big = F.interpolate(pixels, size=resized, mode="bicubic", align_corners=False).clamp(0, 1)
            tiles = big.unfold(2, tile, tile).unfold(3, tile, tile)  # (n, 3, rows, cols, tile, tile)
            views.append(tiles.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3, tile, tile))
        squashed = F.interpolate(pixels, size=(tile, tile), mode="bicubic", align_corners=False).clamp(0, 1)
        views.append(squashed[:, None])
        values = self.normalize(torch.cat(views, 1).flatten(0, 1)).unflatten(0, (n, -1))
        mask = torch.ones(values.shape[0], values.shape[1], tile, tile, dtype=torch.long, device=pixels.device)
        return {"pixel_values": values.to(next(self.model.parameters()).dtype), "pixel_attention_mask": mask}

    def vision_states(self, vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every tower layer's patch tokens, (batch, patches of all tiles, width) per layer."""
        pixels = vision["pixel_values"]
        n = pixels.shape[0]
        out = self.vision_tower(pixel_values=pixels.flatten(0, 1), output_hidden_states=True)
        return tuple(h.reshape(n, -1, h.shape[-1]) for h in out.hidden_states[1:])

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.base_model.vision_model

    @property
    def projector(self) -> nn.Module:
        """The connector: pixel shuffle, then a linear map to the LLM's width."""
        return self.model.base_model.connector


class SmolVLMAdapter(Idefics3Adapter):
    """`SmolVLMForConditionalGeneration` (SmolVLM2): Idefics3's tiles and pixel shuffle."""

    family = "smolvlm"
