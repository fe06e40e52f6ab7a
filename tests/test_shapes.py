"""The shapes world: ground truth by hand-checked cases, dilation, questions, seeding, errors."""
import collections

import numpy as np
import pytest

from vlminterp_utils import shapes


def square_at(x0, y0, side, size=64):
    return shapes.render_scene([("red", "square", x0, y0, side)], size=size).objects[0]


def test_circle_and_triangle_masks_are_inside_their_box():
    scene = shapes.render_scene([("blue", "circle", 2, 2, 20), ("green", "triangle", 30, 30, 20)])
    circle, triangle = scene.objects
    assert circle.box == (2, 2, 22, 22)
    x0, y0, x1, y1 = triangle.box
    assert 30 <= x0 and x1 <= 50 and 30 <= y0 and y1 <= 50
    # a triangle with apex up is wider at the bottom than at the top
    rows = np.nonzero(triangle.mask.any(1))[0]
    assert triangle.mask[rows[-1]].sum() > triangle.mask[rows[0]].sum()
    # areas near pi r^2 and half of s^2
    assert abs(circle.mask.sum() - np.pi * 100) < 15
    assert abs(triangle.mask.sum() - 200) < 25


def test_scenes_have_distinct_non_overlapping_objects_in_left_to_right_order():
    for i in range(200):
        scene = shapes.example(1, i, "caption").scene
        objs = scene.objects
        assert 1 <= len(objs) <= 3
        assert len({o.name for o in objs}) == len(objs)
        xs = [o.center[0] for o in objs]
        assert xs == sorted(xs) and all(b - a >= 0.16 * 64 - 1 for a, b in zip(xs, xs[1:]))
        total = np.sum([o.mask for o in objs], axis=0)
        assert total.max() == 1
        assert all(o.mask.any() for o in objs)


def test_caption_names_objects_left_to_right():
    scene = shapes.render_scene([("blue", "square", 40, 5, 14), ("red", "circle", 3, 30, 14),
                                 ("green", "triangle", 22, 40, 14)])
    assert shapes.caption(scene) == "a red circle, a green triangle and a blue square"
    one = shapes.render_scene([("yellow", "circle", 20, 20, 16)])
    assert shapes.caption(one) == "a yellow circle"


def test_polling_is_balanced_and_correct():
    examples = shapes.make_examples(400, seed=5, qtypes="polling")
    counts = collections.Counter(e.answer for e in examples)
    assert counts == {"yes": 200, "no": 200}
    for e in examples:
        color, shape = e.question.removeprefix("Is there a ").removesuffix("?").split()
        present = any(o.color == color and o.shape == shape for o in e.scene.objects)
        assert (e.answer == "yes") == present


def test_binding_negatives_swap_the_attributes_of_two_objects():
    examples = shapes.make_examples(200, seed=6, qtypes="binding", n_objects=(2, 3))
    assert collections.Counter(e.answer for e in examples) == {"yes": 100, "no": 100}
    swapped = 0
    for e in examples:
        color, shape = e.question.removeprefix("Is there a ").removesuffix("?").split()
        present = {(o.color, o.shape) for o in e.scene.objects}
        assert (e.answer == "yes") == ((color, shape) in present)
        can_swap = bool({(a.color, b.shape) for a in e.scene.objects for b in e.scene.objects} - present)
        if e.answer == "no" and can_swap:  # the negative is a swapped pair whenever the scene has one
            assert any(c == color for c, _ in present) and any(s == shape for _, s in present), e.question
            swapped += 1
    assert swapped >= 50, swapped  # most 2-3 object scenes have a swapped pair


def test_vqa_answers_follow_the_scene():
    for e in shapes.make_examples(300, seed=2, qtypes=("vqa_color", "vqa_shape", "vqa_position")):
        objs = e.scene.objects
        if e.question.startswith("What colour is the "):
            shape = e.question.removeprefix("What colour is the ").removesuffix("?")
            (match,) = [o for o in objs if o.shape == shape]  # exactly one object of that shape
            assert e.answer == match.color
        elif e.question.startswith("What shape is the "):
            color = e.question.split()[4]
            (match,) = [o for o in objs if o.color == color]
            assert e.answer == match.shape
        else:
            where = e.question.removeprefix("What shape is at the ").removesuffix("?")
            (match,) = [o for o in objs if shapes.quadrant(o, 64) == where]
            assert e.answer == match.shape


def test_every_question_type_is_generated_equally():
    examples = shapes.make_examples(100, seed=0)
    assert collections.Counter(e.qtype for e in examples) == {q: 20 for q in shapes.QUESTION_TYPES}


def test_seeding_is_reproducible_and_seeds_differ():
    a, b = shapes.example(4, 11, "vqa_color"), shapes.example(4, 11, "vqa_color")
    assert np.array_equal(np.asarray(a.scene.image), np.asarray(b.scene.image))
    assert (a.question, a.answer) == (b.question, b.answer)
    c = shapes.example(5, 11, "vqa_color")
    assert not np.array_equal(np.asarray(a.scene.image), np.asarray(c.scene.image))


def test_size_is_configurable_and_ground_truth_scales():
    scene = shapes.example(0, 0, "caption", size=336).scene
    assert scene.image.size == (336, 336)
    assert scene.objects[0].mask.shape == (336, 336)


def test_unknown_question_type_and_colour_are_rejected_clearly():
    with pytest.raises(ValueError, match="known types: caption"):
        shapes.example(0, 0, "count")
    with pytest.raises(ValueError, match="known colours"):
        shapes.render_scene([("pink", "circle", 0, 0, 10)])
    with pytest.raises(ValueError, match="known shapes"):
        shapes.render_scene([("red", "star", 0, 0, 10)])


def test_hf_dataset_has_ground_truth_columns():
    ds = shapes.to_hf_dataset(shapes.make_examples(6, seed=0))
    assert len(ds) == 6
    assert {"image", "question", "answer", "qtype", "colors", "shapes", "boxes", "targets"} <= set(ds.column_names)
    row = ds[0]
    assert len(row["colors"]) == len(row["shapes"]) == len(row["boxes"])
