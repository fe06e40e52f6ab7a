"""Execute every chapter with papermill, then build the Jupyter Book into _build/html.

The source notebooks stay clean (no outputs in git): executed copies go to a staging folder together with the
book's pages and config, and the book is built from there with execution switched off (papermill already ran).
`--smoke` passes `smoke=True` to every notebook: small numbers, CPU-friendly, what CI runs.
"""
from __future__ import annotations

import argparse
import hashlib
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
from vlminterp_utils.core.storage import atomic_path, write_text

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "_build" / "stage"
# Executed chapters, kept between builds: a chapter runs again only when what it computes from changes
# (`execution_key`); editing prose, in a page or in a chapter's markdown cells, re-executes nothing.
EXECUTED = ROOT / "_build" / "executed"
# Environment switches that change what a chapter computes (where SmolLM2 comes from); the cache's location does not.
ENVIRONMENT = ("VLMINTERP_SMOLLM2",)


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


def write_student_editions(notebooks: list[Path], folder: Path) -> list[Path]:
    """Each chapter's student edition (`buildit.student_edition`: no solutions, no outputs), made from the source
    notebook, where the chapters' pages link it (`student/<chapter>.ipynb` beside them)."""
    from vlminterp_utils.chapters.buildit import student_edition
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for nb in notebooks:
        edition = student_edition(json.loads(nb.read_text()))
        written.append(folder / nb.name)
        write_text(written[-1], json.dumps(edition, indent=1, ensure_ascii=False) + "\n")  # atomic
    return written


def execution_key(nb: Path, smoke: bool, root: Path = ROOT) -> str:
    """What an executed chapter was computed from, hashed: its code cells and the order of all its cells (not the
    markdown's text), the mode, every module of the package, every file of its data, the versions of torch and
    transformers, and the environment switches the package reads (`ENVIRONMENT`). The same key means the same
    outputs, up to the machine's arithmetic."""
    from importlib.metadata import version

    from vlminterp_utils.core.storage import sha256_of
    source = json.loads(nb.read_text())
    digest = hashlib.sha256(json.dumps({
        "cells": [(c["cell_type"], c.get("id"), "".join(c["source"]) if c["cell_type"] == "code" else "")
                  for c in source["cells"]],
        "smoke": smoke, "versions": [version("torch"), version("transformers")],
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT}}).encode())
    for folder, pattern in (("vlminterp_utils", "*.py"), ("data", "*")):
        for path in sorted(p for p in (root / folder).rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{path.relative_to(root)}:{sha256_of(path)}".encode())
    return digest.hexdigest()[:20]


def with_fresh_prose(executed: dict, source: dict) -> dict:
    """An executed chapter with the markdown of its source: a prose edit needs no run (the cells are matched by
    id; the key guarantees that the same cells, in the same order, were executed)."""
    prose = {c.get("id"): c["source"] for c in source["cells"] if c["cell_type"] == "markdown"}
    for cell in executed["cells"]:
        if cell["cell_type"] == "markdown" and cell.get("id") in prose:
            cell["source"] = prose[cell["id"]]
    return executed


def execute(nb: Path, smoke: bool) -> str:
    """Execute one chapter into the stage, with the files it writes beside itself, or take it from the execution
    cache when nothing it is computed from has changed (`execution_key`)."""
    started = time.time()
    mode = "smoke" if smoke else "full"
    cached = EXECUTED / f"{nb.stem}-{mode}-{execution_key(nb, smoke)}"
    if not (cached / nb.name).exists():
        work = STAGE / "runs" / nb.stem  # the chapter's own folder: its figures and viewers, nobody else's
        work.mkdir(parents=True)
        # A stalled kernel fails the build instead of hanging it. In full mode one cell may run long on a CPU:
        # chapter 3's ablation grid (24 inversions per setting) takes about 45 minutes on 2 cores.
        papermill.execute_notebook(str(nb), str(work / nb.name), parameters={"smoke": smoke}, cwd=str(work),
                                   progress_bar=False, log_output=False,
                                   execution_timeout=1800 if smoke else 4 * 3600)
        executed = json.loads((work / nb.name).read_text())
        hide_injected_parameters(executed)
        write_text(work / nb.name, json.dumps(executed, indent=1, ensure_ascii=False) + "\n")
        for old in EXECUTED.glob(f"{nb.stem}-{mode}-*"):  # one executed copy per chapter and mode
            shutil.rmtree(old)
        with atomic_path(cached, folder=True) as tmp:  # never a half-written cache entry
            shutil.copytree(work, tmp, dirs_exist_ok=True)
        verb = "executed"
    else:
        verb = "reused"
    shutil.copytree(cached, STAGE / "notebooks", dirs_exist_ok=True)
    staged = STAGE / "notebooks" / nb.name
    fresh = with_fresh_prose(json.loads(staged.read_text()), json.loads(nb.read_text()))
    write_text(staged, json.dumps(fresh, indent=1, ensure_ascii=False) + "\n")  # atomic: never half-written
    return f"{verb} {nb.name} (smoke={smoke}) in {time.time() - started:.0f} s"


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
    editions = write_student_editions(notebooks, ROOT / "_build" / "html" / "notebooks" / "student")
    print(f"student editions: {', '.join(str(p.relative_to(ROOT)) for p in editions)}")
    print(f"book: {ROOT / '_build' / 'html' / 'index.html'}")


if __name__ == "__main__":
    main()
