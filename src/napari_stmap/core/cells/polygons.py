"""Cells given as GeoJSON polygons (QuPath detections): read, and summed exactly.

Polygons are summed with the exact polygon coverage of :mod:`napari_stmap.core.geometry`
(the same as ``stmap aggregate --shapes``), so a cell's value does not depend on a
rasterisation; holes subtract. For display and for expansion (which needs pixels) the same
cells are drawn into labels on demand (:class:`~napari_stmap.core.cells.labels.PolygonLabels`).

Units: level-0 px, (y, x) inside; GeoJSON ``[x, y]`` in files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StmapInputError
from ..geometry import Region
from ..io.regions import read_annotations
from .labels import PolygonLabels
from .measure import CellBatch

__all__ = ["PolygonCells", "read_cells_geojson"]

_CELL_NAME = re.compile(r"^cell (\d+)$")


class PolygonCells:
    """Cells as polygons: ``regions`` (one :class:`Region` per cell), ``ids``, ``rings``.

    ``rings[k]`` is cell k's parts, each ``[outer, *holes]`` arrays (m, 2) level-0 px (y, x).
    """

    kind = "geojson"

    def __init__(self, regions: list[Region], ids: np.ndarray, rings: list, name: str) -> None:
        self.regions, self.ids, self.rings, self.name = regions, ids, rings, name

    @property
    def n(self) -> int:
        return len(self.regions)

    def as_labels(self, slide_hw: Sequence[int]) -> PolygonLabels:
        """The cells drawn into level-0 px labels on demand (pixel centres inside)."""
        return PolygonLabels(self.rings, self.ids, slide_hw, name=self.name)

    def iter_batches(
        self,
        source: Any = None,
        *,
        bbox_yx: Sequence[float] | None = None,
        block: int = 5000,
        progress: Callable[[int, int], Any] | None = None,
    ) -> Iterator[CellBatch]:
        """Cells in blocks of ``block`` (spatially sorted); exact polygon sums from ``source``.

        ``bbox_yx``: only cells whose centroid lies in this level-0 px box.
        """
        cen = np.array([_centroid(r) for r in self.rings]).reshape(-1, 2)
        keep = np.ones(self.n, dtype=bool)
        if bbox_yx is not None:
            y0, x0, y1, x1 = bbox_yx
            keep = (cen[:, 0] >= y0) & (cen[:, 0] < y1) & (cen[:, 1] >= x0) & (cen[:, 1] < x1)
        order = np.flatnonzero(keep)
        order = order[np.lexsort((cen[order, 1], np.floor(cen[order, 0] / 2048)))]
        chunks = [order[i : i + block] for i in range(0, order.size, block)]
        for k, idx in enumerate(chunks):
            regions = [self.regions[i] for i in idx]
            counts = None if source is None else source.region_sums(regions)
            area = np.array([r.area_px for r in regions], dtype=float)
            yield CellBatch(self.ids[idx], counts, area, cen[idx], [self.rings[i] for i in idx])
            if progress is not None:
                progress(k + 1, len(chunks))


def read_cells_geojson(path: str | Path) -> PolygonCells:
    """Cells from a GeoJSON file of cell or nucleus polygons (``[x, y]`` level-0 px).

    Ids: a feature named ``"cell N"`` (what ``stmap cells`` writes) keeps ``N``; otherwise
    cells are numbered 1, 2, ... in file order. Refuses a file that is not GeoJSON and one
    without polygons.
    """
    path = Path(path)
    annotations = read_annotations(path, points="skip")
    if not annotations:
        msg = f"{path}: no cell polygons found; export cells or nuclei as GeoJSON polygons (e.g. QuPath detections)"
        raise StmapInputError(msg)
    named = [_CELL_NAME.match(a.name or "") for a in annotations]
    if all(named):
        ids = np.array([int(m.group(1)) for m in named], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            ids = np.arange(1, len(annotations) + 1, dtype=np.int64)
    else:
        ids = np.arange(1, len(annotations) + 1, dtype=np.int64)
    regions = [a.region(str(i)) for a, i in zip(annotations, ids, strict=True)]
    rings = [
        [[np.asarray(fp.outline_yx(64), dtype=float) for fp in poly] for poly in a.polygons]
        for a in annotations
    ]
    return PolygonCells(regions, ids, rings, path.name)


def _centroid(parts: list[list[np.ndarray]]) -> tuple[float, float]:
    """Area-weighted centroid (level-0 px (y, x)) of parts ``[outer, *holes]``."""
    total, acc = 0.0, np.zeros(2)
    for part in parts:
        for k, ring in enumerate(part):
            a, c = _ring_moments(ring)
            sign = 1.0 if k == 0 else -1.0
            total += sign * a
            acc += sign * a * c
    if abs(total) < 1e-12:
        return tuple(np.concatenate([p[0] for p in parts]).mean(axis=0))
    return tuple(acc / total)


def _ring_moments(ring: np.ndarray) -> tuple[float, np.ndarray]:
    """|area| and centroid (y, x) of a simple ring (shoelace)."""
    y, x = ring[:, 0], ring[:, 1]
    y2, x2 = np.roll(y, -1), np.roll(x, -1)
    cross = x * y2 - x2 * y
    a = cross.sum() / 2
    if abs(a) < 1e-12:
        return 0.0, ring.mean(axis=0)
    cy = ((y + y2) * cross).sum() / (6 * a)
    cx = ((x + x2) * cross).sum() / (6 * a)
    return abs(a), np.array([cy, cx])
