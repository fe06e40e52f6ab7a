"""An independent judge of images: a small CNN that names the colour and shape of a shapes-world object.

It never sees the VLM: it is trained on rendered one-object scenes (`python -m
vlminterp_utils.workshop.train_classifier`) and shipped as package data (`data/classifier/`) with its held-out
accuracy. Chapter 3 asks it what an inverted image shows.
Inverted images are never crisp renders, so the training images are blurred, noised and dimmed at random: a judge
trained on clean renders only calls a slightly blurred red circle a "red square" and a slightly noisy one "green".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..core import shapes
from ..core.storage import data_path

HELD_OUT_SEED = 31_000  # training draws from 30_000 on (workshop.train_classifier)
DEGRADED = (1.5, 0.05)  # blur sigma (px) and noise std of the robustness check in the metadata and the tests


class ShapeClassifier(nn.Module):
    """Four conv blocks, global average pooling, two heads (colour, shape). Works at any input size."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for out in (width, width * 2, width * 2, width * 4):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.color = nn.Linear(c, len(shapes.COLORS))
        self.shape = nn.Linear(c, len(shapes.SHAPES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixels` in [0, 1], (batch, 3, H, W)."""
        h = self.features(pixels * 2 - 1).mean((2, 3))
        return self.color(h), self.shape(h)


JUDGE_SIZE = 64  # the judge sees every image at 64 x 64 pixels


def to_pixels(images, size: int = JUDGE_SIZE, resample=Image.BILINEAR) -> torch.Tensor:
    """PIL images as (batch, 3, size, size) floats in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), resample), np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (batch, 3, H, W) pixels, edges replicated."""
    if sigma <= 0:
        return pixels
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(pixels.shape[1], 1, 1, 1)  # (channels, 1, 1, taps)
    x = F.pad(pixels, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel, groups=pixels.shape[1])
    return F.conv2d(x, kernel.transpose(2, 3), groups=pixels.shape[1])


def degrade(pixels: torch.Tensor, sigma: float = 0.0, noise: float = 0.0, generator=None) -> torch.Tensor:
    """Blur by `sigma` pixels, then add Gaussian noise of std `noise`, clamped to [0, 1]."""
    noisy = gaussian_blur(pixels, sigma) + noise * torch.randn(pixels.shape, generator=generator)
    return noisy.clamp(0, 1)


def one_object_scenes(n: int, seed: int, size: int = JUDGE_SIZE) -> list[shapes.Scene]:
    return [shapes.random_scene(np.random.default_rng([seed, i]), size, n_objects=1) for i in range(n)]


def labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    colors = torch.tensor([list(shapes.COLORS).index(s.objects[0].color) for s in scenes])
    kinds = torch.tensor([shapes.SHAPES.index(s.objects[0].shape) for s in scenes])
    return colors, kinds


@torch.no_grad()
def predict(model: ShapeClassifier, pixels: torch.Tensor) -> tuple[list[str], list[str], torch.Tensor]:
    """Colour and shape names for a batch of [0, 1] pixels, and the joint confidence of each prediction."""
    model.eval()
    color_logits, shape_logits = model(pixels.float())
    pc, ps = color_logits.softmax(-1), shape_logits.softmax(-1)
    confidence = pc.max(-1).values * ps.max(-1).values
    return ([list(shapes.COLORS)[i] for i in pc.argmax(-1)], [shapes.SHAPES[i] for i in ps.argmax(-1)], confidence)


def accuracy(model: ShapeClassifier, n: int = 500, seed: int = HELD_OUT_SEED, sigma: float = 0.0,
             noise: float = 0.0) -> dict[str, float]:
    """Held-out accuracy on one-object renders, optionally blurred by `sigma` px and noised with std `noise`."""
    scenes = one_object_scenes(n, seed)
    pixels = degrade(to_pixels([s.image for s in scenes]), sigma, noise, torch.Generator().manual_seed(seed))
    colors, kinds = predict(model, pixels)[:2]
    truth_c, truth_s = [s.objects[0].color for s in scenes], [s.objects[0].shape for s in scenes]
    return {"color": float(np.mean([a == b for a, b in zip(colors, truth_c)])),
            "shape": float(np.mean([a == b for a, b in zip(kinds, truth_s)])),
            "both": float(np.mean([a == b and c == d for a, b, c, d in zip(colors, truth_c, kinds, truth_s)]))}


def classifier_dir() -> Path:
    return data_path("classifier")


def load(folder: Path | None = None) -> ShapeClassifier:
    """The shipped judge (or one saved in `folder`), in eval mode."""
    path = Path(folder or classifier_dir()) / "classifier.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m "
                                "vlminterp_utils.workshop.train_classifier`, or reinstall the package")
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def card(folder: Path | None = None) -> dict:
    """The judge's training record and held-out accuracy (clean and degraded renders)."""
    return json.loads((Path(folder or classifier_dir()) / "classifier.json").read_text())
