"""Chapter 2's bookkeeping on hand-made scenes: which patch is which, and when a reading counts as right."""
import numpy as np
import pandas as pd
import pytest
import torch

from vlminterp_utils import lenses, readout, shapes


@pytest.fixture
def scene():
    # a 16 px square at (8, 8) and a circle at (40, 40) on a 64 px image: 8 px patches, an 8x8 grid
    return shapes.render_scene([("red", "square", 8, 8, 16), ("blue", "circle", 40, 40, 16)])


def test_patch_kinds_follow_the_masks(scene, grid_adapter):
    kinds, owner = lenses.patch_kinds(grid_adapter, scene)
    grid = kinds.reshape(8, 8)
    assert (grid[1:3, 1:3] == "object").all() and (owner.reshape(8, 8)[1:3, 1:3] == 0).all()
    assert (grid[5:7, 5:7] == "object").all() and (owner.reshape(8, 8)[5:7, 5:7] == 1).all()
    assert grid[0, 0] == "ring" and grid[3, 3] == "ring"  # within one cell of the square
    assert grid[0, 7] == "background" and owner[7] == -1
    assert (kinds == "object").sum() == 8


def row(kind, obj, words, example=0):
    return pd.Series({"kind": kind, "object": obj, "words": words, "example": example})


def test_the_shapes_judge(scene):
    assert lenses.shapes_judge(row("object", 0, [" Red", "x"]), scene)
    assert lenses.shapes_judge(row("object", 1, ["circles"]), scene)
    assert not lenses.shapes_judge(row("object", 1, ["red"]), scene)  # another object's colour
    assert lenses.shapes_judge(row("background", -1, ["white"]), scene)
    assert not lenses.shapes_judge(row("background", -1, ["red"]), scene)
    assert lenses.shapes_judge(row("ring", -1, ["red"]), scene) is None  # not judged


def test_the_scene_judge_counts_false_alarms_on_the_background(scene):
    assert lenses.names_scene_judge(row("background", -1, ["blue"]), scene)
    assert not lenses.names_scene_judge(row("background", -1, ["white"]), scene)


def test_string_match_judge_uses_each_examples_labels(scene):
    judge = lenses.string_match_judge([{"dog"}, {"cat"}])
    assert judge(row("object", 0, [" Dog"], example=0), scene)
    assert not judge(row("object", 0, ["dog"], example=1), scene)


def test_interpretable_share_counts_judged_patches_only(scene):
    example = shapes.Example(scene, "Describe the image.", "", "caption", 0, (0, 1))
    readings = pd.DataFrame([
        {"layer": 0, "example": 0, "patch": 9, "kind": "object", "object": 0, "words": ["red"]},
        {"layer": 0, "example": 0, "patch": 45, "kind": "object", "object": 1, "words": ["dog"]},
        {"layer": 0, "example": 0, "patch": 7, "kind": "background", "object": -1, "words": ["white"]},
        {"layer": 0, "example": 0, "patch": 0, "kind": "ring", "object": -1, "words": ["red"]},
        {"layer": 1, "example": 0, "patch": 9, "kind": "object", "object": 0, "words": ["green"]},
    ])
    share = lenses.interpretable_share(readings, [example]).set_index("layer")
    assert share.loc[0, "n"] == 3 and share.loc[0, "share"] == pytest.approx(2 / 3)
    assert share.loc[1, "share"] == 0 and share.loc[1, "ci_low"] == 0
    assert (share.ci_low <= share.share).all() and (share.share <= share.ci_high).all()
    by_kind = lenses.interpretable_share(readings, [example], by=("layer", "kind"))
    assert set(by_kind.kind) == {"object", "background"}
    assert np.isclose(by_kind.set_index(["layer", "kind"]).loc[(0, "background"), "share"], 1.0)


# ------------------------------------------------------------------------------------------ chance controls

def grid_readings(n_examples=3, n_patches=6, layers=(0, 1)):
    return pd.DataFrame([{"layer": layer, "example": e, "patch": p, "kind": "object", "object": 0,
                          "words": [f"w{layer}-{e}-{p}"]}
                         for layer in layers for e in range(n_examples) for p in range(n_patches)])


def test_random_word_readings_draw_k_words_from_the_pool_with_a_seed():
    readings = grid_readings()
    control = lenses.random_word_readings(readings, ["a", "b", "c"], k=4, seed=1)
    assert control.drop(columns="words").equals(readings.drop(columns="words"))  # same patches
    assert all(len(w) == 4 and set(w) <= {"a", "b", "c"} for w in control.words)
    assert control.words.tolist() == lenses.random_word_readings(readings, ["a", "b", "c"], 4, seed=1).words.tolist()


def test_shuffled_readings_move_every_reading_within_its_image_and_layer():
    readings = grid_readings()
    shuffled = lenses.shuffled_readings(readings, seed=0)
    assert all(a != b for a, b in zip(readings.words, shuffled.words))  # no patch keeps its own reading
    for _, group in shuffled.groupby(["layer", "example"]):
        original = readings.loc[group.index]
        assert sorted(map(tuple, group.words)) == sorted(map(tuple, original.words))  # same image, same layer


def test_above_chance_subtracts_the_strongest_control_with_an_image_bootstrap():
    rows = []
    for e in range(10):
        for p in range(4):
            rows += [{"lens": "L", "reading": lenses.LENS, "layer": 0, "kind": "object", "example": e, "hit": 1.0},
                     {"lens": "L", "reading": lenses.RANDOM_WORDS, "layer": 0, "kind": "object", "example": e,
                      "hit": float(p == 0)},  # a quarter right by chance
                     {"lens": "L", "reading": lenses.SHUFFLED, "layer": 0, "kind": "object", "example": e,
                      "hit": float(p < 2 and e < 5)}]  # also a quarter, but all of it in five images
    out = lenses.above_chance(pd.DataFrame(rows)).iloc[0]
    assert out.share == 1 and out.chance == pytest.approx(0.25) and out.above == pytest.approx(0.75)
    assert out.n == 40
    # random words hit the same share in every image: no spread; the shuffled control's hits cluster in images
    assert out.control == lenses.RANDOM_WORDS and out.ci_low == pytest.approx(0.75)
    clustered = pd.DataFrame(rows).query("reading != @lenses.RANDOM_WORDS")
    spread = lenses.above_chance(clustered).iloc[0]
    assert spread.ci_low < 0.7 < 0.8 < spread.ci_high  # images resampled: a wide interval


def test_compare_with_chance_judges_each_lens_and_its_controls(tiny):
    _, _, adapter = tiny
    examples = shapes.make_examples(2, 0, "caption", size=adapter.image_size)
    judged = lenses.compare_with_chance(adapter, [lenses.LogitLens(adapter)], examples, k=2, layers=[0, 1])
    assert set(judged.reading) == {lenses.LENS, lenses.RANDOM_WORDS, lenses.SHUFFLED}
    counts = judged.groupby("reading").size()
    assert counts.nunique() == 1  # every control reads the same judged patches
    assert set(judged.hit.unique()) <= {0.0, 1.0} and set(judged.kind) <= {"object", "background"}


def test_several_lenses_read_from_one_pass_what_each_reads_alone(tiny, monkeypatch):
    _, _, adapter = tiny
    examples = shapes.make_examples(3, 0, "caption", size=adapter.image_size)
    pair = [lenses.LogitLens(adapter), lenses.EmbeddingLens(adapter)]
    passes = []
    real = lenses.visual_hidden_states
    monkeypatch.setattr(lenses, "visual_hidden_states", lambda *a: passes.append(1) or real(*a))
    together = lenses.readings_of_lenses(adapter, pair, examples, k=2, layers=[0, 2], batch_size=2)
    assert len(passes) == 2  # one forward pass per batch of images, not one per lens
    for lens, readings in zip(pair, together):
        alone = lenses.patch_readings(adapter, lens, examples, k=2, layers=[0, 2], batch_size=2)
        pd.testing.assert_frame_equal(readings, alone)


def test_the_chance_figures_draw_every_lens_and_reading():
    import matplotlib
    matplotlib.use("Agg")
    from vlminterp_utils import plotting
    rng = np.random.default_rng(0)
    judged = pd.DataFrame([{"lens": lens, "reading": reading, "layer": layer, "kind": kind, "example": e,
                            "hit": float(rng.random() < 0.3)}
                           for lens in ("A", "B") for reading in (lenses.LENS, lenses.RANDOM_WORDS, lenses.SHUFFLED)
                           for layer in range(3) for kind in ("object", "background") for e in range(4)])
    shares = lenses.share_table(judged, by=("lens", "reading", "layer", "kind"))
    fig = plotting.lens_chance_panels(shares)
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 2)  # kinds x lenses
    assert all(len(ax.lines) == 3 for ax in fig.axes)  # the lens and its two controls
    above = lenses.above_chance(judged, n_boot=50)
    fig = plotting.above_chance_panels(above)
    assert len(fig.axes) == 2 and all(len(ax.get_legend().get_texts()) == 2 for ax in fig.axes)


def test_the_residual_stream_is_hfs_hidden_states_but_for_the_final_norm(tiny):
    """Depth d < n_layers is HF's hidden_states[d]; depth n_layers is the last layer's output before the final
    norm, so the logit lens there gives the model's own logits (HF's last entry is already normed: the lens on
    it would apply the norm twice)."""
    _, _, adapter = tiny
    examples = [shapes.example(0, i, "caption", size=adapter.image_size) for i in range(2)]
    batch = adapter.inputs([e.scene.image for e in examples], [e.question for e in examples])
    with torch.no_grad(), readout.record_residual_stream(adapter) as stream:
        out = adapter.model(**batch, output_hidden_states=True, logits_to_keep=1)
    assert len(stream) == adapter.n_layers + 1
    for depth in range(adapter.n_layers):
        assert torch.equal(stream[depth], out.hidden_states[depth])
    assert torch.allclose(adapter.final_norm(stream[-1]), out.hidden_states[-1], atol=1e-6)
    probs = lenses.LogitLens(adapter).scores(stream[-1][:, -1])
    assert torch.allclose(probs, out.logits[:, -1].float().softmax(-1), atol=1e-6)
    states = readout.visual_hidden_states(adapter, examples)
    pos = adapter.visual_positions(batch["input_ids"])
    assert torch.equal(states[-1], stream[-1][torch.arange(2)[:, None], pos])
