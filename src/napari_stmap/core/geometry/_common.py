"""Checks and constants shared by the geometry modules: (y, x) pairs, finite sizes, bboxes.

Positions and sizes are level-0 slide px, axis order (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
