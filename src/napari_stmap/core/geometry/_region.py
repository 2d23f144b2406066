"""A named region: a signed sum of footprints (outer rings +1, holes −1), level-0 px (y, x).

Its value is the same signed sum of its parts' values (the additive rule of ``DESIGN.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._footprints import Footprint, Rectangle


class Region:
    """One named region: signed parts (outer rings +1, holes −1) whose weighted sum is the region.

    Attributes
    ----------
    name : str
        Its name (unique among the regions of a table).
    parts : list of (Footprint, float)
        Footprints in level-0 px with their sign: a region's value is the sum of each part's
        value times its sign (holes subtract, parts of a MultiPolygon add).
    """

    def __init__(self, name: str, parts: Sequence[tuple[Footprint, float]]) -> None:
        self.name, self.parts = name, list(parts)

    @property
    def area_px(self) -> float:
        """Area in level-0 px²."""
        return float(sum(sign * fp.area_px() for fp, sign in self.parts))

    @property
    def center_yx(self) -> tuple[float, float]:
        """Area-weighted centre of the positive parts (level-0 px, (y, x))."""
        pos = [(fp, fp.area_px()) for fp, s in self.parts if s > 0]
        w = np.array([a for _, a in pos])
        c = np.array([_bbox_center(fp) for fp, _ in pos])
        if w.sum() <= 0:  # degenerate (zero-area) parts: their plain mean
            return tuple(c.mean(0))
        return tuple((c * w[:, None]).sum(0) / w.sum())

    def bbox_yx(self) -> tuple[float, float, float, float]:
        """Level-0 px box (y0, x0, y1, x1) of all parts."""
        boxes = np.array([fp.bbox_yx() for fp, _ in self.parts])
        return (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))

    @property
    def kind(self) -> str:
        """``disk``, ``square``, ``polygon``, ... of the first part."""
        return type(self.parts[0][0]).__name__.lower()


def _bbox_center(fp: Footprint) -> tuple[float, float]:
    y0, x0, y1, x1 = fp.bbox_yx()
    return ((y0 + y1) / 2, (x0 + x1) / 2)


def rectangle_from_corners(yx: np.ndarray) -> Rectangle | None:
    """A :class:`Rectangle` when ``yx`` ((n, 2) level-0 px, (y, x)) are 4 corners joined by
    axis-aligned edges (in either direction); else None."""
    if len(yx) != 4:
        return None
    edges = np.roll(yx, -1, axis=0) - yx
    flat = np.abs(edges) <= max(1e-6, 1e-9 * float(np.abs(yx).max()))
    if not ((flat.sum(axis=1) == 1).all() and (flat[:, 0] != np.roll(flat[:, 0], -1)).all()):
        return None
    (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
    return Rectangle(float(y0), float(x0), float(y1), float(x1))
