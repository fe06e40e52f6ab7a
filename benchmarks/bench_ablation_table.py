"""Chapter 1's ablation table: every row on its own vs the shared work of `ablation_table`, as a ratio in one run.

Row by row (how the table was computed before): each (method, buffer) row answers the un-ablated questions again
and recomputes the norms and integrated gradients its control ranks tokens by. Shared: the un-ablated answers
once per batch, the scores once per batch and method, reused by every buffer. Both give the same table (the
largest difference is printed; `tests/test_localization.py` checks it too).

Run: python benchmarks/bench_ablation_table.py [--n 16] [--setting vqa]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from vlminterp_utils import interventions as I, load_vlm, localization as L


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--setting", default="vqa")
    args = parser.parse_args()
    _, _, adapter = load_vlm(args.model, device="cpu", dtype=torch.float32)
    mean_token = I.mean_visual_token(adapter)
    buffers = (0, 1, 2)
    start = time.perf_counter()
    shared = L.ablation_table(adapter, L.AblationSpec(settings=(args.setting,), buffers=buffers, n=args.n))
    t_shared = time.perf_counter() - start
    start = time.perf_counter()
    items = L.make_items(args.setting, args.n, 0, adapter.image_size)
    alone = pd.DataFrame([L.ablation_flips(adapter, items, args.setting, m, b, mean_token=mean_token)
                          for b in buffers for m in L.METHODS])
    t_alone = time.perf_counter() - start
    diff = (shared.flip_rate - alone.flip_rate).abs().max()
    print(f"{args.model}, {args.setting}: {args.n} questions x {len(L.METHODS)} controls x {len(buffers)} buffers")
    print(f"row by row {t_alone:.1f} s, shared {t_shared:.1f} s: x{t_alone / t_shared:.2f} faster; "
          f"largest flip-rate difference {diff:.1e}")


if __name__ == "__main__":
    main()
