"""How a chapter reports: numbers glued into its prose from the executed run, and the code it teaches, shown.

`glue` hands a measured value to the book's text (myst-nb's `{glue:text}` role), so that the prose quotes the run
it sits in and never a number typed by hand. Outside a book build (Colab, a plain Jupyter) it only records the
value, so the same notebook runs everywhere.
"""
from __future__ import annotations

import inspect

GLUED: dict[str, object] = {}


def glue(name: str, value, display: bool = False):
    """Record `value` under `name` for the chapter's text; returns the value."""
    if hasattr(value, "item"):  # numpy and torch scalars: glue plain numbers, which the text role can format
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


def show_source(obj):
    """Display a function's or class's source as a highlighted code block (the mechanism a chapter teaches)."""
    from IPython.display import Markdown, display
    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))
