"""Every chapter, executed with papermill in smoke mode on a tiny random checkpoint of each llava-hf family,
loaded from a folder through `model_id`, as a reader loads a real one in Colab."""
import json
import os
from pathlib import Path

import pytest

from tiny_models import FAMILIES, build_tiny_family

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


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem[:2])
@pytest.mark.parametrize("family", FAMILIES)
def test_chapter_runs_on_the_family(family, notebook, checkpoints, tmp_path, monkeypatch):
    import papermill
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path / "cache"))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the kernel computes on one thread, like its worker
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / notebook.name
    parameters = {"smoke": True, "model_id": str(checkpoints[family])}
    if "compared_with =" in notebook.read_text():  # a page of models side by side: beside the next family's
        parameters["compared_with"] = [str(checkpoints[FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)]])]
    papermill.execute_notebook(str(notebook), str(out), parameters=parameters,
                               cwd=str(tmp_path), progress_bar=False, log_output=False,
                               execution_timeout=600)  # a stalled kernel fails the test instead of hanging it
    text = outputs_text(json.loads(out.read_text()))
    if "NaN" in text:  # a random model answers nothing right: the chapter must say so, not just print NaN
        assert EXPLAINED in text, f"{notebook.name} on {family} shows NaN without saying why"
