"""MIMIC: each loss term on hand-made inputs, the optimisation on a tiny model, errors, and the phenomenon."""
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


def test_gaussian_blur_keeps_flat_images_and_mass():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(clf.gaussian_blur(flat, 2.0), flat)
    dot = torch.zeros(1, 3, 33, 33)
    dot[..., 16, 16] = 1
    blurred = clf.gaussian_blur(dot, 1.5)
    assert torch.allclose(blurred.sum((2, 3)), torch.ones(1, 3), atol=1e-5) and blurred[..., 16, 16].max() < 0.2


@pytest.mark.phenomenon
def test_all_terms_make_recognisable_images_more_often_than_ce_alone(shapes_llava):
    """MIMIC's point, on shapes-llava: 6 concepts (the chapter's four and two more), seed 0, the default recipe
    (75 steps at lr 0.1; 4 to 7 minutes on one CPU core). The independent classifier names the target in more of
    the full-recipe inversions than of the CE-only ones. Measured on the shipped weights: 3 of 6 with all terms,
    0 of 6 with CE alone (textures of the answer's probability, never a shape); at 150 steps, lr 0.05, 2 vs 0; at 75
    steps, lr 0.05, 1 vs 0 (see `InversionConfig`). Strictly more is the claim; the margin is small, so the test
    asks for no more."""
    _, _, adapter = shapes_llava
    concepts = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "square"),
                ("purple", "circle"), ("red", "triangle")]
    recipes = {k: V.ABLATIONS[k] for k in ("CE only", "all")}
    table, _ = V.ablation_grid(adapter, concepts, seeds=(0,), base=V.InversionConfig(progress=False),
                               ablations=recipes)
    recognised = table.groupby("ablation").recognised.sum()
    print("recognised of 6:", recognised.to_dict())
    assert recognised["all"] > recognised["CE only"], table


def test_crossed_pairs_need_concepts_that_differ_in_colour_and_shape():
    concepts = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert V.crossed_pairs(concepts) == [(concepts[0], concepts[1]), (concepts[1], concepts[2]),
                                         (concepts[2], concepts[0])]
    with pytest.raises(ValueError, match="share a colour or a shape"):
        V.crossed_pairs([("red", "circle"), ("red", "square")])
    with pytest.raises(ValueError, match="at least two"):
        V.crossed_pairs([("red", "circle")])


def test_statistics_vs_answer_says_whose_colour_and_shape_each_image_has(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    _, _, adapter = tiny
    concepts = [("red", "circle"), ("blue", "square")]
    table, images = V.statistics_vs_answer(adapter, concepts, V.InversionConfig(steps=2, progress=False))
    assert table.statistics_of.tolist() == ["red circle", "blue square"]
    assert table.answer.tolist() == ["blue square", "red circle"] and len(images) == 2
    for row in table.itertuples():
        colour, shape = row.classifier.split()
        expected = "statistics" if colour == row.statistics_of.split()[0] else \
            "answer" if colour == row.answer.split()[0] else "neither"
        assert row.colour_from == expected
        assert row.shape_from in {"statistics", "answer", "neither"}
