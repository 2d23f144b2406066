"""Rasterisation shared by the slide and the truth: grids, cell bodies, nuclei, lumens, fat.

A :class:`_Grid` is a block of a global pixel grid (level-0 slide pixels, or 0.5 µm truth
sub-samples); every stamp is order-independent (min/max compositing), so a block gets the same
pixels whatever the blocks around it. Also the block iteration and block reductions that the
writers share.

Units: µm, axis order (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ._cells import _Cells
from ._noise import _scalar_cos_sin


@dataclass(frozen=True)
class _Grid:
    """A block of a global pixel grid: pixel (r, c) has its centre at ((gy0+r+½)·s, (gx0+c+½)·s) µm."""

    gy0: int
    gx0: int
    h: int
    w: int
    spacing: float

    @property
    def ys(self) -> np.ndarray:
        return (np.arange(self.h) + self.gy0 + 0.5) * self.spacing

    @property
    def xs(self) -> np.ndarray:
        return (np.arange(self.w) + self.gx0 + 0.5) * self.spacing

    @property
    def box(self) -> tuple[float, float, float, float]:
        s = self.spacing
        return (self.gy0 * s, self.gx0 * s, (self.gy0 + self.h) * s, (self.gx0 + self.w) * s)

    def window(self, cy: float, cx: float, reach: float):
        """Pixels whose centre is within ``reach`` µm (box) of (cy, cx): slices + offsets (µm)."""
        s = self.spacing
        r0 = max(0, math.ceil((cy - reach) / s - 0.5) - self.gy0)
        r1 = min(self.h, math.floor((cy + reach) / s - 0.5) + 1 - self.gy0)
        c0 = max(0, math.ceil((cx - reach) / s - 0.5) - self.gx0)
        c1 = min(self.w, math.floor((cx + reach) / s - 0.5) + 1 - self.gx0)
        if r0 >= r1 or c0 >= c1:
            return None
        dy = ((np.arange(r0, r1) + self.gy0 + 0.5) * s - cy)[:, None]
        dx = ((np.arange(c0, c1) + self.gx0 + 0.5) * s - cx)[None, :]
        return (slice(r0, r1), slice(c0, c1)), dy, dx


def _pieces(h: int, w: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(y, x, height, width) of the pieces of at most ``size`` × ``size`` that tile an (h, w)
    block, row by row."""
    for y in range(0, h, size):
        for x in range(0, w, size):
            yield y, x, min(size, h - y), min(size, w - x)


def _blocks(a: np.ndarray, k: int) -> np.ndarray:
    """View of ``a`` with its last two axes split into k × k blocks (sizes multiples of k)."""
    h, w = a.shape[-2:]
    return a.reshape(*a.shape[:-2], h // k, k, w // k, k)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean (float32) over k × k blocks of the last two axes (their sizes are multiples of k)."""
    return _blocks(a, k).mean(axis=(-3, -1), dtype=np.float32)


def _block_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over k × k blocks of the last two axes (their sizes are multiples of k)."""
    if k == 1:
        return a
    return _blocks(a, k).sum(axis=(-3, -1))


def _reach(cells: _Cells, index: np.ndarray) -> float:
    """Largest body semi-axis (µm) of the given cells."""
    return float(max(cells.ba[index].max(), cells.bb[index].max()))


def _splat(
    grid: _Grid, cells: _Cells, index: np.ndarray, reach_um: float
) -> tuple[np.ndarray, ...]:
    """Pixels within ``reach_um`` (box) of the given cells, in the cells' own frames.

    Returns flat pixel indices into the (h, w) grid, the cell of each pixel (position in
    ``index``) and the pixel's offsets (u along the major axis, v across, µm, float32).
    """
    s = grid.spacing
    half = math.ceil(reach_um / s) + 1
    offsets = np.arange(-half, half + 1)
    rows = np.floor(cells.y[index] / s).astype(np.int64)[:, None] + offsets
    cols = np.floor(cells.x[index] / s).astype(np.int64)[:, None] + offsets
    dy = ((rows + 0.5) * s - cells.y[index, None]).astype(np.float32)[:, :, None]
    dx = ((cols + 0.5) * s - cells.x[index, None]).astype(np.float32)[:, None, :]
    ok_r = (rows >= grid.gy0) & (rows < grid.gy0 + grid.h) & (np.abs(dy[:, :, 0]) <= reach_um)
    ok_c = (cols >= grid.gx0) & (cols < grid.gx0 + grid.w) & (np.abs(dx[:, 0, :]) <= reach_um)
    keep = ok_r[:, :, None] & ok_c[:, None, :]
    flat = ((rows - grid.gy0) * grid.w)[:, :, None] + (cols - grid.gx0)[:, None, :]
    ct, st = (a[:, None, None] for a in _scalar_cos_sin(cells.theta[index], np.float32))
    u, v = dy * ct + dx * st, dx * ct - dy * st
    owner = np.broadcast_to(np.arange(len(index))[:, None, None], keep.shape)
    return flat[keep], owner[keep], u[keep], v[keep]


def _stamp_bodies(
    grid: _Grid, cells: _Cells, label: np.ndarray, nuclei: tuple | None = None
) -> None:
    """Label each pixel with the type of the cell body it is deepest in (normalised distance).

    With ``nuclei = (od, mask)`` also draw nuclei (max-composited). Both are order-independent.
    """
    best = np.ones(label.size, dtype=np.float32)
    pending = []
    for kind, index in _batches(grid, cells):
        flat, owner, u, v = _splat(grid, cells, index, _reach(cells, index))
        ba, bb = cells.ba[index].astype(np.float32), cells.bb[index].astype(np.float32)
        rho = (u / ba[owner]) ** 2 + (v / bb[owner]) ** 2
        inside = rho < 1
        flat, owner, rho, u, v = flat[inside], owner[inside], rho[inside], u[inside], v[inside]
        np.minimum.at(best, flat, rho)
        if nuclei is not None:
            _stamp_nuclei(cells, index, flat, owner, u, v, nuclei)
        pending.append((flat, rho, kind))
    flat_label = label.reshape(-1)
    for flat, rho, kind in pending:
        flat_label[flat[rho == best[flat]]] = kind


def _batches(grid: _Grid, cells: _Cells, budget: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """(type, cell indices) in batches whose splat windows hold about ``budget`` pixels."""
    for kind in np.unique(cells.kind):
        index = np.nonzero(cells.kind == kind)[0]
        window = (2 * math.ceil(_reach(cells, index) / grid.spacing) + 3) ** 2
        step = max(1, budget // window)
        for start in range(0, len(index), step):
            yield int(kind), index[start : start + step]


def _stamp_nuclei(cells: _Cells, index: np.ndarray, flat, owner, u, v, nuclei: tuple) -> None:
    """Nuclei: irregular ellipses with a soft edge, vesicular rim and nucleolus (tumour)."""
    na, nb = cells.na[index].astype(np.float32)[owner], cells.nb[index].astype(np.float32)[owner]
    a2, a3 = (cells.shape[index, k].astype(np.float32)[owner] for k in (0, 2))
    radius = np.sqrt(u * u + v * v) + np.float32(1e-6)
    cu, su = u / radius, v / radius
    c2, s2 = _cos_sin(cells.shape[index, 1], owner)
    c3, s3 = _cos_sin(cells.shape[index, 3], owner)
    bump = 1 + a2 * ((cu * cu - su * su) * c2 + 2 * cu * su * s2)
    bump = bump + a3 * (cu * (4 * cu * cu - 3) * c3 + su * (3 - 4 * su * su) * s3)
    rn = np.sqrt((u / na) ** 2 + (v / nb) ** 2) / bump
    mask = np.clip((1 - rn) * nb / np.float32(0.45), 0.0, 1.0)
    ves = cells.ves[index].astype(np.float32)[owner]
    od = cells.od[index].astype(np.float32)[owner] * (1 - 0.5 * ves * (1 - rn * rn))
    d2 = ((u - 0.3 * na * c3) ** 2 + (v - 0.3 * nb * s3) ** 2) / np.float32(0.55)
    od = od + (ves > 0.5) * np.float32(0.55) * np.clip(1 - d2, 0.0, 1.0)
    np.maximum.at(nuclei[0].reshape(-1), flat, od * mask)
    np.maximum.at(nuclei[1].reshape(-1), flat, mask)


def _cos_sin(angles: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (float32) of per-cell angles, gathered per pixel (scalar math: reproducible)."""
    cos, sin = _scalar_cos_sin(angles, np.float32)
    return cos[owner], sin[owner]


def _stamp_lumens(grid: _Grid, ducts: np.ndarray) -> np.ndarray:
    """Duct lumens: 1 inside the lumen disk, 0 outside, soft over 0.6 µm -> (h, w) float32."""
    lumen = np.zeros((grid.h, grid.w), dtype=np.float32)
    for cy, cx, radius in ducts:
        win = grid.window(float(cy), float(cx), float(radius) + 1.0)
        if win is None:
            continue
        sl, dy, dx = win
        inside = np.clip((radius - np.sqrt(dy * dy + dx * dx)) / 0.6 + 0.5, 0.0, 1.0)
        np.maximum(lumen[sl], inside.astype(np.float32), out=lumen[sl])
    return lumen


def _fat_membranes(grid: _Grid, fat: np.ndarray, adipose: np.ndarray) -> np.ndarray:
    """Adipocyte membranes (Voronoi edges of the fat seeds) on adipose pixels -> (h, w) float32."""
    out = np.zeros((grid.h, grid.w), dtype=np.float32)
    rows, cols = np.nonzero(adipose)
    if len(rows) == 0 or len(fat) < 2:
        return out
    points = np.stack([grid.ys[rows], grid.xs[cols]], axis=1)
    dist, _ = cKDTree(fat).query(points, k=2)
    out[rows, cols] = np.clip(1.0 - (dist[:, 1] - dist[:, 0]) / 1.8, 0.0, 1.0)
    return out
