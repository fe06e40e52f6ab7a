"""Run the book's long sweeps in parts, on several processes, GPUs or machines, and merge the parts exactly.

    python -m vlminterp_utils.workshop.sweep ablation --out runs/ --shard 0/2    # and 1/2, anywhere
    python -m vlminterp_utils.workshop.sweep merge ablation --out runs/          # the table one run gives

Sweeps: `ablation` (chapter 1's table), `knockout` (chapter 1's curve), `mimic` (chapter 3's grid), `index`
(chapter 2's contextual index). Under `torchrun --nproc-per-node 4 -m vlminterp_utils.workshop.sweep ...` or
`accelerate launch -m vlminterp_utils.workshop.sweep ...` each process takes its shard from RANK / WORLD_SIZE and
its GPU from LOCAL_RANK; no process talks to another, the parts meet in `--out`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch

from ..chapters import inversion, latentlens, localization
from ..core import shards
from ..core.models import load_vlm
from ..core.storage import atomic_path

SWEEPS = ("ablation", "knockout", "mimic", "index")
CONCEPTS = list(inversion.HELD_OUT_CONCEPTS[:4])  # chapter 3's


def _device(requested: str | None) -> str | None:
    if requested or not torch.cuda.is_available():
        return requested
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"


def run(sweep: str, out: Path, shard: str | None, model: str = "shapes-llava", n: int = 64, seed: int = 0,
        batch_size: int = 16, steps: int | None = None, window: int = 5, device: str | None = None,
        question_suffix: str = "", answer_prefix: str = "") -> Path:
    """Compute one shard of a sweep and write it into `out`; returns the part's path."""
    _, _, adapter = load_vlm(model, device=_device(device))
    if sweep == "ablation":
        spec = localization.AblationSpec(n=n, seed=seed, question_suffix=question_suffix,
                                         answer_prefix=answer_prefix, batch_size=batch_size)
        records = localization.ablation_sweep(adapter, spec, shard=shard)
        return shards.save_table(records, out, sweep, shard)
    if sweep == "knockout":
        spec = localization.KnockoutSpec(n=n, seed=seed, window=window, batch_size=batch_size,
                                         question_suffix=question_suffix, answer_prefix=answer_prefix)
        records = localization.knockout_sweep(adapter, spec, shard=shard)
        return shards.save_table(records, out, sweep, shard)
    if sweep == "mimic":
        base = inversion.InversionConfig(**({"steps": steps} if steps else {}))
        table, images = inversion.ablation_grid(adapter, CONCEPTS, seeds=range(seed, seed + 2), base=base,
                                                shard=shard)
        folder = out / "mimic_images"
        folder.mkdir(parents=True, exist_ok=True)
        for (name, s, color, shape, repeat), image in images.items():
            with atomic_path(folder / f"{name}_{s}_{color}_{shape}_{repeat}.png") as tmp:
                image.save(tmp, format="png")
        return shards.save_table(table, out, sweep, shard)
    if sweep == "index":
        part = latentlens.build_index(adapter, latentlens.load_corpus(), seed=seed, shard=shard)
        return part.save(shards.part_path(out, sweep, shard, suffix=""))
    raise ValueError(f"unknown sweep {sweep!r}: one of {', '.join(SWEEPS)}")


def merge(sweep: str, out: Path, seed: int = 0):
    """The merged result of every part in `out`: the table (or index) one run of the sweep gives."""
    if sweep == "ablation":
        return localization.flip_table(shards.load_tables(out, sweep), seed)
    if sweep == "knockout":
        return localization.knockout_summary(shards.load_tables(out, sweep))
    if sweep == "mimic":
        return shards.load_tables(out, sweep)
    if sweep == "index":
        parts = [latentlens.ContextualIndex.load(p) for p in shards.part_paths(out, sweep, suffix="")]
        return latentlens.merge_parts(parts).save(out / sweep)
    raise ValueError(f"unknown sweep {sweep!r}: one of {', '.join(SWEEPS)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=SWEEPS + ("merge",))
    parser.add_argument("merged", nargs="?", choices=SWEEPS, help="with `merge`: which sweep to merge")
    parser.add_argument("--out", type=Path, required=True, help="folder the parts are written to and merged from")
    parser.add_argument("--shard", default=shards.from_environment(),
                        help="i/n: this part of n (default: RANK/WORLD_SIZE under torchrun, else the whole sweep)")
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--n", type=int, default=64, help="questions per setting (ablation, knockout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="inversion steps (mimic)")
    parser.add_argument("--window", type=int, default=5, help="layers per knockout window (knockout)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--question-suffix", default="", help="e.g. ' Answer with one word.' (real models)")
    parser.add_argument("--answer-prefix", default="", help="e.g. 'It is a' (real models)")
    args = parser.parse_args(argv)
    if args.sweep == "merge":
        if args.merged is None:
            parser.error("say which sweep to merge, e.g. `merge ablation`")
        result = merge(args.merged, args.out, args.seed)
        if isinstance(result, pd.DataFrame):
            with atomic_path(args.out / f"{args.merged}.parquet") as tmp:
                result.to_parquet(tmp, index=False)
            print(result.to_string())
        else:
            print(f"merged index written to {result}")
        return
    path = run(args.sweep, args.out, args.shard, args.model, args.n, args.seed, args.batch_size, args.steps,
               args.window, args.device, args.question_suffix, args.answer_prefix)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
