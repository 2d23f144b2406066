"""The 8 dihedral turns (quarter turns and a mirror) of a square image and of points on it.

Used by augmentation and test-time augmentation; positions are continuous px (y, x).
"""

from __future__ import annotations

import numpy as np


def turn_points(centers: np.ndarray, size: int, k: int, flip: bool) -> np.ndarray:
    """Where points of a ``size`` × ``size`` image go under ``np.rot90(img, k)`` then a flip.

    Parameters
    ----------
    centers : numpy.ndarray
        (n, 2) points, continuous px (y, x) of the image, pixel (i, j) spanning
        ``[i, i+1) × [j, j+1)``.
    size : int
        Side of the (square) image, px.
    k : int
        Quarter turns, as ``np.rot90(img, k)`` (counter-clockwise on screen).
    flip : bool
        Mirror x (``img[:, ::-1]``) after the turn.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 positions (y, x) in the turned image (:func:`turn_image`).
    """
    c = np.asarray(centers, dtype=float).reshape(-1, 2).copy()
    for _ in range(k % 4):
        c = np.stack([size - c[:, 1], c[:, 0]], axis=1)  # rot90: (y, x) -> (W - x, y)
    if flip:
        c[:, 1] = size - c[:, 1]
    return c


def turn_image(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``np.rot90(image, k)`` of a (y, x, ...) image, then mirrored in x if ``flip``.

    C-contiguous (the input itself when nothing turns); :func:`turn_points` moves positions on
    the image the same way.
    """
    out = np.rot90(image, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)
