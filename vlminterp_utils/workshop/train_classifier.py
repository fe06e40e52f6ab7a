"""Train chapter 3's independent judge (`python -m vlminterp_utils.workshop.train_classifier`).

A small CNN learns to name the colour and shape of rendered one-object scenes; it never sees the VLM. Inverted
images are never crisp renders, so the training images are blurred, noised and dimmed at random: a judge trained on
clean renders only calls a slightly blurred red circle a "red square" and a slightly noisy one "green".
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..chapters.classifier import (DEGRADED, ShapeClassifier, accuracy, classifier_dir, degrade, labels,
                                   one_object_scenes, to_pixels)
from ..core.storage import atomic_path, write_json

TRAIN_SEED = 30_000


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0 to 2.5 px), noise (std 0 to 0.1) and brightness/contrast per image; hue untouched."""
    out = []
    for image in pixels:
        sigma, noise, gain, shift = (torch.rand(4, generator=generator) * torch.tensor([2.5, 0.1, 0.4, 0.2])).tolist()
        image = (image - 0.5) * (0.8 + gain) + 0.5 + (shift - 0.1)
        out.append(degrade(image[None].clamp(0, 1), sigma, noise, generator)[0])
    return torch.stack(out)


def train(steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, seed: int = TRAIN_SEED) -> tuple:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    started = time.time()
    bar = tqdm(range(steps), desc="training the shape classifier")
    for step in bar:
        model.train()
        scenes = one_object_scenes(batch_size, seed + step)
        color, kind = labels(scenes)
        pc, ps = model(augment(to_pixels([s.image for s in scenes]), generator))
        loss = F.cross_entropy(pc, color) + F.cross_entropy(ps, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model, {"steps": steps, "batch_size": batch_size, "augmentation": augment.__doc__,
                   "wall_time_s": time.time() - started}


def save(model: ShapeClassifier, meta: dict, folder: Path) -> None:
    with atomic_path(Path(folder) / "classifier.safetensors") as tmp:
        save_file(model.state_dict(), str(tmp))
    write_json(Path(folder) / "classifier.json", meta)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the independent shape classifier of chapter 3")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=str(classifier_dir()))
    args = parser.parse_args(argv)
    model, meta = train(args.steps)
    meta["held_out_accuracy"] = accuracy(model)
    meta["held_out_accuracy_degraded"] = {"sigma": DEGRADED[0], "noise": DEGRADED[1], **accuracy(model, sigma=DEGRADED[0],
                                                                                                noise=DEGRADED[1])}
    print(json.dumps(meta, indent=2))
    save(model, meta, Path(args.out))


if __name__ == "__main__":
    main()
