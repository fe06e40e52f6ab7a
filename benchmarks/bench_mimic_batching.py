"""What batching buys MIMIC on this machine: seconds per image and step at several batch sizes, in one run.

Chapter 3 inverts each concept several times per setting in one batch (`ablation_grid(repeats=...)`). On a GPU a
batch costs little more than one image; on a CPU the work grows with the batch, and this script says by how much.

Run: python benchmarks/bench_mimic_batching.py [--batches 1 6 24 48] [--steps 4]
"""
from __future__ import annotations

import argparse
import time

from vlminterp_utils import inversion as V, load_vlm, shapes


def seconds_per_step(adapter, stats, n: int, steps: int) -> float:
    targets, config = ["a red circle"] * n, V.InversionConfig(steps=steps, progress=False)
    V.invert(adapter, shapes.CAPTION_PROMPT, targets, [stats] * n, V.InversionConfig(steps=1, progress=False))
    started = time.perf_counter()  # after a one-step warm-up at this batch size
    V.invert(adapter, shapes.CAPTION_PROMPT, targets, [stats] * n, config)
    return (time.perf_counter() - started) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6, 24, 48])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    _, _, adapter = load_vlm("shapes-llava")
    stats = V.concept_stats(adapter, "red", "circle")
    single = None
    print("| images per batch | s / step | s / image-step | x vs one image at a time |")
    print("| --- | --- | --- | --- |")
    for n in args.batches:
        per_step = seconds_per_step(adapter, stats, n, args.steps)
        single = single or per_step / n
        print(f"| {n} | {per_step:.2f} | {per_step / n:.3f} | x{single / (per_step / n):.2f} |", flush=True)


if __name__ == "__main__":
    main()
