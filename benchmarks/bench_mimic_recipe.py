"""MIMIC's steps and learning rate: images the independent classifier recognises, all terms vs CE only.

The test `tests/test_inversion.py -k recognisable` runs the default recipe; this script runs any other, on the
same 6 tuning concepts (`inversion.TUNING_CONCEPTS`) and seed, so the numbers in `InversionConfig`'s docstring can
be reproduced. `--concepts held-out` runs the first six of the concepts the chapter reports on
(`inversion.HELD_OUT_CONCEPTS`), which were never used to choose the recipe.

`--weights feature=2,patch=15` scales the prior weights of the "all" recipe (the CE-only recipe has none), to
choose them on the tuning concepts; `--only-all` skips the CE-only recipe when only the weights change.

Run: python benchmarks/bench_mimic_recipe.py [--steps 75] [--lr 0.1] [--seed 0] [--init gray] [--jitter-mode roll]
     [--concepts tuning|held-out] [--weights name=value,...] [--only-all]
"""
from __future__ import annotations

import argparse
import time

from vlminterp_utils import inversion as V, load_vlm

CONCEPTS = {"tuning": list(V.TUNING_CONCEPTS), "held-out": list(V.HELD_OUT_CONCEPTS[:6]),
            "chapter": list(V.HELD_OUT_CONCEPTS[:4])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=V.InversionConfig.steps)
    parser.add_argument("--lr", type=float, default=V.InversionConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=V.INITS, default=V.InversionConfig.init)
    parser.add_argument("--jitter-mode", choices=V.JITTER_MODES, default=V.InversionConfig.jitter_mode)
    parser.add_argument("--concepts", choices=tuple(CONCEPTS), default="tuning")
    parser.add_argument("--repeats", type=int, default=1, help="inversions per concept and recipe")
    parser.add_argument("--weights", default="", help="prior weights of the 'all' recipe, e.g. feature=2,patch=15")
    parser.add_argument("--only-all", action="store_true", help="run the 'all' recipe alone")
    args = parser.parse_args(argv)
    concepts = CONCEPTS[args.concepts]
    weights = {k: float(v) for k, v in (item.split("=") for item in args.weights.split(",") if item)}
    unknown = set(weights) - {"feature", "patch", "tv_l1", "tv_l2", "l2"}
    if unknown:
        parser.error(f"unknown prior weights {sorted(unknown)}: use feature, patch, tv_l1, tv_l2 or l2")
    _, _, adapter = load_vlm("shapes-llava")
    recipes = {k: V.ABLATIONS[k] for k in (("all",) if args.only_all else ("CE only", "all"))}
    started = time.time()
    base = V.InversionConfig(steps=args.steps, lr=args.lr, init=args.init, jitter_mode=args.jitter_mode,
                             progress=False, **weights)
    table, _ = V.ablation_grid(adapter, concepts, seeds=(args.seed,), ablations=recipes, base=base,
                               repeats=args.repeats)
    print(table[["ablation", "concept", "repeat", "classifier", "recognised", "target_probability"]].to_string())
    recognised = table.groupby("ablation").recognised.sum().to_dict()
    print(f"steps {args.steps}, lr {args.lr}, seed {args.seed}, init {args.init}, jitter {args.jitter_mode}, "
          f"weights {weights or 'default'}: "
          f"{args.concepts} concepts, recognised of {len(concepts) * args.repeats} {recognised}, "
          f"{time.time() - started:.0f} s")
    # the chapter's statistics on the same table: clustered intervals, the judge's chance, the paired verdict
    print(V.recognition_summary(table, "ablation")[["recognised", "ci_low", "ci_high", "chance", "n"]].round(3))
    if not args.only_all:
        paired = V.paired_recipes(table, "all", "CE only")
        print("all minus CE only, paired, concepts resampled:",
              {k: round(v, 3) if isinstance(v, float) else v for k, v in paired.items()})


if __name__ == "__main__":
    main()
