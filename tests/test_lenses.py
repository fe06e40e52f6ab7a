"""Chapter 2's bookkeeping on hand-made scenes: which patch is which, and when a reading counts as right."""
import numpy as np
import pandas as pd
import pytest

from vlminterp_utils import lenses, shapes


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
