"""Exact fractions of map pixels covered by boxes, disks and polygons (vectorised kernels).

Each kernel takes level-0 px shapes (axis order (y, x)) and a :class:`MapGrid` and returns
sparse entries ``(footprint index, row, col, fraction)``, sorted by footprint, row, column.
Boxes: products of 1-D overlaps; disks: closed-form disk ∩ quadrant areas; polygons: signed
areas accumulated along rows (as exact-area font rasterisers do); ellipses: an equal-area
polygon.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import _CHUNK, _TINY
from ._footprints import Ellipse, _ellipse_outline
from ._mapgrid import MapGrid


def _assemble(
    frac: np.ndarray, i0: np.ndarray, j0: np.ndarray, grid: MapGrid
) -> tuple[np.ndarray, ...]:
    """Sparse entries of per-footprint windows ``frac`` (n, Ky, Kx) starting at map (i0, j0).

    Keeps pixels inside the grid with fraction > _TINY and clips round-off above 1. Entries come
    out sorted by footprint, then row, then column.
    """
    h, w = grid.shape_hw
    n, ky, kx = frac.shape
    rows = i0[:, None] + np.arange(ky)
    cols = j0[:, None] + np.arange(kx)
    keep = frac > _TINY
    keep &= ((rows >= 0) & (rows < h))[:, :, None]
    keep &= ((cols >= 0) & (cols < w))[:, None, :]
    idx, a, b = np.nonzero(keep)
    return idx, i0[idx] + a, j0[idx] + b, np.minimum(frac[keep], 1.0)


def _window(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, int]:
    """First map index and a common count K of pixels spanning [lo, hi] (map coords)."""
    start = np.floor(lo).astype(np.int64)
    count = int(max(1, (np.ceil(hi).astype(np.int64) - start).max(initial=1)))
    return start, count


def _box_batch(box: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact coverage of axis-aligned boxes (n, 4) level-0 px: 1-D overlap products."""
    b = np.concatenate([grid.to_map(box[:, :2]), grid.to_map(box[:, 2:])], axis=1)
    i0, ky = _window(b[:, 0], b[:, 2])
    j0, kx = _window(b[:, 1], b[:, 3])
    ii = i0[:, None] + np.arange(ky)
    jj = j0[:, None] + np.arange(kx)
    fy = np.clip(np.minimum(b[:, 2:3], ii + 1) - np.maximum(b[:, 0:1], ii), 0.0, 1.0)
    fx = np.clip(np.minimum(b[:, 3:4], jj + 1) - np.maximum(b[:, 1:2], jj), 0.0, 1.0)
    return _assemble(fy[:, :, None] * fx[:, None, :], i0, j0, grid)


def _quadrant_area(y: np.ndarray, x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed area of disk(0, r) ∩ [0, y] × [0, x] (odd in y and in x).

    Inclusion–exclusion of this over a pixel's four corners gives the exact pixel ∩ disk area.
    """
    sy, sx = np.sign(y), np.sign(x)
    ay, ax = np.minimum(np.abs(y), r), np.minimum(np.abs(x), r)

    def chord_integral(t):  # ∫_0^t sqrt(r² - s²) ds
        return 0.5 * (
            t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(np.clip(t / r, -1, 1))
        )

    w = np.sqrt(np.maximum(r * r - ay * ay, 0.0))  # half chord at height ay
    inside = ay * ax  # the corner (ay, ax) lies inside the disk: a plain rectangle
    cut = ay * w + chord_integral(ax) - chord_integral(w)
    return sy * sx * np.where(ax <= w, inside, cut)


def _disk_batch(centers: np.ndarray, diam: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact coverage of disks (level-0 px centres (n, 2), diameters (n,))."""
    c = grid.to_map(centers)
    r = diam / (2 * grid.pixel_px)
    i0, ky = _window(c[:, 0] - r, c[:, 0] + r)
    j0, kx = _window(c[:, 1] - r, c[:, 1] + r)
    ey = (i0[:, None] + np.arange(ky + 1)) - c[:, 0:1]  # pixel edges relative to centre
    ex = (j0[:, None] + np.arange(kx + 1)) - c[:, 1:2]
    q = _quadrant_area(ey[:, :, None], ex[:, None, :], r[:, None, None])
    frac = q[:, 1:, 1:] - q[:, :-1, 1:] - q[:, 1:, :-1] + q[:, :-1, :-1]
    return _assemble(frac, i0, j0, grid)


# ---------------------------------------------------------------- exact polygon coverage
def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    z = np.zeros(0, dtype=np.int64)
    return z, z.copy(), z.copy(), np.zeros(0, dtype=float)


def _split_points(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """(edge, t): where segments a -> b cross an integer in [lo, hi] strictly inside, t in (0, 1)."""
    k0 = np.maximum(np.floor(np.minimum(a, b)) + 1, lo)
    k1 = np.minimum(np.ceil(np.maximum(a, b)) - 1, hi)
    count = np.maximum(k1 - k0 + 1, 0).astype(np.int64)
    edge = np.repeat(np.arange(a.size), count)
    k = k0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(count) - count, count))
    return edge, (k - a[edge]) / (b[edge] - a[edge])


def _polygon_pieces(v: np.ndarray, h: int, w: int) -> tuple[np.ndarray, ...]:
    """Cut every edge (map coords) at the grid's row and column lines.

    Returns the midpoint (y, x) and signed height dy of each piece; a piece inside the grid lies
    within one pixel, so its mean x is its midpoint x.
    """
    ya, xa = v[:, 0], v[:, 1]
    yb, xb = np.roll(ya, -1), np.roll(xa, -1)
    ends = np.arange(len(v))
    ey, ty = _split_points(ya, yb, 0, h)
    ex, tx = _split_points(xa, xb, 0, w)
    edge = np.concatenate([ends, ends, ey, ex])
    t = np.concatenate([np.zeros(len(v)), np.ones(len(v)), ty, tx])
    order = np.lexsort((t, edge))
    edge, t = edge[order], t[order]
    same = edge[1:] == edge[:-1]
    e, t0, t1 = edge[:-1][same], t[:-1][same], t[1:][same]
    dy, dx = (yb - ya)[e], (xb - xa)[e]
    y0, y1 = ya[e] + t0 * dy, ya[e] + t1 * dy
    return 0.5 * (y0 + y1), xa[e] + 0.5 * (t0 + t1) * dx, y1 - y0


def _polygon_coverage(v: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact polygon ∩ pixel areas (vertices (n, 2) in map coords), by signed-area accumulation.

    Each edge piece adds its signed height × (width to the right of it) to its pixel and the
    rest of its height to the next column; a cumulative sum along x then gives every pixel's
    covered area (as exact-area font rasterisers do). Cost O(edge pieces + window pixels).
    """
    h, w = grid.shape_hw
    ymid, xmid, dy = _polygon_pieces(v, h, w)
    row = np.floor(ymid).astype(np.int64)
    keep = (dy != 0) & (row >= 0) & (row < h) & (xmid < w)
    orient = np.sign(-np.sum((np.roll(v[:, 0], -1) - v[:, 0]) * (np.roll(v[:, 1], -1) + v[:, 1])))
    if not keep.any() or orient == 0:
        return _empty()[1:]
    row, xmid, dy = row[keep], xmid[keep], dy[keep] * orient
    j0 = max(0, math.floor(v[:, 1].min()))
    width = min(w, math.ceil(v[:, 1].max())) - j0 + 1
    col = np.floor(xmid).astype(np.int64)
    right = np.where(col < j0, 0.0, xmid - col)  # pieces left of the window fill it whole
    col = np.maximum(col, j0) - j0
    order = np.argsort(row, kind="stable")
    row, col, right, dy = row[order], col[order], right[order], dy[order]
    step = max(1, (4 * _CHUNK) // width)
    parts = []
    for r0 in range(int(row[0]), int(row[-1]) + 1, step):
        lo, hi = np.searchsorted(row, [r0, r0 + step])
        if hi > lo:
            sl = slice(lo, hi)
            parts.append(_accumulate(row[sl] - r0, col[sl], right[sl], dy[sl], width, r0, j0))
    if not parts:
        return _empty()[1:]
    return tuple(np.concatenate(c) for c in zip(*parts, strict=True))


def _accumulate(r, col, right, dy, width, r0, j0):
    nrows = int(r.max()) + 1
    flat, n = r * width + col, nrows * width
    acc = np.bincount(flat, dy * (1.0 - right), n) + np.bincount(flat + 1, dy * right, n + 1)[:n]
    cov = np.cumsum(acc.reshape(nrows, width), axis=1)[:, :-1]
    rr, cc = np.nonzero(cov > _TINY)
    return rr + r0, cc + j0, np.minimum(cov[rr, cc], 1.0)


def _ellipse_vertices(e: Ellipse, grid: MapGrid) -> np.ndarray:
    """Equal-area polygon of an ellipse in map coords, within ~1e-3 map px of the curve."""
    r_max = max(e.radii_yx) / grid.pixel_px
    n = int(np.clip(math.ceil(math.pi * math.sqrt(r_max / 2e-3)), 64, 8192))
    gain = math.sqrt((2 * math.pi / n) / math.sin(2 * math.pi / n))  # polygon area = ellipse area
    radii = (e.radii_yx[0] * gain, e.radii_yx[1] * gain)
    return grid.to_map(_ellipse_outline(e.center_yx, radii, e.angle_rad, n))
