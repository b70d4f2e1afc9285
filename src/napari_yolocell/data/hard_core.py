"""Hard-core random positions: points in a rectangle, every pair at least a distance apart.

Random sequential adsorption (RSA), vectorised: candidates arrive in random order and each is
kept when no earlier kept point lies too close. :func:`napari_yolocell.data.synthetic.place_nuclei`
uses it so that synthetic nuclei never overlap.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["hard_core_density", "hard_core_exact", "rsa_accept"]

_BAND = 4096  # rows per band when placing points over huge images


def rsa_accept(points: np.ndarray, marks: np.ndarray, min_distance: float) -> np.ndarray:
    """Random sequential adsorption in arrival order ``marks`` (vectorised).

    A point is accepted when no earlier-accepted point lies within ``min_distance``. Solved in
    rounds: points whose mark is smallest among their undecided neighbours are accepted, their
    neighbours rejected.

    Parameters
    ----------
    points : numpy.ndarray
        (N, 2) candidate positions.
    marks : numpy.ndarray
        (N,) arrival order (smaller arrives first; a negative mark = already placed).
    min_distance : float
        Minimum distance between accepted points.

    Returns
    -------
    numpy.ndarray
        (N,) bool, True for accepted points.
    """
    n = len(points)
    accepted = np.zeros(n, bool)
    if n == 0:
        return accepted
    from scipy.spatial import cKDTree

    pairs = cKDTree(points).query_pairs(min_distance, output_type="ndarray")
    undecided = np.ones(n, bool)
    while pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        nbr_min = np.full(n, np.inf)
        np.minimum.at(nbr_min, i, marks[j])
        np.minimum.at(nbr_min, j, marks[i])
        win = undecided & (marks < nbr_min)
        accepted |= win
        undecided &= ~win
        lose = np.zeros(n, bool)
        lose[j[win[i]]] = True
        lose[i[win[j]]] = True
        undecided &= ~lose
        pairs = pairs[undecided[i] & undecided[j]]
    accepted |= undecided  # no remaining conflicts
    return accepted


def hard_core_exact(
    h: int, w: int, n: int, min_distance: float, rng: np.random.Generator
) -> np.ndarray:
    """Exactly ``n`` hard-core positions ``(y, x)`` in an ``h`` x ``w`` image.

    Parameters
    ----------
    h, w : int
        Image size.
    n : int
        Number of points.
    min_distance : float
        Minimum distance between points.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    numpy.ndarray
        (n, 2) positions ``y, x``: the first ``n`` that sequential RSA would accept.

    Raises
    ------
    ValueError
        When ``n`` points ``min_distance`` apart do not fit.
    """
    if n <= 0:
        return np.zeros((0, 2))
    n_cand = max(4 * n, 64)
    for _ in range(4):
        pts = rng.uniform((0, 0), (h, w), (n_cand, 2))
        marks = rng.random(n_cand)
        ok = np.nonzero(rsa_accept(pts, marks, min_distance))[0]
        if len(ok) >= n:
            # The first n accepted in arrival order are exactly what sequential RSA would give.
            return pts[ok[np.argsort(marks[ok])[:n]]]
        n_cand *= 3
    raise ValueError(
        f"cannot place {n} non-overlapping nuclei (min centre distance {min_distance:.1f} px) "
        f"in a {h} x {w} image; lower n_nuclei, diameter or min_distance"
    )


def hard_core_density(
    h: int, w: int, density: float, min_distance: float, rng: np.random.Generator
) -> np.ndarray:
    """Hard-core positions at ``density`` per megapixel, band by band (bounded memory).

    Parameters
    ----------
    h, w : int
        Image size.
    density : float
        Points per megapixel; a warning says how many did not fit when it is too high.
    min_distance : float
        Minimum distance between points.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    numpy.ndarray
        (N, 2) positions ``y, x``.
    """
    out: list[np.ndarray] = []
    fixed = np.zeros((0, 2))
    short = 0
    for y0 in range(0, h, _BAND):
        y1 = min(h, y0 + _BAND)
        target = int(round(density * (y1 - y0) * w / 1e6))
        if target <= 0:
            continue
        n_cand = 4 * target
        cand = rng.uniform((y0, 0), (y1, w), (n_cand, 2))
        marks = rng.random(n_cand)
        # Points kept in the previous band act as already accepted (mark -1).
        pts = np.concatenate([fixed, cand])
        all_marks = np.concatenate([np.full(len(fixed), -1.0), marks])
        ok = rsa_accept(pts, all_marks, min_distance)[len(fixed) :]
        idx = np.nonzero(ok)[0]
        idx = idx[np.argsort(marks[idx])[:target]]
        short += target - len(idx)
        band = cand[idx]
        out.append(band)
        fixed = band[band[:, 0] >= y1 - min_distance]
    if short:
        warnings.warn(
            f"density {density}/MP too high for min distance {min_distance:.1f} px: "
            f"{short} nuclei could not be placed",
            stacklevel=3,
        )
    return np.concatenate(out) if out else np.zeros((0, 2))
