"""`llava`: LLaVA-1.5 and shapes-llava, one square image in a grid of patches."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import geometry
from .base import VLMAdapter


class LlavaAdapter(VLMAdapter):
    """`LlavaForConditionalGeneration`: a vision tower, a projector and a decoder-only LLM."""

    family = "llava"

    @property
    def image_size(self) -> int:
        """Side of the square image the vision tower takes, in pixels."""
        return int(self.config.vision_config.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of patches; a remainder of pixels (384 px in 14 px patches) is seen by no patch."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def strategy(self) -> str:
        return self.config.vision_feature_select_strategy

    @property
    def extra_tokens(self) -> int:
        """Visual tokens before the patches that show none (a CLS token kept by the "full" strategy)."""
        cls = int(getattr(self.processor, "num_additional_image_tokens", 0) or 0)
        return cls if self.strategy == "full" else 0

    @property
    def n_visual_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols + self.extra_tokens

    def check_visual_count(self, n: int) -> None:
        if n != self.n_visual_tokens:
            raise ValueError(f"found {n} image tokens per sequence but the patch grid {self.grid} has "
                             f"{self.n_visual_tokens}; this model family needs its own adapter")

    def input_notes(self, image_size: tuple[int, int]) -> list[str]:
        width, height = image_size
        notes = []
        if min(width, height) < self.patch_size:
            notes.append(f"tiny image: {width}x{height} px is smaller than one {self.patch_size} px patch, so the "
                         f"model sees it blown up to {self.image_size} px of a few flat colours; pass the image "
                         "at its real size")
        if width != height:
            ip = self.processor.image_processor
            size = geometry.size_setting(getattr(ip, "size", None) or {})
            if getattr(ip, "do_center_crop", False):
                notes.append(f"cropped image: the processor resizes a {width}x{height} image and keeps its central "
                             "square, so what lies outside it is never seen (token_regions says which part is); "
                             "pad it to a square first with models.pad_to_square to keep all of it")
            elif "height" in size and "width" in size:
                notes.append(f"squashed image: the processor resizes a {width}x{height} image to "
                             f"{size['width']}x{size['height']} without keeping its aspect ratio, so shapes look "
                             "stretched to the model; pad it to a square first with models.pad_to_square")
        return notes

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        boxes = geometry.resize_crop_regions(image_size, self.processor.image_processor, self.image_size,
                                             self.patch_size)
        return np.concatenate([np.full((self.extra_tokens, 4), np.nan), boxes])

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs for (batch, 3, side, side) pixels in [0, 1] at the tower's own size."""
        return {"pixel_values": self.normalize(pixels).to(next(self.model.parameters()).dtype)}

    def vision_states(self, vision: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every vision-tower layer's patch tokens, (batch, patches, width) per layer: the CLS token dropped when
        the model drops it, the tokens of all of an image's tiles together for LLaVA-NeXT."""
        pixels = vision["pixel_values"]
        n = pixels.shape[0]
        out = self.vision_tower(pixel_values=pixels.flatten(0, pixels.dim() - 4), output_hidden_states=True)
        drop = 1 if self.strategy == "default" else 0
        return tuple(h[:, drop:].reshape(n, -1, h.shape[-1]) for h in out.hidden_states[1:])

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.base_model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.base_model.multi_modal_projector


def component_sizes(adapter: LlavaAdapter) -> dict[str, int]:
    """Parameter counts of the three parts of a LLaVA."""
    parts = {"vision tower": adapter.vision_tower, "projector": adapter.projector,
             "language model": adapter.language_model}
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
