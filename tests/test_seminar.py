"""The seminar kit: exercise check functions, timings, and the chapters' teaching structure."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from vlminterp_utils import seminar, shapes

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_a_placeholder_answer_is_neither_right_nor_wrong(capsys):
    assert seminar.verdict(None, 3) is None
    assert "answer = None" in capsys.readouterr().out


def test_the_visual_token_count_is_read_from_the_input_ids(tiny):
    _, _, adapter = tiny
    image = shapes.random_scene(np.random.default_rng(0), size=adapter.image_size).image
    batch = adapter.inputs(image, "What is here?")
    count = int((batch["input_ids"][0] == adapter.config.image_token_id).sum())
    first = int(torch.nonzero(batch["input_ids"][0] == adapter.config.image_token_id)[0])
    assert seminar.check_visual_token_count(count, adapter, batch) is True
    assert seminar.check_visual_token_count(count + 1, adapter, batch) is False
    assert seminar.check_first_visual_position(first, adapter, batch) is True
    assert seminar.check_first_visual_position(first + 1, adapter, batch) is False


def test_the_llm_share_accepts_an_answer_within_a_hundredth():
    sizes = {"vision tower": 15, "projector": 5, "language model": 80}
    assert seminar.check_llm_share(0.8, sizes) and seminar.check_llm_share(0.805, sizes)
    assert seminar.check_llm_share(0.75, sizes) is False


def test_a_buffer_grows_a_one_cell_object_by_rings_of_cells(grid_adapter):
    mask = np.zeros((64, 64), bool)
    mask[18:22, 18:22] = True  # inside cell (2, 2) of the 8 x 8 grid of 8 px patches
    assert seminar.check_selection_size(1, grid_adapter, mask, buffer=0)
    assert seminar.check_selection_size(9, grid_adapter, mask, buffer=1)
    assert seminar.check_selection_size(25, grid_adapter, mask, buffer=2)
    assert seminar.check_selection_size(9, grid_adapter, mask, buffer=2) is False


def test_table_questions_take_the_answer_from_the_run():
    table = pd.DataFrame({"setting": ["vqa"] * 3 + ["polling"], "buffer": [1, 1, 1, 1],
                          "mode": ["mean"] * 4, "method": ["object", "random", "high_norm", "random"],
                          "flip_rate": [0.6, 0.2, 0.3, 0.9]})
    assert seminar.check_stronger_ablation("object", table, "vqa", 1)
    assert seminar.check_stronger_ablation("random", table, "vqa", 1) is False  # random wins only in polling
    unanswered = table.assign(flip_rate=float("nan"))  # nothing was right before ablation: nothing to ask
    assert seminar.check_stronger_ablation("object", unanswered, "vqa", 1) is None
    shares = pd.DataFrame({"LatentLens": [0.2, 0.5, 0.5, 0.1]}, index=[0, 4, 8, 12])
    assert seminar.check_best_layer(4, shares, "LatentLens") and seminar.check_best_layer(8, shares, "LatentLens")
    assert seminar.check_best_layer(0, shares, "LatentLens") is False
    summary = pd.DataFrame({"recognised": [0.5, 0.0, 0.5]}, index=["all", "CE only", "feature, no CE"])
    assert seminar.check_best_recipe("all", summary) and seminar.check_best_recipe("feature, no CE", summary)
    assert seminar.check_best_recipe("CE only", summary) is False


def test_index_and_statistics_questions_count_what_is_stored():
    index = SimpleNamespace(metadata=pd.DataFrame({"token": [" red", " red", " blue"]}))
    assert seminar.check_index_entries(2, index, " red") and not seminar.check_index_entries(3, index, " red")
    stats = {"mean": torch.zeros(3, 16), "var": torch.ones(3, 16)}
    assert seminar.check_statistics_size(96, stats) and not seminar.check_statistics_size(48, stats)


def test_reading_time_counts_the_prose_only(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "source": ["word " * 300]},
                    {"cell_type": "code", "source": ["x = 1 " * 1000]},
                    {"cell_type": "markdown", "source": ["word " * 100]}]}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    assert seminar.reading_minutes(path) == pytest.approx(400 / seminar.WORDS_PER_MINUTE)
    values = seminar.glue_timings("chx", seminar.Clock(), path, "cpu", smoke=True)
    assert values["chx_run_mode"] == "smoke" and values["chx_read_minutes"] == pytest.approx(2.0)
    assert 0 <= values["chx_run_minutes"] < 1
    assert values["chx_buildit_minutes"] == 0  # no chapter of the book: no build-it exercises
    from vlminterp_utils.chapters import buildit
    ch1 = seminar.glue_timings("ch1", seminar.Clock(), path, "cpu", smoke=True)["ch1_buildit_minutes"]
    assert ch1 == sum(e.minutes for e in buildit.EXERCISES.values() if e.chapter == 1) > 0


# ---------------------------------------------------------------------------------------------- chapters

def markdown(path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_teaches_objectives_exercises_with_solutions_and_discussion(path):
    text = markdown(path)
    prefix = f"ch{int(path.stem[:2])}"
    assert text[1].startswith("**In this chapter you will**")
    for key in ("read_minutes", "run_minutes", "run_device", "run_mode"):
        assert f"{prefix}_{key}" in text[1], key
    exercises = [t for t in text if re.match(r"\*\*\d\. ", t)]
    assert 4 <= len(exercises) <= 6
    assert all("<details><summary>Solution</summary>" in t and t.rstrip().endswith("</details>")
               for t in exercises)
    assert any(t.startswith("## Discussion") for t in text)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_calls_real_check_functions_and_glues_its_own_timing(path):
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    checks = re.findall(r"seminar\.(check_\w+)\(answer", "\n".join(code))
    assert checks and all(callable(getattr(seminar, name, None)) for name in checks)
    assert "seminar.glue_timings(" in code[-1] and f'"{path.name}"' in code[-1]


def test_every_citation_is_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    sources = [*NOTEBOOKS, *(ROOT / "book").glob("*.md")]
    cited = {key.strip() for path in sources for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", path.read_text())
             for key in group.split(",")}
    assert cited and cited <= keys, cited - keys


def test_chapter_4_checks_name_the_most_moved_module_and_the_clearly_higher_layers(capsys):
    import pandas as pd
    sizes = pd.DataFrame({"module": ["q_proj", "q_proj", "k_proj"], "relative_update": [0.01, 0.01, 0.05]})
    assert seminar.check_most_moved_module("k_proj", sizes) is True
    assert seminar.check_most_moved_module("q_proj", sizes) is False
    assert seminar.check_layers_clearly_higher(0, {"logit_higher_layers": 0}) is True
    assert seminar.check_layers_clearly_higher(None, {"logit_higher_layers": 0}) is None
