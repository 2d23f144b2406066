"""Regions to aggregate: GeoJSON shapes, spot grids, and per-region sums from a prediction store.

GeoJSON convention (as QuPath and most slide tools export): coordinates are ``[x, y]`` in
level-0 px of the slide (x to the right, y down), not geographic coordinates.
``Polygon`` (outer ring; holes are subtracted), ``MultiPolygon`` (sum of its parts),
and ``Point`` features with a ``radius_px`` or ``diameter_px`` property (a disk) are read.
Each feature is one region; its name is ``properties.name``, else its ``id``, else its index.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import StmapInputError
from .geometry import Disk, Footprint, Polygon, weight_matrix

logger = logging.getLogger(__name__)

__all__ = ["Region", "read_geojson", "aggregate_store"]


class Region:
    """One region: signed parts (outer rings +1, holes −1) whose weighted sum is the region."""

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


def read_geojson(path: str | Path) -> list[Region]:
    """Read regions from a GeoJSON file (coordinates ``[x, y]`` in level-0 px)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path}: no such file; check the --shapes path"
        raise StmapInputError(msg) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path}: not valid GeoJSON ({exc}); export shapes as GeoJSON (e.g. from QuPath)"
        raise StmapInputError(msg) from None
    features = _features(doc, path)
    regions = [_region(f, i, path) for i, f in enumerate(features)]
    regions = [r for r in regions if r is not None]
    if not regions:
        msg = f"{path}: no Polygon, MultiPolygon or Point (with radius_px) features found"
        raise StmapInputError(msg)
    return regions


def _features(doc, path: Path) -> list[dict]:
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "FeatureCollection":
        return list(doc.get("features") or [])
    if kind == "Feature":
        return [doc]
    if kind in ("Polygon", "MultiPolygon", "Point"):
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    if isinstance(doc, list):  # QuPath writes a bare list of features
        return doc
    msg = f"{path}: GeoJSON type {kind!r} not understood; expected a FeatureCollection"
    raise StmapInputError(msg)


def _region(feature: dict, index: int, path: Path) -> Region | None:
    geom = feature.get("geometry") or {}
    props = feature.get("properties") or {}
    name = str(props.get("name") or feature.get("id") or index)
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Polygon":
        return Region(name, _rings(coords, path, name))
    if kind == "MultiPolygon":
        return Region(name, [p for poly in coords for p in _rings(poly, path, name)])
    if kind == "Point":
        radius = props.get("radius_px", (props.get("diameter_px") or 0) / 2)
        if not radius or radius <= 0:
            msg = f"{path}: point {name!r} has no radius_px/diameter_px property; add one (level-0 px)"
            raise StmapInputError(msg)
        x, y = coords[:2]
        return Region(name, [(Disk((float(y), float(x)), 2.0 * float(radius)), 1.0)])
    logger.warning("%s: skipping feature %s of type %s", path, name, kind)
    return None


def _rings(rings, path: Path, name: str) -> list[tuple[Footprint, float]]:
    parts = []
    for k, ring in enumerate(rings):
        xy = np.asarray(ring, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[0] < 3 or xy.shape[1] < 2:
            msg = f"{path}: region {name!r} has a ring with fewer than 3 [x, y] points"
            raise StmapInputError(msg)
        parts.append((Polygon(xy[:, 1::-1]), 1.0 if k == 0 else -1.0))
    return parts


def aggregate_store(
    store,
    footprints: Sequence[Footprint],
    *,
    signs: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
    n_groups: int | None = None,
    model=None,
    device: str = "cpu",
    block_px: float = 4096.0,
    progress=None,
) -> np.ndarray:
    """Per-region sums ``(n, G + 1)`` of the dense map of a store (additive rule).

    Footprints are processed in spatial blocks of ``block_px`` level-0 px, so memory is
    bounded by one block's map; tiles a block needs are predicted on demand
    (:func:`~napari_stmap.core.engine.ensure_region`). Off-tissue tiles count as 0 counts.
    ``signs``/``groups`` combine parts into regions (holes subtract; ``n_groups`` rows).
    """
    from .engine import ensure_region

    fps = list(footprints)
    signs = np.ones(len(fps)) if signs is None else np.asarray(signs, float)
    groups = np.arange(len(fps)) if groups is None else np.asarray(groups)
    out = np.zeros((n_groups or len(fps), len(store.output_names)), dtype=np.float64)
    blocks = _blocks(fps, block_px)
    for k, idx in enumerate(blocks):
        box = _union_bbox([fps[i] for i in idx])
        dense, grid = ensure_region(store, box, background=0.0, model=model, device=device)
        w = weight_matrix([fps[i] for i in idx], grid)
        sums = np.asarray(w @ dense.reshape(dense.shape[0], -1).T.astype(np.float64))
        np.add.at(out, groups[idx], sums * signs[idx, None])
        if progress is not None:
            progress(k + 1, len(blocks))
    return out


def _blocks(fps: Sequence[Footprint], block_px: float) -> list[np.ndarray]:
    centers = np.array([_bbox_center(fp) for fp in fps]).reshape(-1, 2)
    keys = np.floor(centers / block_px).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    _, starts = np.unique(keys[order], axis=0, return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def _union_bbox(fps: Sequence[Footprint]) -> tuple[float, float, float, float]:
    boxes = np.array([fp.bbox_yx() for fp in fps])
    return (
        float(boxes[:, 0].min()),
        float(boxes[:, 1].min()),
        float(boxes[:, 2].max()),
        float(boxes[:, 3].max()),
    )
