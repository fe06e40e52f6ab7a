"""Execute every chapter with papermill, then build the Jupyter Book into _build/html.

The source notebooks stay clean (no outputs in git): executed copies go to a staging folder together with the
book's pages and config, and the book is built from there with execution switched off (papermill already ran).
`--smoke` passes `smoke=True` to every notebook: small numbers, CPU-friendly, what CI runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import papermill

from vlminterp_utils.chapters.plotting import FIGURES
from vlminterp_utils.core.storage import write_text

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "_build" / "stage"


def hide_injected_parameters(nb: dict) -> None:
    """Tag papermill's injected-parameters cell `remove-cell`: the web page shows the reader's parameters cell."""
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")


def publish_chapter_files(executed: Path, html: Path) -> list[Path]:
    """Copy what the chapters wrote next to themselves (standalone viewers `*.html`, `figures/` for slides) to
    their pages' folder in the web book, where the chapters link them by relative paths."""
    html.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in sorted(executed.iterdir()):
        if item.suffix == ".html":
            copied.append(Path(shutil.copy2(item, html / item.name)))
        elif item.is_dir() and item.name == FIGURES:
            shutil.copytree(item, html / item.name, dirs_exist_ok=True)
            copied.append(html / item.name)
    return copied


def execute(nb: Path, smoke: bool) -> str:
    started = time.time()
    out = STAGE / "notebooks" / nb.name
    # A stalled kernel fails the build instead of hanging it. In full mode one cell may run long on a CPU:
    # chapter 3's ablation grid (24 inversions per setting) takes about 45 minutes on 2 cores.
    papermill.execute_notebook(str(nb), str(out), parameters={"smoke": smoke},
                               cwd=str(STAGE / "notebooks"), progress_bar=False, log_output=False,
                               execution_timeout=1800 if smoke else 4 * 3600)
    executed = json.loads(out.read_text())
    hide_injected_parameters(executed)
    write_text(out, json.dumps(executed, indent=1, ensure_ascii=False) + "\n")  # atomic: never half-written
    return f"executed {nb.name} (smoke={smoke}) in {time.time() - started:.0f} s"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run every notebook with smoke=True")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks executed side by side, one thread each (default: 2 with --smoke, else 1)")
    parser.add_argument("notebooks", nargs="*", help="only these notebooks (default: all in notebooks/)")
    args = parser.parse_args(argv)
    if STAGE.exists():
        shutil.rmtree(STAGE)
    (STAGE / "notebooks").mkdir(parents=True)
    for item in ("_config.yml", "_toc.yml", "_static", "book"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, STAGE / item)
    notebooks = [Path(n) for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    # Smoke chapters are short and end close together: two side by side, one thread each. In full, one chapter
    # (MIMIC) outlasts the others by far and would be left on one thread: one at a time, all threads.
    args.jobs = args.jobs or (2 if args.smoke else 1)
    if args.jobs > 1:  # kernels side by side, one thread each: the cores are shared, not oversubscribed
        os.environ["OMP_NUM_THREADS"] = "1"
    # Processes, not threads: papermill's `cwd` is a process-wide chdir, and two threads racing on it started a
    # kernel in the repository root, where its chapter wrote its figures and viewer instead of next to itself.
    # Later chapters run longer (MIMIC last): started first, the short ones fill in beside them.
    order = sorted(notebooks, key=lambda nb: nb.name, reverse=True) if args.jobs > 1 else notebooks
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(execute, order, [args.smoke] * len(order)):
            print(result, flush=True)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    # -W: a warning fails the build, e.g. a number the prose quotes that the run did not glue.
    subprocess.run([str(jupyter_book), "build", str(STAGE), "--path-output", str(ROOT), "-W", "--keep-going"],
                   check=True)
    published = publish_chapter_files(STAGE / "notebooks", ROOT / "_build" / "html" / "notebooks")
    print(f"published with the chapters: {', '.join(p.name for p in published) or 'nothing'}")
    print(f"book: {ROOT / '_build' / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
