"""Which visual token shows which pixels: regular grids by hand-checked cases, a centre crop, a patch remainder that
no token sees, and LLaVA-NeXT's tiles with their row-end tokens."""
import numpy as np
import pytest
from types import SimpleNamespace

from vlminterp_utils import shapes
from vlminterp_utils.core import geometry

GRID = geometry.patch_boxes(8, 8, 8)  # shapes-llava: 64 px, 8 px patches


def square_at(x0, y0, side, size=64):
    return shapes.render_scene([("red", "square", x0, y0, side)], size=size).objects[0].mask


def cells(mask, buffer=0, regions=GRID):
    return sorted(map(tuple, np.argwhere(geometry.tokens_touching(mask, regions, buffer).reshape(8, 8))))


def test_square_aligned_to_one_patch_covers_exactly_that_cell():
    assert cells(square_at(8, 16, 8)) == [(2, 1)]


def test_square_straddling_patches_covers_all_touched_cells():
    # pixels 4..11 in x and y touch patches 0 and 1 in both directions
    assert cells(square_at(4, 4, 8)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_one_pixel_overlap_counts():
    # pixels 8..16 in x: column 16 is the first pixel of patch 2
    assert cells(square_at(8, 8, 9)) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_buffers_grow_like_a_chebyshev_dilation_clipped_at_the_border():
    centre = square_at(24, 24, 8)
    assert [len(cells(centre, b)) for b in (0, 1, 2)] == [1, 9, 25]
    assert cells(square_at(0, 0, 8), 1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="buffer"):
        geometry.tokens_touching(centre, GRID, -1)


def test_nan_regions_touch_nothing():
    regions = np.concatenate([[[np.nan] * 4], GRID])
    touched = geometry.tokens_touching(np.ones((64, 64), bool), regions)
    assert not touched[0] and touched[1:].all()


def processor(size, crop=None):
    return SimpleNamespace(size=size, do_resize=True, do_center_crop=crop is not None, crop_size=crop)


def test_a_centre_crop_leaves_the_margins_to_no_token():
    # CLIP: short side to 336, then a 336 x 336 centre crop; a 672 x 336 photo loses 168 px on each side
    clip = processor({"shortest_edge": 336}, {"height": 336, "width": 336})
    regions = geometry.resize_crop_regions((672, 336), clip, 336, 14)
    assert regions.shape == (576, 4)
    assert regions[:, 0].min() == pytest.approx(168) and regions[:, 2].max() == pytest.approx(504)
    left_margin = np.zeros((336, 672), bool)
    left_margin[:, :168] = True
    assert not geometry.tokens_touching(left_margin, regions).any()


def test_pixels_past_the_last_whole_patch_belong_to_no_token():
    # SigLIP at 384 px with 14 px patches: 27 x 27 patches cover 378 px; the last 6 px are never seen
    siglip = processor({"height": 384, "width": 384})
    regions = geometry.resize_crop_regions((384, 384), siglip, 384, 14)
    assert regions.shape == (729, 4) and regions[:, 2].max() == pytest.approx(378)
    edge = np.zeros((384, 384), bool)
    edge[:, 379:] = True
    assert not geometry.tokens_touching(edge, regions).any()
    edge[:, 377] = True
    assert geometry.tokens_touching(edge, regions).sum() == 27  # the last column of patches


def test_anyres_regions_map_base_and_tiles_back_to_the_image():
    pinpoints = [[28, 56], [56, 28], [56, 56]]  # (height, width), tiles of 28 px with 14 px patches
    regions = geometry.anyres_regions((64, 32), pinpoints, 28, 14)  # a 64 x 32 image: wide
    base, rest = regions[:4], regions[4:]
    assert np.allclose(base, [[0, 0, 32, 16], [32, 0, 64, 16], [0, 16, 32, 32], [32, 16, 64, 32]])
    # canvas 28 x 56 (h x w) fits the 2:1 image exactly: a 2 x 4 token grid, a row-end token after each row
    assert len(rest) == 2 * (4 + 1)
    assert np.isnan(rest[4]).all() and np.isnan(rest[9]).all()
    assert np.allclose(rest[0], [0, 0, 16, 16]) and np.allclose(rest[8], [48, 16, 64, 32])


def test_anyres_unpads_the_canvas_padding():
    pinpoints = [[56, 56]]  # a square canvas for a wide image: padding rows above and below
    regions = geometry.anyres_regions((64, 32), pinpoints, 28, 14)
    tiles = regions[4:]
    patches = tiles[~np.isnan(tiles).any(1)]
    assert len(patches) == 2 * 4  # 4 x 4 tokens, the padding rows (1 above, 1 below) removed
    assert patches[:, 1].min() == pytest.approx(0) and patches[:, 3].max() == pytest.approx(32)


def test_bottom_row_is_the_last_grid_row():
    assert np.flatnonzero(geometry.bottom_row(GRID)).tolist() == list(range(56, 64))
