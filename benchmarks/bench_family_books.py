"""Every chapter on a tiny family: one papermill kernel per chapter vs one kernel for all of them, as a ratio.

`make test` executes every chapter on every supported family (ten tiny checkpoints). With a kernel per chapter,
each chapter pays a kernel's start and the imports of torch, transformers and matplotlib again; with one kernel
per family (`tests/test_family_books.py::run_in_one_kernel`, the namespace reset between chapters) they are paid
once. Both run the same chapters with the same parameters, one after the other, on one thread.

Run: python benchmarks/bench_family_books.py [--family qwen2-vl]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_family_books import NOTEBOOKS, run_in_one_kernel  # noqa: E402
from tiny_models import build_tiny_family  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="qwen2-vl")
    args = parser.parse_args()
    import papermill
    os.environ["OMP_NUM_THREADS"] = "1"  # as under pytest-xdist: one thread per worker
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints = []
        for seed in (0, 1):  # chapter 4 compares two models: the same family, another random draw
            model, processor = build_tiny_family(args.family, seed=seed)
            checkpoints.append(tmp / f"checkpoint{seed}")
            model.save_pretrained(checkpoints[-1])
            processor.save_pretrained(checkpoints[-1])

        def parameters_of(notebook: Path) -> dict:
            parameters = {"smoke": True, "model_id": str(checkpoints[0])}
            if "compared_with =" in notebook.read_text():
                parameters["compared_with"] = [str(checkpoints[1])]
            return parameters

        times = {}
        for mode in ("a kernel per chapter", "one kernel"):
            cwd = tmp / mode.replace(" ", "_")
            cwd.mkdir()
            os.environ["VLMINTERP_CACHE"] = str(cwd / "cache")  # each mode builds its caches afresh
            start = time.perf_counter()
            if mode == "one kernel":
                run_in_one_kernel(NOTEBOOKS, parameters_of, cwd)
            else:
                for notebook in NOTEBOOKS:
                    papermill.execute_notebook(str(notebook), str(cwd / notebook.name),
                                               parameters=parameters_of(notebook), cwd=str(cwd),
                                               progress_bar=False, log_output=False)
            times[mode] = time.perf_counter() - start
            print(f"{mode}: {times[mode]:.1f} s for {len(NOTEBOOKS)} chapters on {args.family}")
    print(f"one kernel takes {times['one kernel'] / times['a kernel per chapter']:.2f} of the time")


if __name__ == "__main__":
    main()
