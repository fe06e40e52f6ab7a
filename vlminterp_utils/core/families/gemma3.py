"""`gemma3`: a SigLIP tower at a fixed size, its patches average-pooled to a square of tokens, and image tokens
that attend to each other both ways.

Gemma 3 resizes every image to the tower's square (896 px in 14 px patches: 64 x 64 patches), without keeping its
aspect ratio, and its projector average-pools the patches in k x k blocks to `mm_tokens_per_image` tokens (256:
16 x 16, each token showing a 56 px square). The prompt holds the image as `<start_of_image>`, the pooled tokens,
`<end_of_image>`. Inside the LLM, the tokens of one image attend to each other in both directions (a
bidirectional block in an otherwise causal mask, built from `token_type_ids`): the knockout edits the mask each
layer receives, so it keeps that block, and its replay (`CleanRun`) re-uses the masks the model built. The
optional pan-and-scan crops are refused: every crop would repeat the 256 tokens for another part of the image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import geometry
from .base import VLMAdapter


class Gemma3Adapter(VLMAdapter):
    """`Gemma3ForConditionalGeneration`."""

    family = "gemma3"

    @property
    def image_size(self) -> int:
        """Side of the square the tower sees (and the scenes the chapters draw), in pixels."""
        return int(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

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
        if n != self.n_visual_tokens:
            raise ValueError(f"found {n} image tokens per sequence but Gemma 3 pools an image to "
                             f"{self.n_visual_tokens}; pan-and-scan crops are not supported: set "
                             "processor.image_processor.do_pan_and_scan = False")

    def token_regions(self, image_size: tuple[int, int]) -> np.ndarray:
        width, height = image_size
        rows, cols = self.grid
        boxes = geometry.patch_boxes(rows, cols, self.cell)
        boxes[:, [0, 2]] *= width / self.image_size  # the resize squashes the image to the square
        boxes[:, [1, 3]] *= height / self.image_size
        return boxes

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

    def inputs(self, images, questions, answer_prefixes=None) -> dict[str, torch.Tensor]:
        if getattr(self.processor.image_processor, "do_pan_and_scan", False):
            raise ValueError("pan-and-scan crops are not supported (each crop repeats the image's tokens for "
                             "another part of it): set processor.image_processor.do_pan_and_scan = False")
        return super().inputs(images, questions, answer_prefixes)

    def images_per_prompt(self, images: list) -> list:
        return [[image] for image in images]  # Gemma 3's processor counts images per prompt

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bidirectional block over image tokens is built from these: text 0, image 1."""
        return {"token_type_ids": (input_ids == self.image_token_id).long()}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        std = torch.tensor(ip.image_std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
        return (pixels - mean) / std

    def pixel_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs for (batch, 3, side, side) pixels in [0, 1] at the tower's own size."""
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
