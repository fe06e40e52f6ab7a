"""MIMIC: each loss term on hand-made inputs, the optimisation on a tiny model, errors, and the phenomenon."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vlminterp_utils import classifier as clf
from vlminterp_utils import inversion as V


def test_patch_boundary_loss_sees_only_jumps_at_patch_boundaries():
    # constant within each 4x4 patch, jumping by 1 between patches along columns: every boundary pair differs by 1
    stripes = (torch.arange(8) // 4 % 2).float().repeat(8, 1)[None, None]
    assert V.patch_boundary_loss(stripes, 4) == pytest.approx(1.0)  # columns: 1 per pair; rows: 0
    # the same jump placed inside patches (at column 2 and 6) is not a boundary jump
    inside = ((torch.arange(8) + 2) // 4 % 2).float().repeat(8, 1)[None, None]  # 0 0 1 1 1 1 0 0
    assert V.patch_boundary_loss(inside, 4) == pytest.approx(0.0)
    assert V.patch_boundary_loss(torch.rand(1, 3, 8, 8), 8) == 0  # no boundary inside a single patch


def test_total_variation_terms_on_hand_made_images():
    flat = torch.full((1, 1, 6, 6), 0.3)
    assert V.tv_l1(flat) == 0 and V.tv_l2(flat) == 0
    ramp = torch.arange(6).float().repeat(6, 1)[None, None] / 10  # +0.1 per column
    # horizontal 0.1, vertical 0, two diagonals 0.1 each
    assert V.tv_l1(ramp) == pytest.approx(0.3)
    assert V.tv_l2(ramp) == pytest.approx(0.03)
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2).float()[None, None]
    assert V.tv_l1(checker) == pytest.approx(2.0)  # horizontal and vertical neighbours always differ, diagonals never


def test_l2_prior_measures_distance_from_mid_gray():
    assert V.l2_prior(torch.full((1, 3, 4, 4), 0.5)) == 0
    assert V.l2_prior(torch.ones(1, 3, 4, 4)) == pytest.approx(0.25)


def test_feature_loss_is_zero_at_the_images_own_statistics():
    states = tuple(torch.randn(2, 16, 8) * (i + 1) for i in range(3))
    mean, var = V.token_statistics(states)
    assert V.feature_loss(states, {"mean": mean, "var": var}) == pytest.approx(0.0, abs=1e-10)
    assert V.feature_loss(states, {"mean": mean + 1, "var": var}) > 0.01


def test_a_few_steps_lower_the_loss_and_allocate_no_weight_gradient(tiny):
    model, processor, adapter = tiny
    stats = V.concept_stats(adapter, "red", "circle", n_images=4, cache=False)
    flags = [p.requires_grad for p in model.parameters()]
    result = V.invert(adapter, "Describe the image.", "a red circle", stats,
                      V.InversionConfig(steps=25, progress=False))
    totals = result.history.total
    assert totals.iloc[-5:].mean() < totals.iloc[:3].mean()
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert set(result.history.columns) >= {"ce", "feature", "patch", "tv_l2", "l2", "total", "lr"}
    assert result.images[0].size == (adapter.image_size, adapter.image_size) and 0 <= result.target_probability[0] <= 1


def test_bad_prompts_and_targets_get_clear_errors(tiny):
    _, _, adapter = tiny
    config = V.InversionConfig(steps=1, progress=False, feature=0)
    with pytest.raises(ValueError, match="bad target text"):
        V.invert(adapter, "Describe the image.", "  ", config=config)
    with pytest.raises(ValueError, match="image placeholder"):
        V.invert(adapter, "<image> Describe", "a red circle", config=config)
    with pytest.raises(ValueError, match="2 prompts for 3 target texts"):
        V.invert(adapter, ["a", "b"], ["x", "y", "z"], config=config)
    with pytest.raises(ValueError, match="concept statistics"):
        V.invert(adapter, "Describe the image.", "a red circle", config=V.InversionConfig(steps=1))
    for bad, message in [(dict(init="zeros"), "unknown init 'zeros'; choose one of gray, noise, blank"),
                         (dict(jitter_mode="wrap"), "unknown jitter_mode 'wrap'; choose one of roll, reflect"),
                         (dict(steps=0), "steps >= 1")]:
        with pytest.raises(ValueError, match=message):
            V.invert(adapter, "Describe the image.", "a red circle", config=replace(config, **bad))


def test_jitter_shifts_each_image_by_its_own_offset_and_reflect_never_wraps():
    generator = torch.Generator().manual_seed(0)
    ramp = (torch.arange(8).float() / 7).repeat(3, 8, 1)  # (3, 8, 8): brightness grows to the right
    pixels = ramp.repeat(16, 1, 1, 1)
    rolled = V.jittered(pixels, V.InversionConfig(jitter=3), generator)
    assert len({tuple(view[0, 0].tolist()) for view in rolled}) > 1  # the images of a batch move apart
    reflected = V.jittered(pixels, V.InversionConfig(jitter=3, jitter_mode="reflect"), generator)
    for view in reflected:
        row = view[0, 0]
        # a horizontal shift of a ramp, reflected at the border: values stay within one step of their neighbours
        # (wrapping around would put the brightest column next to the darkest)
        assert (row[1:] - row[:-1]).abs().max() <= 1 / 7 + 1e-6
    assert torch.equal(V.jittered(pixels, V.InversionConfig(jitter=0), generator), pixels)


def test_initial_images_gray_noise_and_blank():
    generator = torch.Generator().manual_seed(0)
    gray = V.initial_pixels(2, 8, V.InversionConfig(), generator)
    assert (gray - 0.5).abs().mean() < 0.1 and gray.shape == (2, 3, 8, 8)
    noise = V.initial_pixels(2, 8, V.InversionConfig(init="noise"), generator)
    # N(0, 1) clipped to [0, 1]: about half the pixels are black, about a sixth white
    assert 0.35 < (noise == 0).float().mean() < 0.65 and 0.05 < (noise == 1).float().mean() < 0.3
    assert V.initial_pixels(1, 8, V.InversionConfig(init="blank"), generator).eq(0).all()


def test_classifier_ships_with_its_accuracy_and_names_rendered_objects():
    model = clf.load()
    accuracy = clf.accuracy(model, n=200)
    assert accuracy["both"] >= 0.95  # the shipped metadata states its held-out accuracy; this re-measures it


def test_classifier_still_names_blurred_noisy_renders():
    """Inverted images are never crisp: the judge must hold up on degraded real renders (held out, seed fixed).
    Trained on clean renders only, it fell to 50% shape accuracy at blur 1.5 and 28% colour with noise 0.05."""
    sigma, noise = clf.DEGRADED
    accuracy = clf.accuracy(clf.load(), n=200, sigma=sigma, noise=noise)
    assert accuracy["both"] >= 0.95  # measured 100% on 500; 0.95 leaves room for a retrained judge


def test_a_confusion_matrix_has_a_row_per_concept_that_sums_to_one():
    names = V.concept_names()
    assert len(names) == 15 and names[0] == "red circle"
    matrix = V.confusion(["red circle", "red circle", "blue square"], ["red circle", "blue square", "blue square"])
    assert matrix.shape == (15, 15) and list(matrix.index) == names == list(matrix.columns)
    assert matrix.loc["red circle", "red circle"] == 0.5 and matrix.loc["red circle", "blue square"] == 0.5
    assert matrix.loc["blue square", "blue square"] == 1
    assert matrix.loc["green circle"].isna().all()  # no image of it: no share, not zeros


def test_the_judge_names_renders_of_every_concept_it_has_not_seen():
    """The positive control chapter 3 shows beside the judge's confusion on inversions: on 300 unseen renders
    (about 20 per concept) every concept's row puts most of its mass on the diagonal."""
    renders = V.judge_on_renders(clf.load())
    diagonal = np.diag(renders.to_numpy())
    assert np.isfinite(diagonal).all() and diagonal.min() >= 0.8, renders  # 100% on the held-out set


def test_gaussian_blur_keeps_flat_images_and_mass():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(clf.gaussian_blur(flat, 2.0), flat)
    dot = torch.zeros(1, 3, 33, 33)
    dot[..., 16, 16] = 1
    blurred = clf.gaussian_blur(dot, 1.5)
    assert torch.allclose(blurred.sum((2, 3)), torch.ones(1, 3), atol=1e-5) and blurred[..., 16, 16].max() < 0.2


@pytest.mark.phenomenon
@pytest.mark.parametrize("seed", [0, 1])
def test_all_terms_make_recognisable_images_more_often_than_ce_alone(shapes_llava, seed):
    """MIMIC's point, on shapes-llava, on concepts the recipe was not tuned on: the first 6 of
    `inversion.HELD_OUT_CONCEPTS` (the chapter's four and two more; steps and learning rate were chosen on
    `TUNING_CONCEPTS`), the default recipe (75 steps at lr 0.1; about 6 minutes per seed), each seed a separate test
    so that two workers share them.

    Measured: `benchmarks/bench_mimic_recipe.py --concepts held-out --seed S` on one thread gave all terms 3 of 6
    and CE alone 1 of 6 on seeds 0 and 1; inside `make test` (two workers) seed 0 gave 1 and 1. The rounding of
    another thread count, amplified by 75 Adam steps, moves two of the three full-recipe hits: on held-out concepts
    the advantage is that fragile at this size, and chapter 3's paired interval (concepts resampled) says "cannot
    tell". So this test asks only what held on every run: the full recipe recognises at least as many as CE alone,
    and at least one image. On the tuning concepts it was strictly more on both seeds (2 vs 0), which is no
    evidence, since the recipe was chosen there."""
    _, _, adapter = shapes_llava
    concepts = list(V.HELD_OUT_CONCEPTS[:6])
    assert not set(concepts) & set(V.TUNING_CONCEPTS)
    recipes = {k: V.ABLATIONS[k] for k in ("CE only", "all")}
    table, _ = V.ablation_grid(adapter, concepts, seeds=(seed,), base=V.InversionConfig(progress=False),
                               ablations=recipes)
    recognised = table.groupby("ablation").recognised.sum()
    print(f"seed {seed}, recognised of 6:", recognised.to_dict())
    assert recognised["all"] >= max(1, recognised["CE only"]), table


def test_the_concepts_the_recipe_was_tuned_on_are_held_out_of_the_chapter():
    assert len(set(V.TUNING_CONCEPTS) | set(V.HELD_OUT_CONCEPTS)) == 15  # the whole world, split
    assert not set(V.TUNING_CONCEPTS) & set(V.HELD_OUT_CONCEPTS)
    V.crossed_pairs(list(V.HELD_OUT_CONCEPTS[:4]))  # the chapter's four can be crossed


def test_crossed_pairs_need_concepts_that_differ_in_colour_and_shape():
    concepts = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert V.crossed_pairs(concepts) == [(concepts[0], concepts[1]), (concepts[1], concepts[2]),
                                         (concepts[2], concepts[0])]
    with pytest.raises(ValueError, match="share a colour or a shape"):
        V.crossed_pairs([("red", "circle"), ("red", "square")])
    with pytest.raises(ValueError, match="at least two"):
        V.crossed_pairs([("red", "circle")])


def test_template_ablation_and_repeats_give_one_row_per_inversion(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    concepts = [("red", "circle"), ("blue", "square")]
    config = V.InversionConfig(steps=1, progress=False)
    table, images = V.template_ablation(adapter, concepts, V.TEMPLATES[:2], base=config, repeats=2)
    assert table.groupby("template").size().to_dict() == {t: 4 for t in V.TEMPLATES[:2]}
    assert sorted(table.loc[table.template == V.TEMPLATES[0], "repeat"]) == [0, 0, 1, 1]
    assert set(images) == {(t, c, s, r) for t in V.TEMPLATES[:2] for c, s in concepts for r in (0, 1)}
    # two repeats of one concept start from different noise, so they are different images
    first, second = (images[(V.TEMPLATES[0], "red", "circle", r)] for r in (0, 1))
    assert first.tobytes() != second.tobytes()
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        V.ablation_grid(adapter, concepts, base=config, repeats=0)


def test_recipe_variants_name_each_variant_and_summarise_with_intervals(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    concepts = [("red", "circle")]
    config = V.InversionConfig(steps=1, progress=False)
    grid, _ = V.ablation_grid(adapter, concepts, base=config, ablations={"all": {}}, repeats=2)
    table, images = V.recipe_variants(adapter, concepts, config, repeats=2, reference=grid)
    names = ["this book's recipe", f"prompt: {V.TEMPLATES[1]}", f"prompt: {V.TEMPLATES[2]}",
             "official start and jitter"]
    assert list(dict.fromkeys(table.variant)) == names
    assert set(images) == {(v, "red", "circle", r) for v in names[1:] for r in (0, 1)}
    summary = V.recognition_summary(table, "variant")
    assert list(summary.index) == names and (summary.n == 2).all()
    assert ((summary.ci_low <= summary.recognised) & (summary.recognised <= summary.ci_high)).all()
    # the official jitter: 16 pixels at 336, the same fraction of a 64-pixel image
    assert V.official_start(336)["jitter"] == 16 and V.official_start(64)["jitter"] == 3


def test_statistics_vs_answer_says_whose_colour_and_shape_each_image_has(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    concepts = [("red", "circle"), ("blue", "square")]
    table, images = V.statistics_vs_answer(adapter, concepts, V.InversionConfig(steps=2, progress=False),
                                           repeats=2)
    assert table.statistics_of.tolist() == ["red circle", "blue square"] * 2
    assert table.answer.tolist() == ["blue square", "red circle"] * 2 and len(images) == 4
    for row in table.itertuples():
        colour, shape = row.classifier.split()
        expected = "statistics" if colour == row.statistics_of.split()[0] else \
            "answer" if colour == row.answer.split()[0] else "neither"
        assert row.colour_from == expected
        assert row.shape_from in {"statistics", "answer", "neither"}
