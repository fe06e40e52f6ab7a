"""`qwen2_vl` and `qwen2_5_vl`: dynamic resolution, 2 x 2 patches merged into one visual token, M-RoPE.

The processor resizes an image to sides that are multiples of 28 px (`smart_resize`: a 14 px patch times the
merge size 2), keeping its aspect ratio, with an area between `min_pixels` and `max_pixels`. The vision tower
sees every 14 px patch; its merger folds each 2 x 2 block of patches into one visual token, block by block along
rows. So the number of visual tokens depends on the image, and every token shows one 28 px square of the resized
image. The LLM gives visual tokens 3D rotary positions (M-RoPE: time, row, column) computed from `input_ids`,
`mm_token_type_ids` and `image_grid_thw`; the interventions edit hidden states and attention masks, never the
positions (`CleanRun` replays with the positions the model computed).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from .base import SizeDependentTokens, VLMAdapter

SCENE_TOKENS = 16  # a square scene drawn at 16 x 16 visual tokens (448 px for Qwen2-VL), if max_pixels allows


class Qwen2VLAdapter(SizeDependentTokens, VLMAdapter):
    """`Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration` (the 2.5 tower's window
    attention changes nothing the chapters read: the tokens and their order are the same)."""

    family = "qwen2_vl"

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def cell(self) -> int:
        """Side of the square one visual token shows, in the resized image's pixels (patch x merge)."""
        return self.patch_size * self.merge_size

    @property
    def pixel_range(self) -> tuple[int, int]:
        """(min_pixels, max_pixels): the area the processor resizes every image into."""
        size = self.image_processor.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        return int(get("shortest_edge")), int(get("longest_edge"))

    @property
    def image_size(self) -> int:
        """Side of the square scenes the chapters draw: `SCENE_TOKENS` tokens a side, fewer if `max_pixels` is
        smaller; the processor keeps it as it is (a multiple of the token's side, inside the pixel range)."""
        low, high = self.pixel_range
        side = self.cell * SCENE_TOKENS
        while side > self.cell and side * side > high:
            side -= self.cell
        return side

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of visual tokens for a square scene of `image_size`."""
        h, w = self.resized((self.image_size, self.image_size))
        return h // self.cell, w // self.cell

    def resized(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) the processor resizes an image of `image_size` (width, height) to."""
        width, height = image_size
        low, high = self.pixel_range
        return geometry.smart_resize(height, width, self.cell, low, high)

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        return geometry.merged_patch_regions(image_size, self.resized(image_size), self.cell)

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        width, height = image_size
        if min(width, height) < self.patch_size:
            h, w = self.resized(image_size)
            return [f"tiny image: {width}x{height} px is smaller than one {self.patch_size} px patch, so the "
                    f"processor blows it up to {w}x{h} px of a few flat colours; pass the image at its real size"]
        return []  # any other size keeps its aspect ratio

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """M-RoPE needs to know which tokens are the image's: text 0, image 1 (the processor's convention)."""
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}

    # ------------------------------------------------------------------------------------------ pixels
    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs for (batch, 3, H, W) pixels in [0, 1]: resized as the processor would
        (a no-op at `image_size`), normalised, cut into patches in the merger's order, each patch repeated over
        the tower's 2 time steps (a still image is a video of 2 equal frames), flattened as the processor does."""
        n, c, h, w = pixels.shape
        new_h, new_w = self.resized((w, h))
        if (new_h, new_w) != (h, w):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False)
        x = self.normalize(pixels)
        p, m, t = self.patch_size, self.merge_size, int(self.config.vision_config.temporal_patch_size)
        gh, gw = new_h // p, new_w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (n, gh/m, gw/m, m, m, c, p, p): block by block, as the merger
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], t, p, p)  # (..., c, t, p, p)
        values = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, device=pixels.device)
        return {"pixel_values": values.to(next(self.model.parameters()).dtype), "image_grid_thw": grid}

    def vision_states(self, vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every vision-tower block's output, (batch, patches, width) per block, before the merger."""
        grid = vision["image_grid_thw"]
        out = self.vision_tower(vision["pixel_values"], grid_thw=grid, output_hidden_states=True)
        n = grid.shape[0]
        return tuple(h.reshape(n, -1, h.shape[-1]) for h in out.hidden_states[1:])

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.base_model.visual

    @property
    def projector(self) -> nn.Module:
        """The merger: 2 x 2 patches to one token of the LLM's width."""
        return self.vision_tower.merger


class Qwen25VLAdapter(Qwen2VLAdapter):
    """`Qwen2_5_VLForConditionalGeneration`: Qwen2-VL's geometry; its tower's window attention is internal."""

    family = "qwen2_5_vl"


class Qwen3VLAdapter(Qwen2VLAdapter):
    """`Qwen3VLForConditionalGeneration`: Qwen2-VL's geometry with 16 px patches (so 32 px per token), and
    DeepStack: features of several vision-tower layers, each through its own merger, are added to the visual
    tokens' hidden states after the LLM's first `deepstack_levels` layers. The LLM thus receives the image at
    its input and again after each of those layers: the ablation replaces a token at all of them
    (`interventions.replace_visual_tokens`), the residual stream is read where layers read it (after the
    additions), and the knockout's replay carries the additions of the positions it re-runs."""

    family = "qwen3_vl"

    @property
    def deepstack_levels(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or [])
