"""The core's small pieces: atomic writes, cached artefacts, package data, intervals, padding, answers."""
import numpy as np
import pytest
import torch

from vlminterp_utils import readout, stats, storage


def test_atomic_path_replaces_the_target_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.txt"
    storage.write_text(target, "first")
    with pytest.raises(RuntimeError, match="midway"):
        with storage.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert target.read_text() == "first"  # the old file survives a failed write ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # ... and nothing half-written is left


def test_atomically_written_files_get_the_usual_mode_not_a_private_one(tmp_path):
    import os
    mask = os.umask(0o022)
    try:
        path = storage.write_text(tmp_path / "figure.svg", "<svg/>")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a web server that serves the book
    from safetensors.torch import save_file
    mask = os.umask(0o022)
    try:  # safetensors writes a file of its own at the temporary path
        with storage.atomic_path(tmp_path / "weights.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(mask)
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_folders_replace_an_existing_folder(tmp_path):
    target = tmp_path / "index"
    for text in ("one", "two"):
        with storage.atomic_path(target, folder=True) as tmp:
            (tmp / "f.txt").write_text(text)
    assert (target / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_a_cached_folder_another_process_finished_first_is_kept_not_replaced(tmp_path):
    target = tmp_path / "checkpoint"
    with storage.atomic_path(target, folder=True, keep_existing=True) as mine:
        (mine / "f.txt").write_text("mine")
        with storage.atomic_path(target, folder=True, keep_existing=True) as theirs:  # finishes first
            (theirs / "f.txt").write_text("theirs")
        reader = open(target / "f.txt")  # the other process is reading it when ours is done
    assert reader.read() == "theirs" and (target / "f.txt").read_text() == "theirs"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # ours is gone, nothing half-written


def test_cached_artefacts_are_built_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    key = storage.cache_key("model", 3)
    first = storage.cached_tensors("things", key, build)
    again = storage.cached_tensors("things", key, build)
    assert torch.equal(first["x"], again["x"]) and len(calls) == 1
    storage.cached_tensors("things", storage.cache_key("model", 4), build)
    assert len(calls) == 2  # another key, another artefact
    storage.cached_tensors("things", key, build, cache=False)
    assert len(calls) == 3 and len(list((tmp_path / "things").iterdir())) == 2


def test_a_failed_build_leaves_no_cached_artefact(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))

    def broken():
        raise ValueError("no")

    with pytest.raises(ValueError):
        storage.cached_tensors("things", "k", broken)
    assert not (tmp_path / "things").exists() or not list((tmp_path / "things").iterdir())


def test_package_data_is_found():
    assert storage.data_path("shapes_llava", "vision_projector.safetensors").exists()
    assert storage.data_path("corpus", "default_corpus.txt").exists()


def test_flip_rate_counts_only_initially_correct_answers():
    assert stats.flip_rate([True] * 4, [True, False, False, True]) == 0.5
    assert np.isnan(stats.flip_rate([False], [False]))


def test_pad_right_keeps_every_token_at_its_position():
    out = readout.pad_right([[5, 6, 7], [8]], pad_id=0, masks=[[0, 1, 1], [1]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert "loss_mask" not in readout.pad_right([[1]], pad_id=0)


@pytest.mark.parametrize("said, meant", [("Red.", "red"), (" yes", "yes"), ("Yes!", "yes"), ('"circle"', "circle"),
                                         ("a red circle and a blue square.", "a red circle and a blue square")])
def test_answers_are_normalised(said, meant):
    assert readout.normalize_answer(said) == meant


def test_the_answer_token_after_a_prefix_keeps_its_space(smol_tokenizer):
    adapter = type("A", (), {"tokenizer": smol_tokenizer})()
    plain = readout.first_answer_token(adapter, "red")
    after = readout.first_answer_token(adapter, "red", prefix="It is")
    assert smol_tokenizer.decode([plain]) == "red" and smol_tokenizer.decode([after]) == " red"


@pytest.mark.parametrize("said, right", [("Yes", True), (" yes", True), (" Yes", True), (" No", False), ("Y", False)])
def test_a_first_token_says_yes_in_any_casing(smol_tokenizer, said, right):
    adapter = type("A", (), {"tokenizer": smol_tokenizer})()
    token = smol_tokenizer(said, add_special_tokens=False)["input_ids"][0]
    assert readout.same_word(adapter, token, readout.first_answer_token(adapter, "yes")) == right


def test_the_weights_fingerprint_keys_what_an_llm_alone_computes(tiny):
    """LatentLens indexes are keyed by the LLM's weights: a vision tower trained further (the frozen-LLM twin) keeps
    the key, a LoRA update (which moves every value of a weight) or a changed shape does not."""
    model, _, adapter = tiny
    before = storage.weights_fingerprint(adapter.language_model)
    vision, weight = next(adapter.vision_tower.parameters()), adapter.layers[0].self_attn.q_proj.weight
    kept = vision.clone(), weight.clone()  # the model is shared by the session's tests: restored exactly
    with torch.no_grad():
        vision += 1.0
        assert storage.weights_fingerprint(adapter.language_model) == before
        weight += 1e-3
        changed = storage.weights_fingerprint(adapter.language_model)
        vision.copy_(kept[0])
        weight.copy_(kept[1])
    assert changed != before and len(before) == 20
    assert storage.weights_fingerprint(torch.nn.Linear(3, 2)) != storage.weights_fingerprint(torch.nn.Linear(2, 3))
