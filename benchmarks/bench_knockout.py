"""Chapter 1's knockout curve: full re-runs vs knockouts from one cached clean run, as a ratio in one run.

Before: every (knockout, window) was a full forward pass of the whole prompt, vision tower included. Now
(`interventions.CleanRun`): one clean pass per batch, then each knockout re-runs only the positions from its first
blocked query on, through the layers from its window's first layer on. Both paths compute the same curve; the
largest difference between them is printed next to the times.

Run: python benchmarks/bench_knockout.py [--items 16] [--window 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from vlminterp_utils import interventions as I, load_vlm, localization as L
from vlminterp_utils.core import readout


def full_rerun_curve(adapter, items, windows) -> dict:
    """The knockout curve as it was computed before: one full forward pass per knockout and window."""
    batch = L.batch_of(adapter, items)
    with torch.no_grad():
        clean = readout.answer_logits(adapter, batch)
    answers, _ = L.models_own_answer(adapter, clean, items)
    drops = {}
    for name, block in L.knockout_blocks(adapter, items, batch).items():
        for w in windows:
            with torch.no_grad(), I.attention_knockout(adapter, block, w):
                drops[name, w[0]] = L.answer_probability(readout.answer_logits(adapter, batch), answers)
    return drops


def cached_curve(adapter, items, windows) -> dict:
    batch = L.batch_of(adapter, items)
    clean = I.CleanRun(adapter, batch)
    answers, _ = L.models_own_answer(adapter, clean.logits, items)
    return {(name, w[0]): L.answer_probability(clean.answer_logits(block, w), answers)
            for name, block in L.knockout_blocks(adapter, items, batch).items() for w in windows}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    _, _, adapter = load_vlm(args.model, device="cpu", dtype=torch.float32)
    items = L.make_items("vqa", args.items, 0, adapter.image_size)
    windows = I.layer_windows(adapter.n_layers, args.window)
    with torch.no_grad():  # warm-up: the first forward pass of a process pays for allocations, not measured
        adapter.model(**L.batch_of(adapter, items))
    times, curves = {}, {}
    for name, fn in (("cached", cached_curve), ("full", full_rerun_curve)):
        start = time.perf_counter()
        curves[name] = fn(adapter, items, windows)
        times[name] = time.perf_counter() - start
    diff = max((curves["cached"][k] - curves["full"][k]).abs().max().item() for k in curves["full"])
    print(f"{args.model}: {args.items} questions, 3 knockouts x {len(windows)} windows of {args.window} layers")
    print(f"full re-runs {times['full']:.1f} s, cached clean run {times['cached']:.1f} s: "
          f"x{times['full'] / times['cached']:.1f} faster; largest probability difference {diff:.1e}")


if __name__ == "__main__":
    main()
