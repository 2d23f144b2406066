"""Checks and constants shared by the geometry modules: (y, x) pairs, finite sizes, bboxes;
the even-odd point-in-ring test.

Positions and sizes are level-0 slide px, axis order (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import StmapInputError

BBox = tuple[float, float, float, float]
_TINY = 1e-12  # fractions at or below this are dropped (round-off of exact formulas)
_CHUNK = 2_000_000  # elements per vectorised batch (bounds temporary memory)


def _finite(name: str, value: float, *, positive: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        msg = f"{name}={value!r} is not valid: pass {need}."
        raise StmapInputError(msg)
    return value


def _pair(name: str, value: Sequence[float], *, positive: bool = False) -> tuple[float, float]:
    try:
        y, x = value
        pair = (float(y), float(x))
    except (TypeError, ValueError):
        msg = f"{name}={value!r} is not a (y, x) pair: pass two numbers."
        raise StmapInputError(msg) from None
    ok = math.isfinite(pair[0]) and math.isfinite(pair[1])
    if not ok or (positive and min(pair) <= 0):
        need = "finite numbers > 0" if positive else "finite numbers"
        msg = f"{name}={value!r} is not valid: pass two {need}."
        raise StmapInputError(msg)
    return pair


def point_in_ring(point_yx: Sequence[float], ring_yx: np.ndarray) -> bool:
    """Even-odd test of one point (y, x) against a closed ring ``(n, 2)`` of (y, x) vertices
    (any units, the same for both; the ring need not repeat its first vertex)."""
    y, x = point_yx
    ring_yx = np.asarray(ring_yx, dtype=float)
    ys, xs = ring_yx[:, 0], ring_yx[:, 1]
    ys2, xs2 = np.roll(ys, -1), np.roll(xs, -1)
    crosses = (ys > y) != (ys2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cut = xs + (y - ys) * (xs2 - xs) / (ys2 - ys)
    return bool(np.count_nonzero(crosses & (x < x_cut)) % 2)
