"""The seminar kit: how long a chapter takes, and the check functions of its exercises.

A check function takes the student's answer and the objects of the run it is about, computes the true answer
from them (never a stored constant, so it stays right on any model), and prints whether the answer is right,
with a hint when it is not. It returns True or False, or None while the answer is still a placeholder, so a
chapter executed unattended (papermill, CI) runs through its exercise cells.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import buildit, report

WORDS_PER_MINUTE = 200  # a common estimate for technical reading; the time to run the code is measured


class Clock:
    """Started in a chapter's first cell; `minutes` is the wall time since."""

    def __init__(self):
        self.started = time.perf_counter()

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60


def reading_minutes(notebook: str | Path) -> float:
    """Estimated reading time of a notebook's prose (markdown cells) at WORDS_PER_MINUTE."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    words = sum(len("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    return words / WORDS_PER_MINUTE


def glue_timings(prefix: str, clock: Clock, notebook: str | Path, device, smoke: bool) -> dict:
    """Glue the chapter's run time, reading time, device and mode for the time line at its top."""
    path = Path(notebook)
    values = {
        f"{prefix}_run_minutes": clock.minutes,
        # Outside the book build (Colab) the notebook may not sit in the working directory.
        f"{prefix}_read_minutes": reading_minutes(path) if path.exists() else float("nan"),
        f"{prefix}_run_device": str(device),
        f"{prefix}_run_mode": "smoke" if smoke else "full",
        # the minutes the chapter's build-it exercises ask for, from their tags
        f"{prefix}_buildit_minutes": buildit.chapter_minutes(int(number)) if (number := prefix[2:]).isdigit() else 0,
    }
    run, read, mode = (values[f"{prefix}_{key}"] for key in ("run_minutes", "read_minutes", "run_mode"))
    print(f"This run: {run:.1f} min on {device} ({mode} mode); reading: about {read:.0f} min.")
    return report.glue_all(values)


# ---------------------------------------------------------------------------------------------- checking

def verdict(answer, truth, *, tolerance: float | None = None, hint: str = "") -> bool | None:
    """Print and return whether `answer` matches `truth` (within `tolerance` for numbers); None for no answer.

    `truth` may be a list of answers that are all right (a tie)."""
    if answer is None:
        print("Replace `answer = None` with your answer, then run this cell again.")
        return None
    accepted = truth if isinstance(truth, list) else [truth]
    if tolerance is not None:
        right = any(abs(float(answer) - float(t)) <= tolerance for t in accepted)
    else:
        right = str(answer).strip().lower() in [str(t).strip().lower() for t in accepted]
    if right:
        print(f"Right: {' or '.join(map(str, accepted))}.")
    else:
        print(f"Not yet: {answer!r} is not the answer. {hint}".rstrip())
    return right


# Chapter 0: anatomy of a VLM

def check_visual_token_count(answer, adapter, batch) -> bool | None:
    """How many visual tokens does the LLM receive for one image?"""
    truth = int(adapter.visual_positions(batch["input_ids"])[0].numel())
    return verdict(answer, truth, hint="Count the positions where input_ids == image_token_id.")


def check_first_visual_position(answer, adapter, batch) -> bool | None:
    """At which sequence position does the first visual token sit (counting from 0)?"""
    truth = int(adapter.visual_positions(batch["input_ids"])[0][0])
    return verdict(answer, truth, hint="The chat header comes before the image; look at the token strip.")


def check_llm_share(answer, sizes: dict[str, int]) -> bool | None:
    """Which share of the parameters does the language model hold? (a fraction, to within 0.01)"""
    truth = round(sizes["language model"] / sum(sizes.values()), 3)
    return verdict(answer, truth, tolerance=0.01, hint="Divide the LLM's count by the sum of all three parts.")


# Chapter 1: visual token localization

def check_selection_size(answer, adapter, mask: np.ndarray, buffer: int) -> bool | None:
    """How many visual tokens does an object's selection hold at a given buffer?"""
    truth = int(adapter.object_tokens(mask, buffer=buffer).sum())
    return verdict(answer, truth, hint="Each buffer step adds the ring of cells around the previous selection.")


def check_stronger_ablation(answer, table, setting: str, buffer: int) -> bool | None:
    """Which token selection flipped the most answers in this run (setting, buffer, mean ablation)?"""
    rows = table[(table.setting == setting) & (table.buffer == buffer) & (table["mode"] == "mean")].dropna(
        subset=["flip_rate"])
    if rows.empty:  # a flip rate needs answers that were right before the ablation
        print(f"This run measured no flip rate for {setting} at buffer {buffer}: the model answered none of its "
              "questions right before ablation. Run with more items, or on a trained model.")
        return None
    leaders = list(rows.method[rows.flip_rate == rows.flip_rate.max()])
    return verdict(answer, leaders, hint=f"Read the `flip_rate` column for {setting}, buffer {buffer}.")


# Chapter 2: LogitLens vs LatentLens

def check_best_layer(answer, table, lens: str) -> bool | None:
    """At which LLM layer does a lens interpret the largest share of visual tokens in this run?"""
    peaks = [int(layer) for layer in table.index[table[lens] == table[lens].max()]]
    return verdict(answer, peaks, hint=f"Find the peak of the {lens} curve; a tie accepts every peak layer.")


def check_index_entries(answer, index, token: str) -> bool | None:
    """How many stored contexts (at one layer) does a token string have in the index?"""
    truth = int((index.metadata.token == token).sum())
    return verdict(answer, truth, hint="Contexts per token string are capped by `cap`; the corpus may hold fewer.")


# Chapter 3: MIMIC

def check_statistics_size(answer, stats: dict) -> bool | None:
    """How many numbers does feature alignment match per concept (means and variances, all layers)?"""
    truth = int(sum(v.numel() for v in stats.values()))
    return verdict(answer, truth, hint="Layers x channels, once for the means and once for the variances.")


def check_best_recipe(answer, summary) -> bool | None:
    """Which row of the ablation grid produced the most recognisable images in this run?"""
    leaders = list(summary.index[summary.recognised == summary.recognised.max()])
    return verdict(answer, leaders, hint="Sort the summary by `recognised`; a tie accepts every leader.")


def check_most_moved_module(answer, sizes) -> bool | None:
    """Chapter 4: the linear module (e.g. "k_proj") whose LoRA updates are largest relative to its weights, on
    average over layers."""
    truth = sizes.groupby("module").relative_update.mean().idxmax() if len(sizes) else None
    return verdict(answer, truth, hint="average `relative_update` per module: sizes.groupby('module')")


def check_layers_clearly_higher(answer, numbers: dict) -> bool | None:
    """Chapter 4: the number of layers where the tuned model's logit lens is clearly higher than the base's, by
    the paired comparison of the same patches (`comparison.paired_lens_difference`)."""
    return verdict(answer, numbers["logit_higher_layers"], hint="numbers['logit_higher_layers'] holds it")
