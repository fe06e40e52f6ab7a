"""Every chapter, executed in smoke mode on a tiny random checkpoint of each supported family, loaded from a folder
through `model_id` (papermill's parameters), as a reader loads a real one in Colab; a family's chapters share one
kernel, as a reader's session would."""
import json
import os
from pathlib import Path

import pytest

from tiny_models import FAMILIES, build_tiny_family
from vlminterp_utils.chapters import buildit

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPLAINED = "answered correctly before the intervention"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_tokenizer):
    paths = {}
    for family in FAMILIES:
        model, processor = build_tiny_family(family, smol_tokenizer)
        paths[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(paths[family])
        processor.save_pretrained(paths[family])
    return paths


def outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/html"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    return "\n".join(parts)


def run_in_one_kernel(notebooks: list[Path], parameters_of, cwd: Path, timeout: int = 600) -> list[dict]:
    """Execute notebooks one after another in one kernel, each with its papermill parameters injected, as a
    reader runs the chapters in one session; the namespace is reset and the figures closed between chapters, so a
    chapter cannot lean on another's variables, while imports (seconds per chapter) are paid once."""
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.util import run_sync
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    km = AsyncKernelManager(kernel_name="python3")
    run_sync(km.start_kernel)(cwd=str(cwd))
    executed = []
    try:
        for i, path in enumerate(notebooks):
            nb = parameterize_notebook(load_notebook_node(str(path)), parameters_of(path))
            if i:
                nb.cells.insert(0, nbformat.v4.new_code_cell(
                    "%reset -f\nimport matplotlib.pyplot as plt\nplt.close('all')"))
            client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(cwd)}})
            try:
                executed.append(client.execute())
            except Exception as err:  # say which chapter: the kernel is shared
                raise AssertionError(f"{path.name} failed: {err}") from err
            finally:
                if client.kc is not None:
                    client.kc.stop_channels()
    finally:
        run_sync(km.shutdown_kernel)(now=True)
    return executed


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_chapter_runs_on_the_family(family, checkpoints, tmp_path, monkeypatch):
    """All chapters, smoke mode, on one family's tiny checkpoint, in one kernel (see `run_in_one_kernel`)."""
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path / "cache"))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the kernel computes on one thread, like its worker
        monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def parameters_of(notebook: Path) -> dict:
        parameters = {"smoke": True, "model_id": str(checkpoints[family])}
        if "compared_with =" in notebook.read_text():  # models side by side: beside the next family's
            parameters["compared_with"] = [str(checkpoints[FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)]])]
        return parameters

    # The first family runs the student editions (solutions taken out, as the build makes them): they must run
    # through on their stubs. The others run the chapters, whose folded solutions pass their own checks.
    students = family == FAMILIES[0]
    notebooks = NOTEBOOKS
    if students:
        notebooks = [tmp_path / "student" / nb.name for nb in NOTEBOOKS]
        notebooks[0].parent.mkdir()
        for source, edition in zip(NOTEBOOKS, notebooks):
            edition.write_text(json.dumps(buildit.student_edition(json.loads(source.read_text()))))
    for notebook, nb in zip(notebooks, run_in_one_kernel(notebooks, parameters_of, tmp_path)):
        text = outputs_text(nb)
        if "NaN" in text:  # a random model answers nothing right: the chapter must say so, not just print NaN
            assert EXPLAINED in text, f"{notebook.name} on {family} shows NaN without saying why"
        exercises = buildit.chapter_exercises(int(notebook.name[:2]))
        flat = " ".join(text.split())  # the checks wrap their verdicts to the book's column
        said = flat.count("is still the stub") if students else flat.count("Correct: `")
        assert said == len(exercises), (notebook.name, family, said, [e.name for e in exercises])
