"""Chapter 1: the experiment helpers on a tiny model, and the localization phenomena on shapes-llava."""
import numpy as np
import pandas as pd
import pytest
import torch

from vlminterp_utils import interventions as I
from vlminterp_utils import lenses, localization as L, shapes
from vlminterp_utils.core.readout import first_answer_token


def test_items_target_the_object_their_question_names():
    for setting in ("vqa", "polling"):
        for item in L.make_items(setting, 60, 3, 64):
            q, obj = item.example.question, item.object
            assert obj.shape in q or obj.color in q
            if setting == "polling":
                assert item.example.answer == "yes" and obj.name in q


def test_attribution_target_points_at_the_objects_colour_word(tiny):
    _, _, adapter = tiny
    for item in L.make_items("generative", 20, 4, adapter.image_size):
        prefix, token = L.attribution_target(adapter, item)
        caption = item.example.answer
        assert (prefix + adapter.tokenizer.decode([token])) == caption[:len(prefix) + 1 + len(item.object.color)]
        assert caption.startswith(prefix) and prefix.endswith("a")
    vqa = L.make_items("vqa", 1, 0, adapter.image_size)[0]
    assert L.attribution_target(adapter, vqa) == ("", first_answer_token(adapter, vqa.example.answer))


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="known settings"):
        L.make_items("captioning", 2, 0, 64)
    with pytest.raises(ValueError, match="known settings"):
        L.AblationSpec(settings=("captioning",))
    with pytest.raises(ValueError, match="unknown token selection 'loudest'"):
        L.AblationSpec(methods=("object", "loudest"))


def test_an_ablation_spec_lists_its_jobs_once():
    spec = L.AblationSpec(methods=("object", "random_outside"), buffers=(0, 1), outside_buffers=(1,))
    assert spec.jobs() == [("object", 0, "mean"), ("object", 1, "mean"), ("random_outside", 1, "mean")]
    assert [it.example.question for it in spec.items("vqa", 64)] == [
        it.example.question for it in L.make_items("vqa", spec.n, spec.seed, 64)]


def test_knockout_blocks_have_the_right_edges(tiny):
    _, _, adapter = tiny
    items = L.make_items("vqa", 2, 0, adapter.image_size)
    batch = adapter.inputs([it.example.scene.image for it in items], [it.example.question for it in items])
    blocks = L.knockout_blocks(adapter, items, batch)
    visual = batch["input_ids"] == adapter.image_token_id
    obj = blocks["object → last"][:, -1]
    non = blocks["non-object → last"][:, -1]
    assert (obj | non).eq(visual).all() and not (obj & non).any()  # a partition of the visual tokens
    assert blocks["object → last"][:, :-1].sum() == 0  # only the last position loses edges
    rows, cols = adapter.grid
    last_row_queries = blocks["object → last row"].any(-1)
    assert last_row_queries.sum(-1).le(cols).all()
    other = blocks["other visual → last row"]
    assert other.any(-1).sum(-1).le(cols).all()  # its queries sit in the last row too
    keys = other.any(1)
    assert not (keys & obj).any() and not (keys & other.any(-1)).any() and (keys <= visual).all()
    # the count-matched control: as many random keys as the object has, drawn from the other visual tokens (all
    # of them where fewer exist; an item whose last row is all object has no query, so no edge at all)
    random_keys, queried = blocks["random → last row"].any(1), last_row_queries.any(-1)
    matched = torch.minimum(obj.sum(-1), (visual & ~obj & ~blocks["other visual → last row"].any(-1)
                                          & ~last_row_queries).sum(-1))
    assert queried.any() and random_keys.sum(-1)[queried].eq(matched[queried]).all()
    assert (random_keys <= keys).all()
    assert (blocks["random → last row"].any(-1) <= last_row_queries).all()  # its queries: the last row


def _records(rows):
    return pd.DataFrame([dict(zip(["method", "item", "before", "after"], r), setting="vqa", buffer=1, mode="mean",
                              fixed_count=0, overlap=0.0) for r in rows])


def test_items_without_room_for_a_control_leave_every_selection():
    records = _records([("object", 0, True, False), ("random_outside", 0, True, True),
                        ("object", 1, True, False)])  # item 1 had no room outside the object
    kept, dropped = L.common_items(records)
    assert sorted(kept.item.unique()) == [0] and dropped.dropped.tolist() == [1]


def test_paired_flips_compare_selections_on_the_same_questions():
    rows = [("object", i, True, i >= 9) for i in range(12)]  # 9 of 12 flipped by the object's tokens
    rows += [("random", i, True, True) for i in range(12)]  # none by random ones
    rows += [("object", 12, False, False), ("random", 12, False, False)]  # wrong before: no flip to count
    paired = L.paired_flips(_records(rows)).iloc[0]
    assert (paired.control, paired.n, paired.first_flips, paired.control_flips) == ("random", 12, 0.75, 0.0)
    assert paired.verdict == "higher" and paired.p_value == pytest.approx(2 * 0.5 ** 9)


def test_word_token_ids_and_lens_views(tiny):
    _, _, adapter = tiny
    ids = L.word_token_ids(adapter.tokenizer, "red")
    assert ids and all(adapter.tokenizer.decode([i]).strip().lower() == "red" for i in ids)
    example = shapes.example(0, 0, "caption", size=adapter.image_size)
    maps, tops = L.lens_views(adapter, example, "red")
    assert maps.shape == (adapter.n_layers + 1, adapter.n_visual_tokens)
    assert ((maps >= 0) & (maps <= 1)).all()
    assert len(tops) == adapter.n_layers + 1 and len(tops[0]) == adapter.n_visual_tokens


def test_the_lens_viewer_holds_every_layer_of_every_lens_and_escapes_words(tiny):
    """The viewer runs in the browser (no kernel); tests/test_browser.py moves its slider in Chromium."""
    import html
    import json
    import re

    from vlminterp_utils import plotting
    _, _, adapter = tiny
    example = shapes.example(0, 0, "caption", size=adapter.image_size)
    _, tops = L.lens_views(adapter, example, "red")
    regions = adapter.token_regions(example.scene.image.size)
    tops[1][0] = "</script><b>"  # a word must not end the viewer's script
    page = plotting.viewer_page(example.scene.image, {"logit lens": tops, "copy": tops[::-1]}, regions)
    assert page.count("</script>") == 1 and '<select id="n">' in page
    data = json.loads(re.search(r"const D=(.*?), B=", page).group(1).replace("<\\/", "</"))
    assert data["logit lens"] == tops and data["copy"] == tops[::-1]
    single = plotting.viewer_page(example.scene.image, {"logit lens": tops}, regions)
    assert '<select id="n" hidden>' in single  # one lens: no menu
    inline = plotting.lens_viewer(example.scene.image, tops, regions).data
    assert '<iframe class="lens-viewer" srcdoc="' in inline and html.unescape(inline).count("</script>") == 1


def test_the_judge_matches_words_not_substrings():
    obj = shapes.render_scene([("red", "circle", 10, 10, 16)]).objects[0]
    assert lenses.normalize_word(" Circles") == "circle"
    assert lenses.names_object(["the", " Red"], obj)
    assert lenses.names_object(["circle"], obj)
    assert not lenses.names_object(["redd", "circular", "blue"], obj)
    assert lenses.names_background([" white"]) and not lenses.names_background(["red"])


def test_logit_lens_describe_returns_words_per_token(tiny):
    _, _, adapter = tiny
    h = torch.randn(2, 3, adapter.text_config.hidden_size)
    out = lenses.LogitLens(adapter).describe(h, layer=0, k=4)
    assert len(out) == 2 and len(out[0]) == 3 and len(out[0][0]) == 4
    scores = [s for _, s in out[0][0]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)


# ---------------------------------------------------------------------------------------------- phenomena

@pytest.mark.phenomenon
def test_object_token_ablation_flips_more_answers_than_random_ablation(shapes_llava):
    """Neo et al.'s central ablation result, on 64 fixed VQA questions (seed 0), buffer 1, mean ablation: the
    object's tokens against as many random tokens, and against as many random tokens outside the object (which
    cannot borrow the object's own tokens), each paired on the same questions."""
    _, _, adapter = shapes_llava
    items = L.make_items("vqa", 64, 0, adapter.image_size)
    jobs = [(method, 1, "mean") for method in ("object", "random", "random_outside")]
    records = L.ablation_records(adapter, items, "vqa", jobs)
    records, _ = L.common_items(records)
    paired = L.paired_flips(records).set_index("control")
    assert paired.n.min() >= 40, paired  # enough correct answers to measure flips on (measured: 62 of 64)
    # Exact McNemar at 5% on the questions that one selection flips and the other does not: the gap is not
    # sampling noise of this set of questions (measured before this test was paired: 95% intervals apart).
    assert (paired.verdict == "higher").all() and (paired.p_value < 0.05).all(), paired
    overlap = records.groupby("method").overlap.mean()
    assert overlap["random_outside"] < overlap["random"], overlap


@pytest.mark.phenomenon
def test_object_to_last_knockout_hurts_far_more_than_non_object_to_last(shapes_llava):
    """Blocking the answer position from the object's tokens in all layers vs from every other visual token, paired
    on the same 32 questions (seed 1)."""
    _, _, adapter = shapes_llava
    items = L.make_items("vqa", 32, 1, adapter.image_size)
    records = L.knockout_records(adapter, items, windows={"all": list(range(adapter.n_layers))},
                                 knockouts=("object → last", "non-object → last"))
    paired = L.paired_knockouts(records, "object → last", "non-object → last").iloc[0]
    means = records[records.correct].groupby("knockout")["drop"].mean()
    # "Far more": the paired difference's bootstrap 95% interval lies above zero, and the mean drop is at least
    # twice as large, although the non-object set has several times more tokens.
    assert paired.verdict == "higher" and paired.ci_low > 0, paired
    assert means["object → last"] > 2 * means["non-object → last"], means


def test_count_matched_controls_select_as_many_tokens_as_the_object(tiny):
    _, _, adapter = tiny
    items = L.make_items("vqa", 3, 2, adapter.image_size)
    batch = adapter.inputs([it.example.scene.image for it in items], [it.example.question for it in items])
    mean = I.mean_visual_token(adapter, n_images=4, cache=False)
    rng = np.random.default_rng(0)
    objects = L.select_tokens(adapter, items, batch, "object", 1, rng, mean)
    for it, mask in zip(items, objects):
        assert np.array_equal(mask.numpy(), I.object_tokens(adapter, it.example.scene, 1, [it.target]))
    for method in ("random", "high_norm", "high_gradient"):
        masks = L.select_tokens(adapter, items, batch, method, 1, rng, mean, ig_steps=2)
        assert masks.shape == objects.shape and torch.equal(masks.sum(-1), objects.sum(-1)), method
    with pytest.raises(ValueError, match="known"):
        L.select_tokens(adapter, items, batch, "loudest", 1, rng, mean)


def test_fixed_count_selections_take_that_many_tokens_whatever_the_object(grid_adapter):
    scenes = [shapes.render_scene([("red", "circle", 28, 28, 10)], size=64),
              shapes.render_scene([("blue", "square", 4, 4, 40)], size=64)]
    items = [L.Item(shapes.Example(s, "What colour is it?", s.objects[0].color, "vqa_color", 0, (0,)), 0)
             for s in scenes]
    scores = torch.arange(64.0).repeat(2, 1)
    rng = np.random.default_rng(0)
    for method in ("random", "high_norm", "random_outside"):
        masks = L.select_tokens(grid_adapter, items, None, method, 1, rng, None, scores=scores, count=5)
        assert masks.sum(1).tolist() == [5, 5], method
    top = L.select_tokens(grid_adapter, items, None, "high_norm", 1, rng, None, scores=scores, count=3)
    assert np.flatnonzero(top[0]).tolist() == [61, 62, 63]  # the three highest scores
    with pytest.raises(ValueError, match="controls only"):
        L.select_tokens(grid_adapter, items, None, "object", 1, rng, None, count=3)


@pytest.mark.filterwarnings("ignore:no .* answered correctly")  # a random tiny model
def test_the_fixed_count_sweep_has_a_row_per_method_and_count(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    items = L.make_items("vqa", 4, 0, adapter.image_size)
    mean = I.mean_visual_token(adapter, n_images=4, cache=False)
    table = L.fixed_count_sweep(adapter, items, "vqa", counts=(1, 4), methods=("random", "high_norm"),
                                mean_token=mean)
    assert table[["method", "fixed_count"]].values.tolist() == [["object", 0], ["random", 1], ["random", 4],
                                                                ["high_norm", 1], ["high_norm", 4]]
    assert (table.n == 4).all()


def test_controls_outside_the_object_never_pick_its_tokens_and_say_their_overlap(grid_adapter):
    """On shapes-llava's 8 x 8 grid: one small object, then one that leaves too few tokens outside it."""
    small = shapes.render_scene([("red", "circle", 28, 28, 10)], size=64)
    large = shapes.render_scene([("blue", "square", 4, 4, 56)], size=64)
    items = [L.Item(shapes.Example(s, "What colour is it?", s.objects[0].color, "vqa_color", 0, (0,)), 0)
             for s in (small, large)]
    scores = torch.arange(64.0).repeat(2, 1)  # a high-norm-like ranking
    rng = np.random.default_rng(0)
    objects = L.select_tokens(grid_adapter, items, None, "object", 1, rng, None)
    touched = [I.object_tokens(grid_adapter, it.example.scene, 0, [0]) for it in items]
    for method in L.CONTROLS_OUTSIDE:
        masks = L.select_tokens(grid_adapter, items, None, method, 1, rng, None, scores=scores)
        assert masks[0].sum() == objects[0].sum() and not (masks[0].numpy() & touched[0]).any(), method
        assert not masks[1].any()  # no count-matched control fits outside the large square: none is drawn
    overlap = L.overlap_with_object(grid_adapter, items, objects)
    assert overlap.tolist() == [1.0, 1.0]  # the object's own selection lies wholly in its buffer-1 tokens
    plain = L.select_tokens(grid_adapter, items[:1], None, "high_norm", 1, rng, None, scores=scores[:1])
    assert 0 <= L.overlap_with_object(grid_adapter, items[:1], plain)[0] <= 1


@pytest.mark.filterwarnings("ignore:no .* answered correctly")  # a random tiny model; said and tested below
def test_the_ablation_table_has_a_row_per_condition_with_intervals(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    table = L.ablation_table(adapter, L.AblationSpec(settings=("vqa", "polling"), methods=("object", "random"),
                                                     buffers=(0, 1), n=4, seed=0))
    assert len(table) == 2 * 2 * 2
    assert set(table.columns) >= {"setting", "method", "buffer", "mode", "initially_correct", "flip_rate",
                                  "ci_low", "ci_high"}
    judged = table.dropna(subset=["flip_rate"])  # a random tiny model may answer nothing right: NaN, not 0
    assert ((judged.ci_low <= judged.flip_rate) & (judged.flip_rate <= judged.ci_high)).all()
    assert (table.initially_correct <= table.n).all()


@pytest.mark.filterwarnings("ignore:no .* answered correctly")  # a random tiny model
def test_the_ablation_table_computes_attributions_once_per_batch(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    calls = {"ig": 0}
    ig = I.integrated_gradients

    def counted(*args, **kwargs):
        calls["ig"] += 1
        return ig(*args, **kwargs)

    monkeypatch.setattr(I, "integrated_gradients", counted)
    L.ablation_table(adapter, L.AblationSpec(settings=("vqa",), methods=L.METHODS_WITH_OUTSIDE, buffers=(0, 1, 2),
                                             n=4, batch_size=2))
    assert calls["ig"] == 2  # two batches: one attribution each, reused by three buffers and the twin outside


def test_every_row_of_the_ablation_table_equals_the_row_computed_alone(shapes_llava):
    """Shared work changes no result: each control draws from its own seeded generator."""
    _, _, adapter = shapes_llava
    methods = ("object", "random", "high_norm")  # the high-gradient scores are shared as tested above
    table = L.ablation_table(adapter, L.AblationSpec(settings=("vqa",), methods=methods, buffers=(0, 2), n=6,
                                                     batch_size=6))
    assert table.initially_correct.min() > 0 and table.flip_rate.nunique() > 1
    items = L.make_items("vqa", 6, 0, adapter.image_size)
    for row in table.itertuples():
        alone = L.ablation_flips(adapter, items, "vqa", row.method, row.buffer, batch_size=6)
        assert (alone["flip_rate"], alone["ci_low"], alone["ci_high"]) == (row.flip_rate, row.ci_low, row.ci_high)


def test_examples_carry_the_object_a_chapter_1_item_is_about():
    ex = shapes.example(5, 0, "vqa_color")
    item = L.make_items("vqa", 1, 5, 64)[0]
    assert item.target == ex.targets[0]
    negative = shapes.example(0, 1, "polling", positive=False)
    with pytest.raises(ValueError, match="not one"):
        L.single_target(negative)


def test_nothing_answered_right_is_said_plainly(tiny, monkeypatch, tmp_path):
    """A random tiny model answers no question right: the table holds NaN and a warning says why and what to do."""
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    with pytest.warns(UserWarning, match="answered correctly before the intervention.*question_suffix"):
        table = L.ablation_table(adapter, L.AblationSpec(settings=("vqa",), methods=("object",), buffers=(1,), n=3))
    assert table.initially_correct.iloc[0] == 0 and np.isnan(table.flip_rate.iloc[0])
    assert "vqa question of 3" in L.explain_unanswered(table)


def test_items_carry_a_models_answer_style():
    items = L.make_items("vqa", 2, 0, 64, question_suffix=" Answer with one word.", answer_prefix="It is")
    assert items[0].question.endswith("? Answer with one word.") and items[0].answer_prefix == "It is"
    captions = L.make_items("generative", 2, 0, 64, question_suffix=" x", answer_prefix="y")
    assert captions[0].question == shapes.CAPTION_PROMPT and captions[0].answer_prefix == ""


def test_the_noise_filter_noises_exactly_the_objects_patches_and_keeps_what_noise_breaks(tiny):
    _, _, adapter = tiny
    items = L.make_items("vqa", 3, 0, adapter.image_size)
    item = items[0]
    before = np.array(item.example.scene.image.convert("RGB"))
    after = np.array(L.noised_object(adapter, item, np.random.default_rng(0)))
    changed = (before != after).any(-1)
    regions = adapter.token_regions(item.example.scene.image.size)
    covered = np.zeros_like(changed)
    for x0, y0, x1, y1 in regions[adapter.object_tokens(item.object.mask, 0)].astype(int):
        covered[y0:y1, x0:x1] = True  # shapes-llava's grid: whole-pixel boxes
    assert covered[item.object.mask].all()  # every object pixel lies in a noised patch
    assert not changed[~covered].any() and changed[covered].mean() > 0.9  # noise there, and nowhere else
    table = L.noise_filter(adapter, items, "vqa", batch_size=2)
    assert table.item.tolist() == [0, 1, 2]
    assert (table.kept == (table.clean & ~table.noised)).all()


def test_flip_rates_split_by_object_size(tiny):
    _, _, adapter = tiny
    spec = L.AblationSpec(settings=("vqa",), n=6)
    sizes = L.object_sizes(adapter, spec)
    assert len(sizes) == 6 and (sizes.object_tokens > 0).all() and (sizes.object_share <= 1).all()
    records = _records([("object", i, True, i % 2 == 0) for i in range(6)])
    table = L.flips_by_size(records, sizes, bins=2)
    assert table["n"].sum() == 6 and table["size"].str.endswith("tokens").all()
    lower = table["size"].str.extract(r"^(\d+)")[0].astype(int)
    assert lower.is_monotonic_increasing  # the smallest objects first


def test_paired_windows_pairs_the_items_answered_right_and_nothing_without_one():
    rows = [{"knockout": "object → last", "window": w, "first_layer": 0, "item": i, "drop": d, "correct": i < 3}
            for w, base in (("early", 0.1), ("late", 0.4)) for i in range(4) for d in [base + 0.01 * i]]
    test = L.paired_windows(pd.DataFrame(rows), "object → last", "late", "early")
    assert test["n"] == 3 and test["difference"] == pytest.approx(0.3)  # item 3 was answered wrong: left out
    nothing = L.paired_windows(pd.DataFrame(rows).assign(correct=False), "object → last", "late", "early")
    assert nothing["n"] == 0 and nothing["verdict"] == "cannot tell"
    with pytest.raises(ValueError, match="no window 'middle'"):
        L.paired_windows(pd.DataFrame(rows), "object → last", "middle", "early")


def test_the_answer_style_defaults_to_the_short_answer_prompt_for_checkpoints_only():
    """The embedded models answer in one word as trained; any other checkpoint is asked to (the suffix ends the
    question the model sees); a suffix the reader gives wins."""
    assert L.answer_style("shapes-llava") == {"question_suffix": "", "answer_prefix": ""}
    assert L.answer_style("llava-hf/llava-1.5-7b-hf")["question_suffix"] == L.SHORT_ANSWER
    assert L.answer_style("Qwen/Qwen2-VL-2B-Instruct", " One word.", "It is")["question_suffix"] == " One word."
    item = L.make_items("vqa", 1, 0, 64, **L.answer_style("some/checkpoint"))[0]
    assert item.question.endswith("single word or phrase.") and item.example.question in item.question
