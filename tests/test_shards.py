"""Sweeps split into shards merge into exactly what one run gives (`core.shards`, `workshop.sweep`)."""
import pandas as pd
import pytest
import torch

from vlminterp_utils import latentlens as LL, localization as L
from vlminterp_utils.core import shards
from vlminterp_utils.workshop import sweep


def test_shards_partition_the_units_and_bad_specs_say_how_to_write_them(monkeypatch):
    parts = [shards.units(10, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and parts[0] == [0, 3, 6, 9]
    assert shards.units(4, None) == [0, 1, 2, 3]
    for bad in ("3/3", "1-2", "a/b"):
        with pytest.raises(ValueError, match="'i/n'"):
            shards.parse(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shards.from_environment() == "1/4"


def test_missing_parts_are_named(tmp_path):
    shards.save_table(pd.DataFrame({"x": [1]}), tmp_path, "ablation", "0/3")
    shards.save_table(pd.DataFrame({"x": [2]}), tmp_path, "ablation", "2/3")
    with pytest.raises(ValueError, match="missing ablation.part-1-of-3.parquet"):
        shards.load_tables(tmp_path, "ablation")
    with pytest.raises(ValueError, match="no parts"):
        shards.load_tables(tmp_path, "knockout")


@pytest.mark.filterwarnings("ignore:no .* answered correctly")  # a random tiny model
def test_two_ablation_shards_equal_one_run(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    spec = L.AblationSpec(settings=("vqa", "polling"), buffers=(0, 1), n=5, batch_size=2)
    whole = L.ablation_sweep(adapter, spec)
    parts = [L.ablation_sweep(adapter, spec, shard=f"{i}/2") for i in range(2)]
    assert 0 < len(parts[1]) < len(whole)
    merged = pd.concat(parts).sort_values(["setting", "method", "buffer", "item"]).reset_index(drop=True)
    assert merged.equals(whole.sort_values(["setting", "method", "buffer", "item"]).reset_index(drop=True))
    pd.testing.assert_frame_equal(L.flip_table(pd.concat(parts)), L.flip_table(whole))


def test_two_knockout_shards_equal_one_run(tiny):
    _, _, adapter = tiny
    items = L.make_items("vqa", 5, 0, adapter.image_size)
    whole = L.knockout_records(adapter, items, window=2, batch_size=2)
    parts = pd.concat([L.knockout_records(adapter, items, window=2, batch_size=2, shard=f"{i}/2") for i in range(2)])
    key = ["knockout", "first_layer", "item"]
    assert parts.sort_values(key).reset_index(drop=True).equals(whole.sort_values(key).reset_index(drop=True))


def test_a_knockout_spec_runs_the_questions_and_windows_it_describes(tiny):
    """A sharded sweep rebuilds the experiment from its spec: the spec's questions, windows and knockouts, and the
    same records as the engine called by hand."""
    _, _, adapter = tiny
    spec = L.KnockoutSpec(n=5, seed=0, window=2, batch_size=2, knockouts=("object → last",))
    by_hand = L.knockout_records(adapter, L.make_items("vqa", 5, 0, adapter.image_size), window=2, batch_size=2,
                                 knockouts=("object → last",))
    parts = pd.concat([L.knockout_sweep(adapter, spec, shard=f"{i}/2") for i in range(2)])
    key = ["knockout", "first_layer", "item"]
    assert parts.sort_values(key).reset_index(drop=True).equals(by_hand.sort_values(key).reset_index(drop=True))
    windows = L.KnockoutSpec(window=99).layer_windows(adapter.n_layers)  # longer than the model: cut to its depth
    assert len(windows) == adapter.n_layers and next(iter(windows.values())) == list(range(adapter.n_layers))
    named = L.KnockoutSpec(windows={"all": [0, 1]}).layer_windows(adapter.n_layers)
    assert named == {"all": [0, 1]}
    with pytest.raises(ValueError, match="unknown setting 'captioning'"):
        L.KnockoutSpec(setting="captioning")
    with pytest.raises(ValueError, match="at least 1"):
        L.KnockoutSpec(n=0)


def test_chosen_knockouts_give_their_rows_of_the_full_run(tiny):
    _, _, adapter = tiny
    items = L.make_items("vqa", 3, 0, adapter.image_size)
    whole = L.knockout_records(adapter, items, window=2)
    chosen = L.knockout_records(adapter, items, window=2, knockouts=("non-object → last",))
    assert chosen.reset_index(drop=True).equals(whole[whole.knockout == "non-object → last"].reset_index(drop=True))
    with pytest.raises(ValueError, match="unknown knockout 'object -> last'; choose among object → last"):
        L.knockout_records(adapter, items, window=2, knockouts=("object -> last",))


def test_two_index_shards_merge_into_the_index_one_run_builds(tiny):
    _, _, adapter = tiny
    sentences = LL.load_corpus(limit=60)
    whole = LL.build_index(adapter, sentences, layers=[1, 2], cap=3, batch_size=8)
    parts = [LL.build_index(adapter, sentences, layers=[1, 2], cap=3, batch_size=8, shard=f"{i}/2")
             for i in range(2)]
    assert 0 < len(parts[0]) < len(whole)
    merged = LL.merge_parts(parts)
    assert merged.metadata.equals(whole.metadata)
    assert all(torch.equal(merged.embeddings[layer], whole.embeddings[layer]) for layer in (1, 2))
    with pytest.raises(ValueError, match="each entry of one index once"):
        LL.merge_parts(parts[:1])


@pytest.mark.filterwarnings("ignore:no .* answered correctly")
def test_the_sweep_command_writes_parts_and_merges_them(tiny_llava_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path / "cache"))
    common = ["--out", str(tmp_path / "runs"), "--model", str(tiny_llava_dir), "--n", "3", "--batch-size", "2",
              "--window", "2"]
    for i in range(2):
        sweep.main(["knockout", "--shard", f"{i}/2", *common])
    sweep.main(["merge", "knockout", *common])
    curve = pd.read_parquet(tmp_path / "runs" / "knockout.parquet")
    assert set(curve.knockout) == {"object → last", "non-object → last", "object → last row",
                                   "random → last row", "other visual → last row"}


def test_two_mimic_grid_shards_equal_one_run(tiny, monkeypatch, tmp_path):
    from vlminterp_utils import inversion as V
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    ablations = {name: V.ABLATIONS[name] for name in ("CE only", "all")}
    kwargs = dict(concepts=[("red", "circle")], seeds=(0, 1), base=V.InversionConfig(steps=2, progress=False),
                  ablations=ablations)
    whole, whole_images = V.ablation_grid(adapter, **kwargs)
    parts = [V.ablation_grid(adapter, **kwargs, shard=f"{i}/2") for i in range(2)]
    key = ["ablation", "seed", "concept"]
    merged = pd.concat([table for table, _ in parts]).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, whole.sort_values(key).reset_index(drop=True))
    images = {**parts[0][1], **parts[1][1]}
    assert images.keys() == whole_images.keys()
    assert all(images[k].tobytes() == whole_images[k].tobytes() for k in images)
