"""Reproduction cards (`chapters.report`): verdicts read against a paper's claim."""
import pandas as pd
import pytest

from vlminterp_utils.chapters import report


@pytest.mark.parametrize("verdict, paper, expected", [
    ("higher", "higher", "reproduced"), ("lower", "higher", "opposite"), ("lower", "lower", "reproduced"),
    ("equivalent", "higher", "not reproduced"), ("cannot tell", "higher", "cannot tell"),
])
def test_a_paired_verdict_reads_against_the_papers_direction(verdict, paper, expected):
    assert report.against_paper(verdict, paper) == expected


@pytest.mark.parametrize("verdicts, expected", [
    (["reproduced"] * 3, "reproduced"),
    (["reproduced", "cannot tell", "opposite"], "partly reproduced"),
    (["opposite", "opposite"], "opposite"),
    (["not reproduced", "cannot tell"], "not reproduced"),
    (["cannot tell", "cannot tell"], "cannot tell"),
    ([], "cannot tell"),
])
def test_a_claim_of_several_comparisons_combines_their_verdicts(verdicts, expected):
    assert report.combine(verdicts) == expected


def test_a_card_refuses_a_verdict_it_does_not_know():
    row = {"claim": "c", "paper": "p", "this run": "r"}
    table = report.glue_card("test_card", [{**row, "verdict": "reproduced"}])
    assert isinstance(table, pd.DataFrame) and list(table.columns) == ["claim", "paper", "this run", "verdict"]
    assert report.GLUED["test_card"].equals(table)
    with pytest.raises(ValueError, match="unknown verdicts"):
        report.card([{**row, "verdict": "yes"}])


def test_an_interval_prints_with_enough_decimals_to_show_its_width():
    assert report.interval_text(0.5, 0.25, 0.75) == "50% [25%, 75%]"
    assert report.interval_text(0.0001, -0.0004, 0.0012) == "0.01% [-0.04%, 0.12%]"  # no end printed as 0
    assert report.interval_text(0.02, 0.003, 0.04, signed=True) == "+2.0% [+0.3%, +4.0%]"  # clear of zero
    assert report.interval_text(0.00002, -0.00004, 0.00001) == "0.002% [-0.004%, 0.001%]"
    assert report.interval_text(0.1, 0.05, 0.2, signed=True) == "+10% [+5%, +20%]"
    assert report.interval_text(float("nan"), 0, 1) == "n/a"


def test_a_paired_row_prints_its_signed_difference_and_a_layerwise_claim_counts_its_layers():
    row = {"difference": 0.12, "ci_low": 0.05, "ci_high": 0.2, "verdict": "higher"}
    assert report.difference_text(row) == "+12% [+5%, +20%]"
    held, verdict = report.per_layer_verdict(["higher", "higher", "cannot tell"])
    assert held == "2 of 3 layers" and verdict == report.PARTLY
    held, verdict = report.per_layer_verdict(["lower", "lower"], paper="lower")
    assert held == "2 of 2 layers" and verdict == report.REPRODUCED
