"""Per-cell predicted expression: the dense map summed over each cell's mask, tile by tile.

A cell's value follows the additive rule (``DESIGN.md``): every label pixel of the cell is a
box of ``f × f`` level-0 px, and each map pixel it covers adds the covered fraction of its
counts, with the same exact box weights as any other footprint
(:func:`~napari_stmap.core.geometry.box_weights`; a cell's weights are the sum of its label
pixels', so cells that tile a region sum to the region's value). Row runs of equal labels are
one box each, so the work scales with the cells' outlines, not their areas.

Tiling (memory flat in slide size): the label image is read in tiles of ``tile_px`` label px,
each with a halo of ``halo_px``. A tile *owns* the cells that lie wholly inside its window and
whose bounding-box centre lies in its core; it measures them in full (map read once for the
owned cells' box, through ``source.ensure_region``, which predicts missing tiles). A cell larger
than the halo is owned by no tile; it is measured on its own after the pass. Each cell is
therefore measured once, whole, whatever the tiling, and tiles without cells cost nothing.

Units: areas in level-0 px², centroids and outlines in level-0 px (y, x); label px ``(a, b)``
covers level-0 px ``[a·f, (a+1)·f) × [b·f, (b+1)·f)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..aggregate import aggregate
from ..geometry import box_weights, point_in_ring
from .labels import LabelSource

__all__ = ["CellBatch", "CellTable", "collect", "iter_cells", "label_runs", "tile_px_for"]

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], Any] | None

#: Bytes of dense map one tile may read (sets the default tile size from the channel count).
MAP_BUDGET_BYTES = 32 * 2**20


@dataclass
class CellBatch:
    """Cells measured together (one tile's owned cells).

    Attributes
    ----------
    ids : (n,) int64
        Label values.
    counts : (n, C) float64 or None
        Predicted expected counts (genes then total), None without a prediction.
    area_px : (n,) float64
        Areas in level-0 px².
    centroid_yx : (n, 2) float64
        Centroids in level-0 px (y, x).
    outlines : list
        Per cell its parts, each ``[outer, *holes]`` rings (m, 2) level-0 px (y, x); empty
        lists when outlines were not asked for.
    """

    ids: np.ndarray
    counts: np.ndarray | None
    area_px: np.ndarray
    centroid_yx: np.ndarray
    outlines: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.ids.size)


@dataclass
class CellTable(CellBatch):
    """All cells of a run (the batches concatenated), with the prediction's channel names."""

    output_names: list[str] = field(default_factory=list)


def tile_px_for(source: Any, factor: int) -> int:
    """Default tile core side in label px: a dense map of at most ``MAP_BUDGET_BYTES``."""
    if source is None:
        return 2048 // factor
    n_ch = len(source.output_names)
    side_map = math.sqrt(MAP_BUDGET_BYTES / (4.0 * n_ch))
    side = side_map * float(source.store.grid.pixel_px) / factor
    return int(np.clip(side, 256, 4096))


def label_runs(lab: np.ndarray) -> tuple[np.ndarray, ...]:
    """Row runs of equal nonzero labels: ``(value, row, col0, col1)`` arrays (col1 exclusive)."""
    h, w = lab.shape
    padded = np.zeros((h, w + 1), dtype=lab.dtype)
    padded[:, :w] = lab
    flat = padded.ravel()
    starts = np.flatnonzero(np.diff(flat, prepend=flat[:1] - 1 if flat.size else 0) != 0)
    ends = np.append(starts[1:], flat.size)
    value = flat[starts]
    keep = value != 0
    starts, ends, value = starts[keep], ends[keep], value[keep]
    row, col0 = np.divmod(starts, w + 1)
    return value, row, col0, col0 + (ends - starts)


def iter_cells(
    labels: LabelSource,
    source: Any = None,
    *,
    bbox_yx: Sequence[float] | None = None,
    tile_px: int | None = None,
    halo_px: int = 64,
    outlines: bool = True,
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[CellBatch]:
    """Measure every cell of ``labels`` once, tile by tile (see the module notes).

    Parameters
    ----------
    labels
        The cells (any :class:`~napari_stmap.core.cells.labels.LabelSource`).
    source
        A :class:`~napari_stmap.core.predict.StoreSource` (anything with ``ensure_region``
        and ``output_names``); None: geometry only (``counts`` None).
    bbox_yx
        Only cells owned by tiles in this level-0 px box (default: the whole label image).
    tile_px, halo_px
        Tile core and halo in label px (default tile: :func:`tile_px_for`).
    outlines
        Trace each cell's outline (for GeoJSON).
    progress, cancel
        ``progress(done, total)`` per tile; ``cancel()`` True stops after the current tile.

    Yields
    ------
    CellBatch
        The cells owned by one tile (tiles without owned cells yield nothing), then the cells
        larger than the halo, one batch each.
    """
    f = labels.factor
    tile = int(tile_px or tile_px_for(source, f))
    r0, c0, r1, c1 = labels.extent if bbox_yx is None else labels.to_window(bbox_yx)
    cores = [
        (y, x, min(y + tile, r1), min(x + tile, c1))
        for y in range(r0, r1, tile)
        for x in range(c0, c1, tile)
    ]
    emitted, seen, boxes = [], [], []
    for k, core in enumerate(cores):
        if cancel is not None and cancel():
            return
        window = (core[0] - halo_px, core[1] - halo_px, core[2] + halo_px, core[3] + halo_px)
        lab = labels.read(window)
        batch, others = _tile_cells(lab, window, core, f, source, outlines)
        if batch is not None:
            emitted.append(batch.ids)
            yield batch
        seen.append(others[0])
        boxes.append(others[1])
        if progress is not None:
            progress(k + 1, len(cores))
    yield from _large_cells(labels, source, emitted, seen, boxes, outlines)


def _tile_cells(lab, window, core, f, source, outlines):
    """The owned cells of one tile window, and (ids, boxes) of cells seen in its core unowned."""
    none = (np.zeros(0, np.int64), np.zeros((0, 4), np.int64))
    ch, cw = core[2] - core[0], core[3] - core[1]
    oy, ox = core[0] - window[0], core[1] - window[1]
    in_core = np.unique(lab[oy : oy + ch, ox : ox + cw])
    in_core = in_core[in_core != 0]
    if in_core.size == 0:
        return None, none
    values, compact = np.unique(lab, return_inverse=True)
    compact = compact.reshape(lab.shape)
    slices = _find_objects(compact, len(values))
    bb = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices])
    h, w = lab.shape
    edge = (bb[:, 0] == 0) | (bb[:, 1] == 0) | (bb[:, 2] == h) | (bb[:, 3] == w)
    cy, cx = (bb[:, 0] + bb[:, 2]) / 2, (bb[:, 1] + bb[:, 3]) / 2
    centre_in = (cy >= oy) & (cy < oy + ch) & (cx >= ox) & (cx < ox + cw)
    owned = ~edge & centre_in & (values != 0)
    seen = np.isin(values, in_core) & ~owned
    others = (values[seen], bb[seen] + [window[0], window[1], window[0], window[1]])
    if not owned.any():
        return None, others
    batch = _measure(lab, compact, values, owned, bb, window, f, source, outlines)
    return batch, others


def _find_objects(compact: np.ndarray, n: int) -> list:
    """Bounding slices of compact labels 0..n-1 (label 0 included, as a full slice)."""
    from scipy import ndimage

    found = ndimage.find_objects(compact, max_label=n - 1) if n > 1 else []
    full = (slice(0, compact.shape[0]), slice(0, compact.shape[1]))
    return [full, *[s if s is not None else full for s in found]]


def _measure(lab, compact, values, owned, bb, window, f, source, outlines) -> CellBatch:
    """Measure the ``owned`` cells (compact indices) of a label window, whole."""
    index = np.full(len(values), -1, dtype=np.int64)
    idx = np.flatnonzero(owned)
    index[idx] = np.arange(idx.size)
    cell = index[compact]
    value, row, col0, col1 = label_runs(np.where(cell >= 0, cell + 1, 0))
    k = value - 1
    wy, wx = window[0], window[1]
    length = (col1 - col0).astype(np.float64)
    n = idx.size
    area = np.bincount(k, length, minlength=n) * f * f
    sum_y = np.bincount(k, length * (row + 0.5), minlength=n)
    sum_x = np.bincount(k, length * (col0 + col1) / 2.0, minlength=n)
    npx = np.maximum(area / (f * f), 1e-12)
    centroid = np.stack([(wy + sum_y / npx) * f, (wx + sum_x / npx) * f], axis=1)
    counts = None
    if source is not None:
        boxes = np.stack([wy + row, wx + col0, wy + row + 1, wx + col1], axis=1) * float(f)
        counts = _sums(boxes, k, n, source)
    rings = [_outline(compact, j, bb[j], window, f) for j in idx] if outlines else []
    return CellBatch(values[idx].astype(np.int64), counts, area, centroid, rings)


def _sums(boxes: np.ndarray, k: np.ndarray, n: int, source: Any) -> np.ndarray:
    """Counts (n, C) of cells made of level-0 px ``boxes`` (cell ``k`` of each box)."""
    bbox = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
    dense, grid = source.ensure_region(bbox)
    runs = box_weights(boxes, grid)
    member = sp.csr_matrix((np.ones(k.size), (k, np.arange(k.size))), shape=(n, k.size))
    return aggregate(dense, grid, member @ runs)


def _outline(compact: np.ndarray, j: int, bb, window, f: int) -> list[list[np.ndarray]]:
    """Outline of compact label ``j`` along its pixels' edges: parts ``[outer, *holes]``.

    Marching squares on the mask doubled in size put the contour on the pixel edges (corners
    cut by a 1/32 px² triangle); collinear points are dropped (:func:`_corners`).
    """
    from skimage.measure import find_contours

    y0, x0, y1, x1 = (int(v) for v in bb)
    mask = compact[y0:y1, x0:x1] == j
    up = np.zeros((2 * (y1 - y0) + 2, 2 * (x1 - x0) + 2), dtype=np.float32)
    up[1:-1, 1:-1] = np.kron(mask, np.ones((2, 2), dtype=np.float32))
    rings = []
    for c in find_contours(up, 0.5):
        c = _corners(c[:-1])
        if len(c) >= 3:
            yx = ((c - 0.5) / 2.0 + (window[0] + y0, window[1] + x0)) * f
            rings.append(yx)
    return _nest(rings)


def _corners(ring: np.ndarray) -> np.ndarray:
    """Vertices of a closed ring (n, 2) where it turns (collinear middle points dropped)."""
    before = ring - np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0) - ring
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return ring[np.abs(cross) > 1e-9]


def _signed_area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def _nest(rings: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Rings -> parts ``[outer, *holes]``: outers wind like the largest ring, holes the other way."""
    if len(rings) <= 1:
        return [rings] if rings else []
    areas = [_signed_area(r) for r in rings]
    sign = np.sign(areas[int(np.argmax(np.abs(areas)))])
    outers = [r for r, a in zip(rings, areas, strict=True) if np.sign(a) == sign]
    parts = [[o] for o in outers]
    for r, a in zip(rings, areas, strict=True):
        if np.sign(a) != sign:
            host = next((p for p in parts if point_in_ring(r[0], p[0])), parts[0])
            host.append(r)
    return parts


def _large_cells(labels, source, emitted, seen, boxes, outlines) -> Iterator[CellBatch]:
    """Cells no tile owned (larger than the halo): each measured in its own window."""
    seen_ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    if seen_ids.size == 0:
        return
    done = np.concatenate(emitted) if emitted else np.zeros(0, np.int64)
    left = ~np.isin(seen_ids, done)
    ids, bxs = seen_ids[left], np.concatenate(boxes)[left]
    for cid in np.unique(ids):
        b = bxs[ids == cid]
        window = (b[:, 0].min() - 1, b[:, 1].min() - 1, b[:, 2].max() + 1, b[:, 3].max() + 1)
        lab = labels.read(window)
        lab = np.where(lab == cid, lab, 0)
        logger.info("cell %d spans %s label px: measured on its own", cid, window)
        core = (window[0], window[1], window[2], window[3])
        batch, _ = _tile_cells(lab, window, core, labels.factor, source, outlines)
        if batch is not None:
            yield batch


def collect(batches: Iterator[CellBatch], output_names: Sequence[str] = ()) -> CellTable:
    """All batches as one :class:`CellTable` (in memory; rows in the order measured)."""
    parts = list(batches)
    n_ch = len(output_names)
    counts = None
    if n_ch:
        blocks = [b.counts for b in parts if b.counts is not None]
        counts = np.concatenate(blocks) if blocks else np.zeros((0, n_ch))
    return CellTable(
        ids=np.concatenate([b.ids for b in parts]) if parts else np.zeros(0, np.int64),
        counts=counts,
        area_px=np.concatenate([b.area_px for b in parts]) if parts else np.zeros(0),
        centroid_yx=np.concatenate([b.centroid_yx for b in parts]) if parts else np.zeros((0, 2)),
        outlines=[o for b in parts for o in b.outlines],
        output_names=list(output_names),
    )
