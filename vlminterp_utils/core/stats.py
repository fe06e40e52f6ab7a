"""The statistics every chapter reports with: flip rates with bootstrap intervals, and normal intervals.

A measured number in this book is reported with a 95% interval, so that a reader can tell an effect from the
noise of a few dozen questions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Z95 = 1.96


def flip_rate(correct_before: Sequence[bool], correct_after: Sequence[bool]) -> float:
    """Share of initially-correct answers that are wrong after the intervention (NaN if none was correct)."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    if not before.any():
        return float("nan")
    return float((~after[before]).mean())


def bootstrap_ci(correct_before, correct_after, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Flip rate with a percentile bootstrap confidence interval over the initially-correct examples."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    return bootstrap_mean(~after[before], n_boot, seed, level)


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` (bools or floats) with a percentile bootstrap interval; NaNs when there are none."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(lo), float(hi)


def proportion_interval(share, n) -> tuple:
    """Normal-approximation 95% interval of a proportion, clipped to [0, 1] (works on arrays and Series)."""
    half = Z95 * np.sqrt(share * (1 - share) / n)
    return np.clip(share - half, 0, 1), np.clip(share + half, 0, 1)


def mean_interval(values) -> tuple[float, float, float]:
    """Mean with a normal-approximation 95% interval (NaN bounds below two values)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = Z95 * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def interval_order(first: tuple[float, float], second: tuple[float, float]) -> str:
    """How two 95% intervals `(low, high)` lie: "higher" when the first lies wholly above the second, "lower"
    when wholly below, else "overlapping" (a difference the run cannot tell from chance)."""
    if first[0] > second[1]:
        return "higher"
    return "lower" if first[1] < second[0] else "overlapping"
