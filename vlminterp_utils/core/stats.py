"""The statistics every chapter reports with, in one place.

A measured number in this book is a comparison, made on one common set of items:
  - a proportion (a flip rate, a share of recognised images) gets an exact Clopper-Pearson interval, never the
    zero-width interval a bootstrap gives for 0 of 24; where its units are correlated (patches of one image,
    inversions of one concept) the interval is widened by the design effect of those clusters (Korn & Graubard);
  - two conditions measured on the same items are compared *paired*: for two yes/no outcomes per item, the exact
    McNemar test and Tango's score interval of the difference (on an effective sample size for clustered items);
    for other values, a bootstrap that resamples the shared units (items, or clusters of them);
  - "no effect" is claimed only by an equivalence test against a stated margin (two one-sided tests); without it
    the verdict is "cannot tell".

scipy supplies the exact binomial machinery; nothing here re-derives a distribution.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

LEVEL = 0.95
HIGHER, LOWER, EQUIVALENT, CANNOT_TELL = "higher", "lower", "equivalent", "cannot tell"  # a paired verdict
PAIRED_FIELDS = ("n", "difference", "ci_low", "ci_high", "verdict")  # what a table of paired comparisons keeps


def pairs(long: pd.DataFrame, index, column: str, value: str, first, second) -> pd.DataFrame:
    """The units measured under both `first` and `second` (two values of `column` in a long table), side by side:
    one row per unit (`index`: a column or a list of them), the columns `first` and `second` holding `value`.
    Units measured under only one leave; none is left when either was never measured. Every paired comparison of
    the book starts here, so that its two numbers come from one common set of items."""
    chosen = long[long[column].isin([first, second])]
    wide = chosen.pivot_table(index=index, columns=column, values=value, aggfunc="first")
    return wide.reindex(columns=[first, second]).dropna()


def pick(table: pd.DataFrame, **equal) -> pd.Series:
    """The first row of a table of paired comparisons whose columns equal `equal`, or, where none does (a model
    that answered nothing right has nothing to pair), a row of NaNs that says "cannot tell"."""
    rows = table
    for column, value in equal.items():
        rows = rows[rows[column] == value]
    if len(rows):
        return rows.iloc[0]
    return pd.Series({c: np.nan for c in table.columns} | equal | {"verdict": CANNOT_TELL})


def paired_row(test: dict) -> dict:
    """The `PAIRED_FIELDS` of a `paired_difference` result, for one row of a table."""
    return {k: test[k] for k in PAIRED_FIELDS}


def flip_rate(correct_before: Sequence[bool], correct_after: Sequence[bool]) -> float:
    """Share of initially-correct answers that are wrong after the intervention (NaN if none was correct)."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    if not before.any():
        return float("nan")
    return float((~after[before]).mean())


# ---------------------------------------------------------------------------------------------- proportions

def proportion_ci(successes, n, level: float = LEVEL, method: str = "exact") -> tuple:
    """Interval of a proportion `successes / n`: "exact" (Clopper-Pearson) or "wilson"; NaNs where n is 0.

    Works on scalars and on arrays (element-wise), and on non-integer counts (an effective sample size).
    0 of 24 gives [0, 0.142], not [0, 0]."""
    k, n = (np.asarray(x, float) for x in (successes, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "exact":
            a = 1 - level
            low = np.where(k > 0, sps.beta.ppf(a / 2, k, n - k + 1), 0.0)
            high = np.where(k < n, sps.beta.ppf(1 - a / 2, k + 1, n - k), 1.0)
        elif method == "wilson":
            z, p = sps.norm.ppf((1 + level) / 2), k / n
            centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
            half = z / (1 + z ** 2 / n) * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
            low, high = centre - half, centre + half
        else:
            raise ValueError(f"unknown interval method {method!r}; choose 'exact' or 'wilson'")
    low, high = np.where(n > 0, low, np.nan), np.where(n > 0, high, np.nan)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def share_ci(values, level: float = LEVEL) -> tuple[float, float, float]:
    """The share of true values with its exact interval: (share, low, high); NaNs when there are none."""
    values = np.asarray(values, bool)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = proportion_ci(int(values.sum()), values.size, level)
    return float(values.mean()), low, high


def flip_ci(correct_before, correct_after, level: float = LEVEL) -> tuple[float, float, float]:
    """Flip rate among the initially-correct answers, with its exact interval."""
    before, after = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    return share_ci(~after[before], level)


def design_effect(values, clusters) -> float:
    """Kish's design effect of a share measured on clustered units: the variance of the share with clusters
    resampled whole, over its variance were the units independent; at least 1 (1 where it cannot be estimated:
    one cluster, or a share of 0 or 1)."""
    values = np.asarray(values, float)
    codes = np.unique(np.asarray(clusters), return_inverse=True)[1]
    p, n, g = values.mean(), values.size, codes.max(initial=-1) + 1
    if g < 2 or p in (0.0, 1.0):
        return 1.0
    sums, sizes = np.bincount(codes, values), np.bincount(codes)  # (clusters,) hits and units per cluster
    # ratio-estimator variance of the share under cluster sampling, with the usual g / (g - 1) correction
    clustered = g / (g - 1) * np.sum((sums - p * sizes) ** 2) / n ** 2
    return float(max(1.0, clustered / (p * (1 - p) / n)))


def clustered_share_ci(values, clusters, level: float = LEVEL) -> tuple[float, float, float]:
    """Share with an exact interval widened for clustered units (Korn & Graubard 1998): Clopper-Pearson on the
    effective sample size n / design effect. Patches of one image, or inversions of one concept, are clusters."""
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    n_eff = values.size / design_effect(values, clusters)
    p = float(values.mean())
    low, high = proportion_ci(p * n_eff, n_eff, level)
    return p, low, high


# ---------------------------------------------------------------------------------------------- paired comparisons

def mcnemar_exact(first, second) -> dict:
    """Exact McNemar test of two yes/no outcomes on the same items: `only_first` and `only_second` count the
    discordant items, `p_value` is the two-sided binomial test of them against an even split."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes need one common item set: got {first.shape} and {second.shape}")
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c).pvalue)
    return {"only_first": b, "only_second": c, "n": first.size, "p_value": p}


def paired_bootstrap(first, second, clusters=None, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of mean(first) - mean(second), resampling whole clusters of paired units (each unit
    its own cluster by default). `first[i]` and `second[i]` were measured on the same unit i."""
    first, second = np.asarray(first, float), np.asarray(second, float)
    if first.shape != second.shape:
        raise ValueError(f"paired values need one common item set: got {first.shape} and {second.shape}")
    clusters = np.arange(first.size) if clusters is None else np.asarray(clusters)
    labels, codes = np.unique(clusters, return_inverse=True)
    diff_sum = np.bincount(codes, first - second, len(labels))  # (clusters,) summed paired differences
    size = np.bincount(codes, minlength=len(labels)).astype(float)
    pick = np.random.default_rng(seed).integers(0, len(labels), size=(n_boot, len(labels)))
    return diff_sum[pick].sum(1) / size[pick].sum(1)  # (n_boot,) a resampled mean difference each


def paired_difference(first, second, clusters=None, margin: float | None = None, n_boot: int = 2000,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """mean(first) - mean(second) on one common set of units, with its 95% interval and the verdict (`compare`).

    Yes/no outcomes (0/1 values): Tango's score interval for paired proportions (`tango_interval`), on an
    effective sample size when the units come in clusters; without clusters the verdict on a difference is the
    exact McNemar test (`compare_binary`). Other values: a bootstrap that resamples the units, or whole clusters.
    "Equivalent" needs the (2 * level - 1) interval inside (-margin, margin): two one-sided tests."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(f"paired values need one common item set: got {first.shape} and {second.shape}")
    if first.size == 0:
        return {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                "p_value": float("nan"), "verdict": CANNOT_TELL}
    out = {"difference": float(first.astype(float).mean() - second.astype(float).mean()), "n": int(first.size),
           "p_value": float("nan")}
    if _is_binary(first) and _is_binary(second):
        first, second = first.astype(bool), second.astype(bool)
        deff = 1.0 if clusters is None else paired_design_effect(first, second, clusters, n_boot, seed)
        low, high = tango_interval(first, second, level, deff)
        tost = tango_interval(first, second, 2 * level - 1, deff)
        if clusters is None:  # the exact test decides a difference; the interval says how large
            return {**out, "ci_low": low, "ci_high": high, **compare_binary(first, second, margin, level)}
        return {**out, "ci_low": low, "ci_high": high, "verdict": compare(low, high, margin, tost)}
    boot = paired_bootstrap(first, second, clusters, n_boot, seed)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    tost = np.quantile(boot, [1 - level, level])
    return {**out, "ci_low": float(low), "ci_high": float(high),
            "verdict": compare(low, high, margin, tuple(tost))}


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0, 1)).all())


def tango_interval(first, second, level: float = LEVEL, design_effect: float = 1.0) -> tuple[float, float]:
    """Tango's (1998) score interval for the difference of two paired proportions, P(first) - P(second).

    It never collapses to a point: 0 discordant pairs of n still give a width that shrinks with n. With a
    `design_effect` above 1 (clustered pairs) the counts are divided by it, an effective sample size."""
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    n = first.size / design_effect
    b, c = (first & ~second).sum() / design_effect, (~first & second).sum() / design_effect
    z = sps.norm.ppf((1 + level) / 2)

    def score(delta):  # Tango's statistic for H0: difference = delta; falls as delta grows
        a, bb, cc = 2 * n, -b - c + (2 * n - b + c) * delta, -c * delta * (1 - delta)
        p21 = (-bb + np.sqrt(max(bb ** 2 - 4 * a * cc, 0.0))) / (2 * a)  # restricted MLE of P(second only)
        variance, excess = n * (2 * p21 + delta * (1 - delta)), b - c - n * delta
        if excess == 0 or variance <= 0:  # at the estimate, or at a bound no data can reach
            return float(np.sign(excess)) * np.inf if excess else 0.0
        return excess / np.sqrt(variance)

    estimate = (b - c) / n
    edge = 1 - 1e-12
    low = -1.0 if score(-edge) <= z else brentq(lambda d: score(d) - z, -edge, estimate)
    high = 1.0 if score(edge) >= -z else brentq(lambda d: score(d) + z, estimate, edge)
    return float(low), float(high)


def paired_design_effect(first, second, clusters, n_boot: int = 2000, seed: int = 0) -> float:
    """How much clustering inflates the variance of a paired difference: its variance with whole clusters
    resampled over its variance with the pairs resampled one by one; at least 1 (1 where neither varies)."""
    clustered = paired_bootstrap(first, second, clusters, n_boot, seed).var()
    alone = paired_bootstrap(first, second, None, n_boot, seed).var()
    return float(max(1.0, clustered / alone)) if alone > 0 else 1.0


def compare(ci_low: float, ci_high: float, margin: float | None = None,
            tost_interval: tuple[float, float] | None = None) -> str:
    """The verdict on a paired difference from its interval: "equivalent" when a `margin` is stated and the TOST
    interval (the 90% interval for a 95% claim; the 95% one if none is given) lies within (-margin, margin), even
    if it also excludes 0 (a difference too small to matter is no effect); else "higher" or "lower" when the
    interval excludes 0; otherwise "cannot tell". Without a margin nothing is called equivalent."""
    if np.isnan(ci_low) or np.isnan(ci_high):
        return CANNOT_TELL
    low, high = tost_interval or (ci_low, ci_high)
    if margin is not None and -margin < low and high < margin:
        return EQUIVALENT
    if ci_low > 0:
        return HIGHER
    return LOWER if ci_high < 0 else CANNOT_TELL


def compare_binary(first, second, margin: float | None = None, level: float = LEVEL) -> dict:
    """The verdict on two yes/no outcomes per item: "equivalent" when a `margin` is stated and the exact one-sided
    upper bound on the share of discordant items (which bounds |difference| from above) is below it (0 discordant
    items of 24 bound it at 12%, so 24 items never show equivalence within 5 points); else exact McNemar decides a
    difference; otherwise "cannot tell"."""
    test = mcnemar_exact(first, second)
    discordant = test["only_first"] + test["only_second"]
    bound = sps.binomtest(discordant, test["n"], alternative="less").proportion_ci(level).high
    if margin is not None and bound < margin:
        verdict = EQUIVALENT
    elif test["p_value"] < 1 - level:
        verdict = HIGHER if test["only_first"] > test["only_second"] else LOWER
    else:
        verdict = CANNOT_TELL
    return {"p_value": test["p_value"], "only_first": test["only_first"], "only_second": test["only_second"],
            "verdict": verdict}


# ---------------------------------------------------------------------------------------------- means

def mean_interval(values) -> tuple[float, float, float]:
    """Mean with a t 95% interval (NaN bounds below two values)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = sps.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)
