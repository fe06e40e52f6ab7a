"""core.stats against values a textbook gives, and the verdicts the book's prose is built from."""
import numpy as np
import pytest

from vlminterp_utils.core import stats


def test_exact_intervals_match_clopper_pearson_tables():
    # 0 of n: the upper bound is 1 - (alpha / 2) ** (1 / n) in closed form, never 0
    assert stats.proportion_ci(0, 24) == pytest.approx((0.0, 1 - 0.025 ** (1 / 24)))
    assert stats.proportion_ci(24, 24) == pytest.approx((0.025 ** (1 / 24), 1.0))
    # 8 of 20: [0.1912, 0.6395] (Clopper & Pearson's tables; also scipy's binomtest)
    assert stats.proportion_ci(8, 20) == pytest.approx((0.1912, 0.6395), abs=1e-4)
    low, high = stats.proportion_ci(np.array([0, 8]), np.array([10, 0]))
    assert low[0] == 0 and high[0] == pytest.approx(0.3085, abs=1e-4) and np.isnan(low[1]) and np.isnan(high[1])


def test_wilson_interval_matches_its_closed_form():
    # 8 of 20 at z = 1.96: centre (0.4 + z^2 / 40) / (1 + z^2 / 20), half-width as in Wilson (1927)
    assert stats.proportion_ci(8, 20, method="wilson") == pytest.approx((0.2188, 0.6134), abs=1e-4)
    with pytest.raises(ValueError, match="exact.*wilson"):
        stats.proportion_ci(1, 2, method="normal")


def test_no_share_of_zero_successes_gets_a_zero_width_interval():
    share, low, high = stats.share_ci([False] * 24)
    assert share == 0 and low == 0 and high > 0.14
    assert all(np.isnan(stats.share_ci([])))


def test_clustered_share_widens_only_for_correlated_clusters():
    independent = [1, 0, 0] * 4  # one hit in every cluster: no more variance than independent units
    clusters = np.repeat(np.arange(4), 3)
    assert stats.design_effect(independent, clusters) == 1.0
    assert stats.clustered_share_ci(independent, clusters)[1:] == pytest.approx(stats.proportion_ci(4, 12))
    together = [1, 1, 1] + [0] * 9  # every hit in one cluster: 12 units carry the information of far fewer
    assert stats.design_effect(together, clusters) > 2.5
    _, low, high = stats.clustered_share_ci(together, clusters)
    exact = stats.proportion_ci(3, 12)
    assert low < exact[0] and high > exact[1]
    # no hit at all: nothing to estimate the clustering from, so the exact interval on all units
    assert stats.clustered_share_ci([0] * 12, clusters)[1:] == pytest.approx(stats.proportion_ci(0, 12))


def test_exact_mcnemar_is_the_binomial_test_of_the_discordant_pairs():
    first = np.array([True] * 6 + [False] * 4)
    second = np.zeros(10, bool)
    test = stats.mcnemar_exact(first, second)
    assert (test["only_first"], test["only_second"]) == (6, 0)
    assert test["p_value"] == pytest.approx(2 * 0.5 ** 6)  # 0.03125
    assert stats.mcnemar_exact(first, first)["p_value"] == 1.0
    with pytest.raises(ValueError, match="common item set"):
        stats.mcnemar_exact(first, second[:5])


def test_paired_bootstrap_resamples_whole_clusters():
    first, second = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.0, 3.0])
    boot = stats.paired_bootstrap(first, second)
    assert np.allclose(boot, 1.0)  # every pair differs by exactly 1
    # two clusters of unequal size: every replicate is a mean over whole clusters
    boot = stats.paired_bootstrap([1.0, 1.0, 1.0, 0.0], [0.0] * 4, clusters=[0, 0, 0, 1], n_boot=500)
    assert set(np.round(boot, 6)) <= {0.0, 0.75, 1.0}


def test_verdicts_come_from_the_paired_difference():
    assert stats.compare(0.05, 0.3) == "higher" and stats.compare(-0.3, -0.01) == "lower"
    assert stats.compare(-0.02, 0.03) == "cannot tell"  # no margin stated: nothing is called equivalent
    assert stats.compare(-0.02, 0.03, margin=0.05) == "equivalent"
    assert stats.compare(-0.02, 0.06, margin=0.05) == "cannot tell"
    # clear of zero but inside the margin: a difference too small to matter (the margin is stated in advance)
    assert stats.compare(0.01, 0.03, margin=0.05, tost_interval=(0.012, 0.028)) == "equivalent"
    assert stats.compare(0.01, 0.03) == "higher"  # the same interval with no margin stated
    assert stats.compare(float("nan"), 0.1) == "cannot tell"


def test_binary_equivalence_needs_the_exact_bound_on_discordance():
    same = np.array([True] * 12 + [False] * 12)
    # 24 items, none discordant: |difference| is bounded only by 1 - 0.05 ** (1 / 24) = 11.7%
    assert stats.compare_binary(same, same, margin=0.05)["verdict"] == "cannot tell"
    many = np.array([True] * 100 + [False] * 100)
    # 200 items, none discordant: bounded by 1.5%, inside a 5-point margin
    assert stats.compare_binary(many, many, margin=0.05)["verdict"] == "equivalent"
    flips = stats.paired_difference(np.array([True] * 10 + [False] * 14), np.zeros(24, bool))
    assert flips["verdict"] == "higher" and flips["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert flips["ci_low"] > 0 and flips["difference"] == pytest.approx(10 / 24)


def test_tost_uses_the_ninety_percent_interval_of_a_continuous_difference():
    rng = np.random.default_rng(0)
    first = rng.normal(0, 0.01, 400)
    result = stats.paired_difference(first, first + rng.normal(0, 0.01, 400), margin=0.05)
    assert result["verdict"] == "equivalent"
    assert stats.paired_difference(first, first + 0.1, margin=0.05)["verdict"] == "lower"


def test_mean_interval_uses_student_t():
    mean, lo, hi = stats.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2 and hi - mean == pytest.approx(4.302653 / np.sqrt(3))  # t(0.975, 2) = 4.3027
    assert np.isnan(stats.mean_interval([1.0])[1])


def test_clustered_yes_no_pairs_that_never_disagree_prove_no_equivalence_on_few_units():
    """40 patches of 4 images read alike by two models: the scene bootstrap of the difference is [0, 0], but 0
    discordant of 40 bounds |difference| only at 9%, so a 5-point margin cannot be claimed; 2000 patches can."""
    few = np.zeros(40)
    assert stats.paired_difference(few, few, clusters=np.repeat(np.arange(4), 10), margin=0.05)["verdict"] == (
        "cannot tell")
    many = np.tile([0.0, 1.0], 1000)
    assert stats.paired_difference(many, many, clusters=np.repeat(np.arange(100), 20), margin=0.05)["verdict"] == (
        "equivalent")


def test_tango_interval_never_collapses_and_covers():
    same = np.zeros(4, bool)
    # no discordant pair of 4: |T(delta)| = 2 sqrt(delta / (1 - delta)) = 1.96 at delta = 0.49 (Tango's score)
    assert stats.tango_interval(same, same) == pytest.approx((-0.4899, 0.4899), abs=1e-4)
    assert stats.tango_interval(np.ones(24, bool), np.zeros(24, bool))[1] == 1.0
    # coverage on 2000 simulated studies of 40 pairs (fixed seed): a 95% interval misses about 5% of them;
    # 93% to 97% is the band 2000 draws leave around 95% (binomial standard error 0.5 points, four of them)
    rng = np.random.default_rng(0)
    cells = np.array([0.3, 0.15, 0.1, 0.45])  # both, first only, second only, neither
    covered = 0
    for _ in range(2000):
        k = rng.choice(4, size=40, p=cells)
        low, high = stats.tango_interval((k == 0) | (k == 1), (k == 0) | (k == 2))
        covered += low <= 0.05 <= high
    assert 0.93 <= covered / 2000 <= 0.97


def test_clustered_yes_no_pairs_get_an_interval_widened_by_their_clusters():
    first = np.r_[np.ones(10), np.zeros(14)]  # the ten hits in the first two of four concepts
    alone = stats.paired_difference(first.astype(bool), np.zeros(24, bool))
    clustered = stats.paired_difference(first, np.zeros(24), clusters=np.arange(24) // 6)
    assert alone["verdict"] == "higher" and clustered["verdict"] == "cannot tell"
    assert clustered["ci_high"] - clustered["ci_low"] > alone["ci_high"] - alone["ci_low"]
    assert stats.paired_design_effect(first, np.zeros(24), np.arange(24) // 6) > 2


def test_pairs_keep_only_the_units_measured_under_both_conditions():
    import pandas as pd
    long = pd.DataFrame({"item": [0, 0, 1, 2, 2, 3], "method": ["a", "b", "a", "a", "b", "c"],
                         "after": [1, 0, 1, 0, 0, 1]})
    both = stats.pairs(long, "item", "method", "after", "a", "b")
    assert list(both.columns) == ["a", "b"] and list(both.index) == [0, 2]  # item 1 lacks b, item 3 is c only
    assert both.loc[0].tolist() == [1, 0]
    assert stats.pairs(long, "item", "method", "after", "a", "z").empty  # never measured: nothing to pair


def test_pick_names_a_row_or_says_cannot_tell():
    import pandas as pd
    table = pd.DataFrame({"control": ["random", "high_norm"], "difference": [0.3, 0.1], "verdict": ["higher"] * 2})
    assert stats.pick(table, control="high_norm").difference == 0.1
    missing = stats.pick(table, control="high_gradient")
    assert np.isnan(missing.difference) and missing.verdict == "cannot tell" and missing.control == "high_gradient"
