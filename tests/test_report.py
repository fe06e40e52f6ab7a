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
