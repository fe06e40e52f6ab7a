"""The chapters as files: the conventions a reader and CI rely on, checked without running them."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GLUE_ROLE = re.compile(r"\{glue(:\w+)?\}`[^`]*`")
# A typed measurement: a percentage, or a decimal such as 0.75. "95%" names an interval's level, not a result.
TYPED_NUMBER = re.compile(r"(?<![\w.])(?!95%)\d+(\.\d+)?%|(?<![\w.])0\.\d+")


def cells(path, kind):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_book_column(path):
    long = [line for code in cells(path, "code") for line in code.split("\n") if len(line) > 88]
    assert not long, long[:3]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_colab_install_cell_then_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "google.colab" in "".join(code[0]["source"])
    assert "remove-cell" in code[0]["metadata"].get("tags", [])  # Colab's business: not on the web page
    assert "parameters" in code[1]["metadata"].get("tags", [])
    params = "".join(code[1]["source"])
    assert "model_id =" in params and "smoke = False" in params and "device =" in params


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """`papermill --help-notebook` lists a chapter's parameters from this cell; a line it cannot parse (a comment
    holding a second '=') is skipped with only a warning."""
    import ast
    import papermill
    nb = json.loads(path.read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    assigned = {t.id for node in ast.parse("".join(params["source"])).body if isinstance(node, ast.Assign)
                for t in node.targets}
    assert set(papermill.inspect_notebook(str(path))) == assigned


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_types_no_measured_number(path):
    for text in cells(path, "markdown"):
        typed = [m.group(0) for m in TYPED_NUMBER.finditer(GLUE_ROLE.sub("", text))]
        assert not typed, (typed, text[:200])


def test_the_typed_number_rule_can_fail():
    assert TYPED_NUMBER.search("flips 70% of answers") and TYPED_NUMBER.search("a probability of 0.75")
    assert not TYPED_NUMBER.search(GLUE_ROLE.sub("", "flips {glue:text}`x:.0%` [95% interval], layer 16"))


def test_install_cells_install_from_the_books_repository():
    """The repository URL lives in _config.yml alone; scripts/sync_colab.py writes it into the install cells."""
    import yaml
    config = yaml.safe_load((NOTEBOOKS[0].parent.parent / "_config.yml").read_text())
    url = config["repository"]["url"]
    for path in NOTEBOOKS:
        install = cells(path, "code")[0]
        assert f'REPO = "{url}"' in install and "git+{REPO}" in install, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 cell ids: papermill and the book build warn without them, and will refuse."""
    ids = [c.get("id") for c in json.loads(path.read_text())["cells"]]
    assert all(ids) and len(set(ids)) == len(ids)


def test_the_book_build_removes_papermills_injected_parameters_from_the_page():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "smoke = True"},
                    {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "smoke = False"}]}
    build_book.hide_injected_parameters(nb)
    assert nb["cells"][0]["metadata"]["tags"] == ["injected-parameters", "remove-cell"]
    assert nb["cells"][1]["metadata"]["tags"] == ["parameters"]  # the reader's knobs stay on the page
