"""Footprints -> sparse aggregation weights on a map grid (:func:`coverage`, :func:`weight_matrix`).

Entry ``[k, i·W + j]`` of :func:`weight_matrix` is the fraction of map pixel (i, j) covered by
footprint k (level-0 px, axis order (y, x)); ``W @ map.reshape(C, H·W).T`` gives region sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import StmapInputError
from ._common import _CHUNK
from ._coverage import _box_batch, _disk_batch, _ellipse_vertices, _empty, _polygon_coverage
from ._footprints import Disk, Ellipse, Footprint, Polygon, Rectangle, Square
from ._mapgrid import MapGrid


def coverage(footprint: Footprint, grid: MapGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of each map pixel covered by one footprint.

    Parameters
    ----------
    footprint
        Region in level-0 px.
    grid
        The map's pixel grid.

    Returns
    -------
    rows, cols, frac
        Map pixel indices (int64) and covered fraction of each pixel's area in (0, 1]; only
        pixels inside the grid with a nonzero fraction. ``frac.sum() · pixel_px²`` equals
        ``footprint.area_px()`` when the footprint lies inside the grid.
    """
    if isinstance(footprint, Disk):
        part = _disk_batch(np.array([footprint.center_yx]), np.array([footprint.diameter_px]), grid)
    elif isinstance(footprint, (Square, Rectangle)):
        part = _box_batch(np.array([footprint.bbox_yx()]), grid)
    elif isinstance(footprint, Ellipse) and footprint.radii_yx[0] == footprint.radii_yx[1]:
        circle = Disk(footprint.center_yx, 2 * footprint.radii_yx[0])
        return coverage(circle, grid)
    elif isinstance(footprint, Ellipse):
        return _polygon_coverage(_ellipse_vertices(footprint, grid), grid)
    elif isinstance(footprint, Polygon):
        return _polygon_coverage(grid.to_map(np.asarray(footprint.vertices_yx)), grid)
    else:
        msg = f"footprint of type {type(footprint).__name__} is not supported: pass a Disk, Square, Rectangle, Ellipse or Polygon."
        raise StmapInputError(msg)
    return part[1], part[2], part[3]


def _chunked(
    kernel, params: np.ndarray, cells: np.ndarray, grid: MapGrid
) -> tuple[np.ndarray, ...]:
    """Run a batch kernel over footprints grouped by window size, in memory-bounded chunks."""
    parts = []
    groups = np.unique(cells)
    for size in groups:
        members = np.flatnonzero(cells == size)
        step = max(1, _CHUNK // int(size))
        for start in range(0, members.size, step):
            sel = members[start : start + step]
            idx, rows, cols, frac = kernel(*(p[sel] for p in params), grid)
            parts.append((sel[idx], rows, cols, frac))
    return _concat(parts)


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Concatenate (idx, rows, cols, frac) parts; no copy for a single part."""
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(c) for c in zip(*parts, strict=True)) if parts else _empty()


def weight_matrix(footprints: Sequence[Footprint] | Footprint, grid: MapGrid) -> sp.csr_matrix:
    """Sparse aggregation weights of many footprints on a map grid.

    Parameters
    ----------
    footprints
        n footprints in level-0 px (a single one is treated as a list of one).
    grid
        The map's pixel grid, shape (H, W).

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape (n, H·W), float64; entry ``[k, i·W + j]`` is the fraction of map pixel (i, j)
        covered by footprint k. ``W @ map.reshape(C, H·W).T`` gives the (n, C) region sums.
        Disks, squares and rectangles are vectorised; ellipses and polygons run one by one.
    """
    fps = [footprints] if isinstance(footprints, Footprint) else list(footprints)
    p, (h, w) = grid.pixel_px, grid.shape_hw
    kinds = np.array([_KIND.get(type(f), 3) for f in fps], dtype=np.int8)
    parts = []
    disk_ix = np.flatnonzero(kinds == 0)
    if disk_ix.size:
        c = np.array([fps[i].center_yx for i in disk_ix], dtype=float).reshape(-1, 2)
        d = np.array([fps[i].diameter_px for i in disk_ix], dtype=float)
        cells = (np.ceil(d / p).astype(np.int64) + 2) ** 2
        idx, rows, cols, frac = _chunked(_disk_batch, (c, d), cells, grid)
        parts.append((disk_ix[idx], rows, cols, frac))
    box_ix = np.flatnonzero(kinds == 1)
    if box_ix.size:
        b = np.array([fps[i].bbox_yx() for i in box_ix], dtype=float).reshape(-1, 4)
        cells = (np.ceil((b[:, 2] - b[:, 0]) / p) + 1) * (np.ceil((b[:, 3] - b[:, 1]) / p) + 1)
        idx, rows, cols, frac = _chunked(_box_batch, (b,), cells.astype(np.int64), grid)
        parts.append((box_ix[idx], rows, cols, frac))
    for i in np.flatnonzero(kinds == 3):
        rows, cols, frac = coverage(fps[i], grid)
        parts.append((np.full(rows.size, i, dtype=np.int64), rows, cols, frac))
    idx, rows, cols, frac = _concat(parts)
    return _to_csr(idx, rows * w + cols, frac, (len(fps), h * w))


def box_weights(bboxes_yx: np.ndarray, grid: MapGrid) -> sp.csr_matrix:
    """Sparse aggregation weights of many axis-aligned boxes given as one array (no objects).

    The same exact weights as :func:`weight_matrix` of :class:`Rectangle` footprints, for
    callers with very many boxes (e.g. the pixel runs of a label image, one box per run).

    Parameters
    ----------
    bboxes_yx
        (n, 4) level-0 px boxes ``(y0, x0, y1, x1)`` with ``y1 > y0`` and ``x1 > x0``.
    grid
        The map's pixel grid, shape (H, W).

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape (n, H·W), float64: entry ``[k, i·W + j]`` is the fraction of map pixel (i, j)
        covered by box k.
    """
    b = np.asarray(bboxes_yx, dtype=float).reshape(-1, 4)
    h, w = grid.shape_hw
    if not b.size:
        return sp.csr_matrix((0, h * w), dtype=np.float64)
    p = grid.pixel_px
    cells = (np.ceil((b[:, 2] - b[:, 0]) / p) + 1) * (np.ceil((b[:, 3] - b[:, 1]) / p) + 1)
    idx, rows, cols, frac = _chunked(_box_batch, (b,), cells.astype(np.int64), grid)
    return _to_csr(idx, rows * w + cols, frac, (len(b), h * w))


def _to_csr(idx: np.ndarray, flat: np.ndarray, frac: np.ndarray, shape: tuple[int, int]):
    """CSR from entries sorted by column within each footprint (as every kernel emits them)."""
    if idx.size and np.any(np.diff(idx) < 0):
        order = np.argsort(idx, kind="stable")
        idx, flat, frac = idx[order], flat[order], frac[order]
    small = max(shape[1], idx.size) < 2**31 - 1
    itype = np.int32 if small else np.int64
    indptr = np.zeros(shape[0] + 1, dtype=itype)
    np.cumsum(np.bincount(idx, minlength=shape[0]), out=indptr[1:])
    mat = sp.csr_matrix((frac, flat.astype(itype, copy=False), indptr), shape=shape)
    mat.has_sorted_indices = True
    return mat


_KIND = {Disk: 0, Square: 1, Rectangle: 1}
