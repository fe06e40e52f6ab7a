"""How a chapter reports: numbers glued into its prose from the executed run, and the code it teaches, shown.

`glue` hands a measured value to the book's text (myst-nb's `{glue:text}` role), so that the prose quotes the run
it sits in and never a number typed by hand. Outside a book build (Colab, a plain Jupyter) it only records the
value, so the same notebook runs everywhere.
"""
from __future__ import annotations

import inspect

import pandas as pd

GLUED: dict[str, object] = {}


def glue(name: str, value, display: bool = False):
    """Record `value` under `name` for the chapter's text; returns the value."""
    if hasattr(value, "item") and not isinstance(value, pd.DataFrame):  # numpy and torch scalars: plain numbers
        value = value.item()
    GLUED[name] = value
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab or a bare Jupyter: nothing renders the text roles, so nothing to hand over
        return value
    myst_glue(name, value, display=display)
    return value


def glue_all(values: dict, prefix: str = "") -> dict:
    """`glue` every item of a dict, names prefixed."""
    for name, value in values.items():
        glue(prefix + name, value)
    return values


def interval_text(value: float, low: float, high: float, signed: bool = False) -> str:
    """"v [low, high]" in percent, with the fewest decimals (up to 3) at which the two ends print apart and no
    end that is not zero prints as zero, so that a narrow interval never reads as a point, nor an interval clear
    of zero as touching it; "n/a" without a value."""
    if value != value:  # NaN
        return "n/a"
    sign = "+" if signed else ""
    for decimals in range(4):
        apart = round(low * 100, decimals) != round(high * 100, decimals) or low == high
        hidden = any(x != 0 and round(x * 100, decimals) == 0 for x in (low, high))
        if apart and not hidden:
            break
    value, low, high = (0.0 if round(x * 100, decimals) == 0 else x for x in (value, low, high))  # no "-0%"
    return f"{value:{sign}.{decimals}%} [{low:{sign}.{decimals}%}, {high:{sign}.{decimals}%}]"


def show_source(obj):
    """Display a function's or class's source as a highlighted code block (the mechanism a chapter teaches)."""
    from IPython.display import Markdown, display
    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


# ---------------------------------------------------------------------------------------------- reproduction cards
# A claim of a paper, set against this run: the paired verdict (`core.stats`: higher, lower, equivalent, cannot
# tell) read in the direction the paper claims.
REPRODUCED, PARTLY, NOT_REPRODUCED, OPPOSITE, CANNOT_TELL = (
    "reproduced", "partly reproduced", "not reproduced", "opposite", "cannot tell")


def against_paper(verdict: str, paper: str = "higher") -> str:
    """A paired verdict read against a paper that found `paper` ("higher" or "lower"): the same direction is
    reproduced, the other direction opposite, an equivalence not reproduced, and "cannot tell" stays so."""
    if verdict == "cannot tell":
        return CANNOT_TELL
    if verdict == "equivalent":
        return NOT_REPRODUCED
    return REPRODUCED if verdict == paper else OPPOSITE


def combine(verdicts) -> str:
    """One verdict for a claim made of several comparisons (settings, layers): all reproduced, reproduced; some,
    partly; all opposite, opposite; none reproduced and some not reproduced or opposite, not reproduced; else
    (every comparison undecided) cannot tell."""
    verdicts = list(verdicts)
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v in (REPRODUCED, PARTLY) for v in verdicts):
        return PARTLY
    if verdicts and all(v == OPPOSITE for v in verdicts):
        return OPPOSITE
    return NOT_REPRODUCED if any(v in (NOT_REPRODUCED, OPPOSITE) for v in verdicts) else CANNOT_TELL


def difference_text(row) -> str:
    """A paired comparison's difference with its interval (a row of `stats.pairs`-based tables, or a
    `stats.paired_difference` result), signed, printed so that its ends differ."""
    return interval_text(row["difference"], row["ci_low"], row["ci_high"], signed=True)


def per_layer_verdict(verdicts, paper: str = "higher") -> tuple[str, str]:
    """A claim checked layer by layer: "k of n layers" where the paired verdict went the paper's way, and the
    claim's verdict (`combine` of each layer's, `against_paper`)."""
    verdicts = list(verdicts)
    held = sum(v == paper for v in verdicts)
    return f"{held} of {len(verdicts)} layers", combine(against_paper(v, paper) for v in verdicts)


def card(rows: list[dict]) -> pd.DataFrame:
    """A reproduction card: one row per claim, with `claim`, what the paper reports and where (`paper`), this run's
    number with its interval (`this run`) and the verdict computed from the paired statistics (`verdict`)."""
    table = pd.DataFrame(rows, columns=["claim", "paper", "this run", "verdict"])
    unknown = set(table.verdict) - {REPRODUCED, PARTLY, NOT_REPRODUCED, OPPOSITE, CANNOT_TELL}
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; use report.against_paper or report.combine")
    return table


def glue_card(name: str, rows: list[dict]) -> pd.DataFrame:
    """Build a reproduction card and glue it as a table under `name` (a chapter pastes it with the `glue`
    directive; the book's reproduction page pastes every chapter's). Returns the card."""
    table = card(rows)
    glue(name, table.style.hide(axis="index"), display=False)
    GLUED[name] = table
    return table
