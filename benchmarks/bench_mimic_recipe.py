"""MIMIC's steps and learning rate: images the independent classifier recognises, all terms vs CE only.

The test `tests/test_inversion.py -k recognisable` runs the default recipe; this script runs any other, on the
same 6 concepts and seed, so the numbers in `InversionConfig`'s docstring can be reproduced.

Run: python benchmarks/bench_mimic_recipe.py [--steps 75] [--lr 0.1] [--seed 0] [--init gray] [--jitter-mode roll]
"""
from __future__ import annotations

import argparse
import time

from vlminterp_utils import inversion as V, load_vlm

CONCEPTS = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "square"),
            ("purple", "circle"), ("red", "triangle")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=V.InversionConfig.steps)
    parser.add_argument("--lr", type=float, default=V.InversionConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=V.INITS, default=V.InversionConfig.init)
    parser.add_argument("--jitter-mode", choices=V.JITTER_MODES, default=V.InversionConfig.jitter_mode)
    args = parser.parse_args(argv)
    _, _, adapter = load_vlm("shapes-llava")
    recipes = {k: V.ABLATIONS[k] for k in ("CE only", "all")}
    started = time.time()
    base = V.InversionConfig(steps=args.steps, lr=args.lr, init=args.init, jitter_mode=args.jitter_mode,
                             progress=False)
    table, _ = V.ablation_grid(adapter, CONCEPTS, seeds=(args.seed,), ablations=recipes, base=base)
    print(table[["ablation", "concept", "classifier", "recognised", "target_probability"]].to_string())
    recognised = table.groupby("ablation").recognised.sum().to_dict()
    print(f"steps {args.steps}, lr {args.lr}, seed {args.seed}, init {args.init}, jitter {args.jitter_mode}: "
          f"recognised of {len(CONCEPTS)} {recognised}, "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
