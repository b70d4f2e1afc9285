"""Tests of the tile grid."""

import numpy as np
import pytest

from napari_yolocell.engine.tiling import Tile, tile_grid

SHAPES = [(100, 100), (640, 640), (641, 1000), (1000, 333), (1500, 2000), (700, 50)]
SETTINGS = [(640, 64), (256, 64), (320, 48), (128, 0), (512, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("tile", "overlap"), SETTINGS)
def test_grid_covers_every_pixel(shape, tile, overlap):
    tiles = tile_grid(shape, tile, overlap)
    covered = np.zeros(shape, dtype=np.int32)
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= shape[0] and 0 <= t.x0 < t.x1 <= shape[1]
        # Shift back rather than pad: all tiles are full-size (or the whole axis).
        assert t.shape == (min(tile, shape[0]), min(tile, shape[1]))
        covered[t.slices] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("tile", "overlap"), SETTINGS)
def test_shared_sides_overlap_a_neighbour(shape, tile, overlap):
    tiles = tile_grid(shape, tile, overlap)
    for t in tiles:
        assert (t.top, t.left, t.bottom, t.right) == (
            t.y0 > 0,
            t.x0 > 0,
            t.y1 < shape[0],
            t.x1 < shape[1],
        )
        if t.right:  # the neighbour to the right starts at least `overlap` before our edge
            right = [u for u in tiles if u.y0 == t.y0 and u.x0 > t.x0]
            assert min(u.x0 for u in right) <= t.x1 - overlap
        if t.bottom:
            below = [u for u in tiles if u.x0 == t.x0 and u.y0 > t.y0]
            assert min(u.y0 for u in below) <= t.y1 - overlap


def test_image_smaller_than_tile_is_one_tile():
    assert tile_grid((100, 200), 640, 64) == [Tile(0, 0, 100, 200)]


def test_last_tile_is_flush_with_the_edge():
    tiles = tile_grid((1000, 1000), 640, 64)
    assert sorted({t.x0 for t in tiles}) == [0, 360]
    assert max(t.x1 for t in tiles) == 1000


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [((0, 10), 64, 8), ((10, 10), 0, 0), ((10, 10), 64, 64), ((10, 10), 64, -1)],
)
def test_invalid_arguments(shape, tile, overlap):
    with pytest.raises(ValueError):
        tile_grid(shape, tile, overlap)
