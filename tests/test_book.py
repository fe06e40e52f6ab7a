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


def load_build_book():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    return build_book


def test_the_book_build_removes_papermills_injected_parameters_from_the_page():
    build_book = load_build_book()
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "smoke = True"},
                    {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "smoke = False"}]}
    build_book.hide_injected_parameters(nb)
    assert nb["cells"][0]["metadata"]["tags"] == ["injected-parameters", "remove-cell"]
    assert nb["cells"][1]["metadata"]["tags"] == ["parameters"]  # the reader's knobs stay on the page


def test_a_chapter_is_executed_again_only_when_what_it_computes_from_changes(tmp_path, monkeypatch):
    """#30: the execution cache's key sees the chapter's code cells, the mode, the package and its data; a prose
    edit (a markdown cell's text) keeps the key, and the reused chapter shows the new prose with the old outputs."""
    build_book = load_build_book()
    (tmp_path / "vlminterp_utils" / "__pycache__").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    module, data = tmp_path / "vlminterp_utils" / "m.py", tmp_path / "data" / "d.txt"
    module.write_text("x = 1\n")
    data.write_text("a")
    nb = tmp_path / "nb.ipynb"

    def write(prose="Some prose.", code="print(1)"):
        nb.write_text(json.dumps({"cells": [{"cell_type": "markdown", "id": "p", "source": [prose]},
                                            {"cell_type": "code", "id": "c", "source": [code], "outputs": []}]}))

    def key(smoke=True):
        return build_book.execution_key(nb, smoke, root=tmp_path)

    write()
    first = key()
    write(prose="Other prose.")
    assert key() == first
    (tmp_path / "vlminterp_utils" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    assert key() == first  # bytecode is not source
    assert key(smoke=False) != first
    write(code="print(2)")
    assert key() != first
    write()
    module.write_text("x = 2\n")
    assert key() != first
    module.write_text("x = 1\n")
    data.write_text("b")
    assert key() != first
    data.write_text("a")
    assert key() == first
    monkeypatch.setenv("VLMINTERP_SMOLLM2", "hub")  # SmolLM2 from the hub, not the GGUF: other weights
    assert key() != first
    monkeypatch.delenv("VLMINTERP_SMOLLM2")
    executed = {"cells": [{"cell_type": "markdown", "id": "p", "source": ["Some prose."]},
                          {"cell_type": "code", "id": "c", "source": ["print(1)"], "outputs": ["1"]}]}
    write(prose="Other prose.")
    fresh = build_book.with_fresh_prose(executed, json.loads(nb.read_text()))
    assert fresh["cells"][0]["source"] == ["Other prose."] and fresh["cells"][1]["outputs"] == ["1"]


HTML = ROOT / "_build" / "html" / "notebooks"
# a printed interval of percentages, "[3%, 41%]" or "[-2%, +5%]" (lists of plain numbers are not intervals)
INTERVAL = re.compile(r"\[\s*([+\-−]?\d[\d.,]*)%\s*,\s*([+\-−]?\d[\d.,]*)%\s*\]")


def zero_width_intervals(text: str) -> list[str]:
    """Every printed interval `[low%, high%]` whose two ends are the same number (-0% and +0% are)."""
    def number(s):
        return float(s.lstrip("+-−").replace(",", "")) * (-1 if s[0] in "-−" else 1)
    return [m.group(0) for m in INTERVAL.finditer(text) if number(m.group(1)) == number(m.group(2))]


def test_the_zero_width_rule_can_fail():
    assert zero_width_intervals("flips 0% [0%, 0%] and 3% [-0%, +0%]") == ["[0%, 0%]", "[-0%, +0%]"]
    assert zero_width_intervals("[12%, 12%]") == ["[12%, 12%]"]
    assert not zero_width_intervals("flips 0% [0%, 14%]; layers [1, 1]; a list [0.1, 0.1]")


@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS] + ["reproduction"])
def test_no_built_page_shows_a_zero_width_interval(name):
    """An interval whose ends print alike hides its uncertainty (a bootstrap of 24 zeros prints [0%, 0%]; the exact
    interval of 0 of 24 is [0%, 14%]). Checked on the built pages, as a reader sees them."""
    page = HTML / f"{name}.html" if name != "reproduction" else HTML.parent / "book" / "reproduction.html"
    if not page.exists():
        pytest.skip(f"{page} is not built: run `make test` or `python scripts/build_book.py --smoke`")
    text = re.sub(r"<[^>]+>", "", page.read_text())
    assert not zero_width_intervals(text)


# ---------------------------------------------------------------------------------------------- build-it exercises

def build_it_cells(nb: dict, tag: str) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_build_it_exercise_has_a_stub_a_check_and_a_folded_solution(path):
    from vlminterp_utils.chapters import buildit
    nb = json.loads(path.read_text())
    chapter = int(path.stem[:2])
    names = [e.name for e in buildit.chapter_exercises(chapter)]
    stubs, solutions = build_it_cells(nb, "exercise"), build_it_cells(nb, "solution")
    assert len(stubs) == len(names) == len(solutions), (len(stubs), names, len(solutions))
    code = cells(path, "code")
    for name, stub, solution in zip(names, stubs, solutions):
        assert stub.startswith(f"def {name}(") and "raise NotImplementedError" in stub, name
        assert any(c.startswith(f"buildit.check_{name}({name},") or c.startswith(f"buildit.check_{name}(\n    {name},")
                   for c in code), name  # the check runs the reader's function
        assert f'buildit.solution("{name}")' in solution and f'EXERCISES["{name}"].solution' in solution
    for cell in nb["cells"]:
        if "solution" in cell.get("metadata", {}).get("tags", []):
            assert "hide-cell" in cell["metadata"]["tags"]  # folded on the page


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_student_edition_keeps_the_exercises_and_drops_the_solutions(path):
    from vlminterp_utils.chapters import buildit
    nb = json.loads(path.read_text())
    edition = buildit.student_edition(nb)
    assert not build_it_cells(edition, "solution")
    assert build_it_cells(edition, "exercise") == build_it_cells(nb, "exercise")
    markdown = ["".join(c["source"]) for c in edition["cells"] if c["cell_type"] == "markdown"]
    assert not any("<summary>Solution" in m for m in markdown)
    assert sum("<summary>Solution" in m for m in cells(path, "markdown")) >= 2  # the reading exercises had some
    assert all(not c.get("outputs") for c in edition["cells"] if c["cell_type"] == "code")
    ids = [c["id"] for c in edition["cells"]]
    assert len(set(ids)) == len(ids)
    code = [c for c in edition["cells"] if c["cell_type"] == "code"]
    assert "google.colab" in "".join(code[0]["source"])  # still opens with the Colab install cell
    assert "parameters" in code[1]["metadata"]["tags"]  # and papermill's parameters


def test_the_build_writes_every_student_edition(tmp_path):
    build_book = load_build_book()
    written = build_book.write_student_editions(NOTEBOOKS, tmp_path / "student")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path in written:
        assert not build_it_cells(json.loads(path.read_text()), "solution")
    assert not list((tmp_path / "student").glob("*.tmp*"))  # nothing half-written


def test_every_page_and_the_teachers_guide_link_the_student_editions():
    guide = (ROOT / "book" / "teachers_guide.md").read_text()
    for path in NOTEBOOKS:
        assert f'href="student/{path.name}"' in "".join(cells(path, "markdown")), path.name
        assert f'href="../notebooks/student/{path.name}"' in guide, path.name


def test_the_teachers_guide_times_agree_with_the_exercise_tags():
    """The plan quotes each build-it exercise as "Build it 1.2 (25 min)": the minutes must be its tag's."""
    from vlminterp_utils.chapters import buildit
    guide = (ROOT / "book" / "teachers_guide.md").read_text()
    quoted = re.findall(r"Build it (\d)\.(\d) \((\d+) min\)", guide)
    by_label = {(e.chapter, e.number): e.minutes for e in buildit.EXERCISES.values()}
    assert {(int(c), int(n)) for c, n, _ in quoted} == set(by_label)  # every exercise is in the plan
    for chapter, number, minutes in quoted:
        assert by_label[int(chapter), int(number)] == int(minutes), (chapter, number, minutes)
