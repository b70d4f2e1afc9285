"""Overlapping tile grid over a 2-D plane.

The grid is what makes exact border merging possible (see :mod:`napari_yolocell.engine.merge`): each
tile records which of its sides overlap a neighbouring tile, so detections touching such a side
can be dropped, knowing the neighbour sees that nucleus whole.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """One window of a tile grid, in pixel coordinates of the plane it was cut from.

    Attributes
    ----------
    y0, x0 : int
        Top-left corner (inclusive).
    y1, x1 : int
        Bottom-right corner (exclusive).
    top, left, bottom, right : bool
        True where that side lies inside the image and is overlapped by a neighbouring tile;
        False where it is the image border.
    """

    y0: int
    x0: int
    y1: int
    x1: int
    top: bool = False
    left: bool = False
    bottom: bool = False
    right: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the tile."""
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(slice(y0, y1), slice(x0, x1))`` to cut the tile from a plane."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start positions along one axis; the last tile is flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] + tile < length:
        # Shift the last tile back rather than pad: every tile has real pixels only.
        starts.append(length - tile)
    return starts


def tile_grid(shape_yx: tuple[int, int], tile: int = 640, overlap: int = 64) -> list[Tile]:
    """Cover a plane with overlapping tiles, in row-major order.

    Parameters
    ----------
    shape_yx : tuple of int
        (height, width) of the plane.
    tile : int
        Tile side in pixels. Along an axis shorter than ``tile`` there is a single tile as
        long as the axis (the detector backend pads it).
    overlap : int
        Minimum overlap between neighbouring tiles in pixels. It must exceed the largest
        nucleus (plus the merge margin) for the border merge to be exact. The last tile along
        each axis is shifted back to end at the image border, so its overlap may be larger.

    Returns
    -------
    list of Tile
        Tiles covering every pixel of the plane.

    Raises
    ------
    ValueError
        If the shape is empty or ``tile``/``overlap`` are inconsistent.
    """
    height, width = (int(s) for s in shape_yx)
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot tile an empty plane of shape {tuple(shape_yx)}")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    tiles = []
    for y0 in _starts(height, tile, overlap):
        y1 = min(y0 + tile, height)
        for x0 in _starts(width, tile, overlap):
            x1 = min(x0 + tile, width)
            tiles.append(
                Tile(y0, x0, y1, x1, top=y0 > 0, left=x0 > 0, bottom=y1 < height, right=x1 < width)
            )
    return tiles
