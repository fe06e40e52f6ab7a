"""LatentLens search cost: faiss exact (IndexFlatIP) vs approximate (HNSW) vs a plain torch matmul, as ratios.

A synthetic bank of unit vectors of SmolLM2's width (576) stands in for a large contextual index (a captions
corpus in Colab reaches 10^5-10^6 entries per layer); queries are 4,096 visual tokens (64 images of 64 tokens).
Also reports HNSW's recall@5 against the exact search, and the bank's memory in fp16 (how the index stores it).

Run: python benchmarks/bench_latentlens_search.py [--entries 50000]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from vlminterp_utils.chapters.latentlens import ContextualIndex


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up (builds the faiss index on first use)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.entries, 576), dim=-1).half()
    meta = pd.DataFrame({"token_id": np.zeros(args.entries, int), "token": "x", "word": "x", "sentence": "x",
                         "sentence_id": 0, "position": 0})
    exact = ContextualIndex("synthetic", 576, [1], {1: bank}, meta, cap=0, seed=0)
    approx = ContextualIndex("synthetic", 576, [1], {1: bank}, meta, cap=0, seed=0, approximate=True)
    queries = torch.randn(args.queries, 576)
    matrix = bank.float()

    start = time.perf_counter()
    approx._index(1)
    hnsw_build = time.perf_counter() - start
    t_exact = timed(lambda: exact.search(queries, 5))
    t_approx = timed(lambda: approx.search(queries, 5))
    t_torch = timed(lambda: (torch.nn.functional.normalize(queries, dim=-1) @ matrix.T).topk(5, dim=-1))
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact.search(queries, 5)[1],
                                                                 approx.search(queries, 5)[1])])
    print(f"bank {args.entries} x 576 ({bank.numel() * 2 / 2**20:.0f} MiB fp16), {args.queries} queries, top-5")
    print(f"seconds per search: faiss flat {t_exact:.3f}, faiss HNSW {t_approx:.3f}, torch matmul {t_torch:.3f}")
    print(f"ratios: HNSW is x{t_exact / t_approx:.1f} faster than flat (recall@5 {recall:.2f}, built once in "
          f"{hnsw_build:.0f} s); flat is x{t_torch / t_exact:.2f} the speed of torch matmul")


if __name__ == "__main__":
    main()
