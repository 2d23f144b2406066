"""Where a dense map's pixels lie on the slide (:class:`MapGrid`), level-0 px, axis order (y, x).

Map pixel ``(i, j)`` spans ``[oy + i·p, oy + (i+1)·p) × [ox + j·p, ox + (j+1)·p)`` in level-0
px; map coordinates (:meth:`MapGrid.to_map`) put it on ``[i, i+1) × [j, j+1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import StmapInputError
from ._common import BBox, _finite, _pair


@dataclass(frozen=True)
class MapGrid:
    """Where a dense map's pixels lie on the slide.

    Parameters
    ----------
    origin_yx
        Level-0 px position (y, x) of the top-left *corner* of map pixel (0, 0).
    pixel_px
        Side of one (square) map pixel in level-0 px, e.g. ``2 µm / mpp``.
    shape_hw
        Map size (H, W) in map pixels.
    """

    origin_yx: tuple[float, float]
    pixel_px: float
    shape_hw: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin_yx", _pair("origin_yx", self.origin_yx))
        object.__setattr__(self, "pixel_px", _finite("pixel_px", self.pixel_px, positive=True))
        hw = tuple(int(v) for v in np.asarray(self.shape_hw).ravel())
        if len(hw) != 2 or min(hw) < 0:
            msg = f"shape_hw={self.shape_hw!r} is not a map size: pass (H, W) with H, W >= 0."
            raise StmapInputError(msg)
        object.__setattr__(self, "shape_hw", hw)

    @property
    def bbox_yx(self) -> BBox:
        """Level-0 px extent ``(y0, x0, y1, x1)`` of the whole grid (outer pixel edges)."""
        (oy, ox), p, (h, w) = self.origin_yx, self.pixel_px, self.shape_hw
        return (oy, ox, oy + h * p, ox + w * p)

    @property
    def translate_yx(self) -> tuple[float, float]:
        """Level-0 px centre of map pixel (0, 0): the napari ``translate`` (÷ mpp for µm)."""
        half = self.pixel_px / 2
        return (self.origin_yx[0] + half, self.origin_yx[1] + half)

    def pixel_centers(self) -> np.ndarray:
        """Level-0 px centres (y, x) of all map pixels, shape (H·W, 2), row-major.

        Row ``i·W + j`` is pixel ``(i, j)``: the column order of :func:`weight_matrix`.
        """
        h, w = self.shape_hw
        ys = self.origin_yx[0] + (np.arange(h) + 0.5) * self.pixel_px
        xs = self.origin_yx[1] + (np.arange(w) + 0.5) * self.pixel_px
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)

    def to_map(self, yx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Level-0 px (..., 2) (y, x) -> fractional map coords; pixel (i, j) is [i, i+1)×[j, j+1)."""
        return (np.asarray(yx, dtype=float) - np.asarray(self.origin_yx)) / self.pixel_px

    def from_map(self, ij: np.ndarray | Sequence[float]) -> np.ndarray:
        """Fractional map coords (..., 2) -> level-0 px (y, x); inverse of :meth:`to_map`."""
        return np.asarray(ij, dtype=float) * self.pixel_px + np.asarray(self.origin_yx)

    def crop_slices(self, bbox_yx: BBox) -> tuple[slice, slice]:
        """Row and column slices of the map pixels that overlap a level-0 px bbox (clipped)."""
        y0, x0, y1, x1 = (float(v) for v in bbox_yx)
        (i0, j0), (i1, j1) = self.to_map((y0, x0)), self.to_map((y1, x1))
        h, w = self.shape_hw
        ri = (int(np.clip(np.floor(i0), 0, h)), int(np.clip(np.ceil(i1), 0, h)))
        rj = (int(np.clip(np.floor(j0), 0, w)), int(np.clip(np.ceil(j1), 0, w)))
        return slice(ri[0], max(ri)), slice(rj[0], max(rj))

    def crop(self, bbox_yx: BBox) -> MapGrid:
        """Sub-grid of the whole map pixels overlapping ``bbox_yx`` (level-0 px), clipped.

        ``map[:, *grid.crop_slices(bbox)]`` is the matching part of a (C, H, W) map.
        """
        rows, cols = self.crop_slices(bbox_yx)
        origin = self.from_map((rows.start, cols.start))
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        return MapGrid((float(origin[0]), float(origin[1])), self.pixel_px, shape)
