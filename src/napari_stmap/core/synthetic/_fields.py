"""The tissue's world: slide geometry, cell types and the smooth fields that lay out the tissue.

Smooth fields (tissue outline, regions, ECM maturity, hypoxia, fibre orientation, illumination,
noise genes) are multi-octave value noise, evaluated on a global 8 µm node grid and interpolated
from it, so a point gets the same bits whatever region it is computed in. :func:`_make_world`
fixes the region thresholds that give each region its target share of the tissue.

Units: µm, axis order (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._noise import _smoothstep01, _value_noise

CELL_TYPES: tuple[str, ...] = ("tumour", "lymphocyte", "fibroblast", "epithelial", "adipocyte")
"""Cell types of the synthetic tissue, in the order of the ``abundance`` axis of truth.zarr."""
TRUTH_GRID_UM = 2.0
"""Side of a truth cell in µm (the finest Visium HD bin)."""

_TUM, _LYM, _FIB, _EPI, _ADI = range(5)  # cell type indices (CELL_TYPES order)
_STROMA, _R_TUM, _R_IMM, _R_DUCT, _R_ADI = range(5)  # region indices (see _regions)
_NODE_UM = 8.0  # spacing of the global node grid that carries the smooth fields
# Share of the tissue area per region, assigned in this order (the rest is stroma).
_REGION_TARGETS = (0.09, 0.30, 0.10, 0.08)


@dataclass(frozen=True)
class _World:
    """Everything the tissue is a function of: seed, slide geometry, region thresholds."""

    seed: int
    mpp: float
    height_px: int
    width_px: int
    thresholds: tuple[float, float, float, float]  # adipose, tumour, duct, immune (raw units)

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp

    @property
    def truth_shape(self) -> tuple[int, int]:
        return (
            math.ceil(self.height_um / TRUTH_GRID_UM - 1e-9),
            math.ceil(self.width_um / TRUTH_GRID_UM - 1e-9),
        )


def _make_world(seed: int, mpp: float, size_um: Sequence[float]) -> _World:
    """Slide geometry and the region thresholds that give each region its target area."""
    width_px, height_px = (max(1, round(s / mpp)) for s in size_um)
    provisional = _World(int(seed), float(mpp), height_px, width_px, (0.0, 0.0, 0.0, 0.0))
    step = max(_NODE_UM, max(provisional.height_um, provisional.width_um) / 256)
    ys = np.arange(step / 2, provisional.height_um, step)
    xs = np.arange(step / 2, provisional.width_um, step)
    yy, xx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    raw = _raw_fields(provisional, yy, xx, ("tissue", "adipose", "tumour", "duct", "immune"))
    inside = _tissue_value(provisional, raw["tissue"], yy, xx) > 0
    if inside.sum() < 16:
        inside = np.ones_like(inside)
    free, thresholds = inside.copy(), []
    for name, target in zip(("adipose", "tumour", "duct", "immune"), _REGION_TARGETS, strict=True):
        z = raw[name]
        share = min(1.0, target * inside.sum() / max(free.sum(), 1))
        thresholds.append(float(np.quantile(z[free], 1 - share)))
        free &= z <= thresholds[-1]
    return _World(int(seed), float(mpp), height_px, width_px, tuple(thresholds))


# Per field: noise stream, octave scales (µm) and weights.
_RAW_SPECS: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {
    "tissue": (10, (0.0, 160.0, 55.0), (0.6, 0.28, 0.12)),  # scale 0: a quarter of the slide
    "tumour": (11, (230.0, 85.0), (0.75, 0.25)),
    "immune": (12, (120.0, 45.0), (0.7, 0.3)),
    "duct": (13, (280.0, 110.0), (0.7, 0.3)),
    "adipose": (14, (380.0, 140.0), (0.75, 0.25)),
    "ecm": (15, (420.0, 160.0), (0.7, 0.3)),
    "hypoxia": (16, (300.0, 110.0), (0.7, 0.3)),
    "orient0": (17, (220.0, 90.0), (0.7, 0.3)),
    "orient1": (18, (220.0, 90.0), (0.7, 0.3)),
    "orient2": (19, (220.0, 90.0), (0.7, 0.3)),
    "warp": (20, (45.0,), (1.0,)),
    "illum": (21, (900.0, 300.0), (0.7, 0.3)),
    "noise1": (22, (36.0, 14.0), (0.7, 0.3)),
    "noise2": (23, (36.0, 14.0), (0.7, 0.3)),
    "noise3": (24, (36.0, 14.0), (0.7, 0.3)),
}


def _raw_fields(
    world: _World, y: np.ndarray, x: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Multi-octave value noise of each named field at points (µm), float64, roughly in [-1, 1]."""
    out = {}
    for name in names:
        stream, scales, weights = _RAW_SPECS[name]
        total = np.zeros(np.broadcast_shapes(np.shape(y), np.shape(x)))
        for octave, (scale, weight) in enumerate(zip(scales, weights, strict=True)):
            scale = scale or 0.25 * min(world.height_um, world.width_um)
            total = total + weight * _value_noise(
                world.seed, stream * 8 + octave, y, x, scale, scale
            )
        out[name] = total / sum(weights)
    return out


# ----------------------------------------------------------------------------------------------
# Fields on the global node grid, interpolated bitwise-reproducibly
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nodes:
    """Raw fields at the global 8 µm nodes ``(iy0 + i, ix0 + j) · 8 µm`` covering a region."""

    iy0: int
    ix0: int
    values: dict[str, np.ndarray]  # name -> (ny, nx) float64


def _nodes(
    world: _World, y0: float, x0: float, y1: float, x1: float, names: Sequence[str]
) -> _Nodes:
    """Evaluate raw fields at the nodes covering the µm box (y0, x0)-(y1, x1) plus one node."""
    iy0, ix0 = math.floor(y0 / _NODE_UM) - 1, math.floor(x0 / _NODE_UM) - 1
    iy1, ix1 = math.floor(y1 / _NODE_UM) + 2, math.floor(x1 / _NODE_UM) + 2
    ny = (np.arange(iy0, iy1 + 1) * _NODE_UM)[:, None]
    nx = (np.arange(ix0, ix1 + 1) * _NODE_UM)[None, :]
    return _Nodes(iy0, ix0, _raw_fields(world, ny, nx, names))


def _node_weights(coords: np.ndarray, origin: int) -> tuple[np.ndarray, np.ndarray]:
    """Node index (relative to ``origin``) left of each µm coordinate, and the fraction past it."""
    t = coords / _NODE_UM
    i = np.floor(t)
    return (i.astype(np.int64) - origin), (t - i)


def _bilinear(
    values: np.ndarray, iy: np.ndarray, fy: np.ndarray, ix: np.ndarray, fx: np.ndarray
) -> np.ndarray:
    """Bilinear interpolation of a (ny, nx) node table on a grid: rows ``iy`` (fractions ``fy``,
    a column vector), columns ``ix`` (fractions ``fx``) -> (len(iy), len(ix))."""
    along_x = values[:, ix] * (1 - fx) + values[:, ix + 1] * fx
    return along_x[iy] * (1 - fy) + along_x[iy + 1] * fy


def _interp_grid(
    nodes: _Nodes, ys: np.ndarray, xs: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Bilinear interpolation of node fields on the grid ``ys × xs`` (µm) -> (h, w) float32.

    The fractions come from the global coordinates, so a pixel gets the same bits whatever the
    region it is computed in.
    """
    iy, fy = _node_weights(ys, nodes.iy0)
    ix, fx = _node_weights(xs, nodes.ix0)
    fy, fx = fy.astype(np.float32)[:, None], fx.astype(np.float32)
    return {
        name: _bilinear(nodes.values[name].astype(np.float32), iy, fy, ix, fx) for name in names
    }


def _interp_points(
    nodes: _Nodes, y: np.ndarray, x: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Bilinear interpolation of node fields at scattered points (µm) -> (n,) float64."""
    iy, fy = _node_weights(y, nodes.iy0)
    ix, fx = _node_weights(x, nodes.ix0)
    out = {}
    for name in names:
        v = nodes.values[name]
        top = v[iy, ix] * (1 - fx) + v[iy, ix + 1] * fx
        bottom = v[iy + 1, ix] * (1 - fx) + v[iy + 1, ix + 1] * fx
        out[name] = top * (1 - fy) + bottom * fy
    return out


# ----------------------------------------------------------------------------------------------
# Tissue, regions, ECM, hypoxia from the raw fields
# ----------------------------------------------------------------------------------------------


def _tissue_value(
    world: _World, raw_tissue: np.ndarray, y: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """Tissue where > 0: an irregular blob, centred, covering about 60 % of the slide."""
    ry, rx = 0.47 * world.height_um, 0.47 * world.width_um
    dy = (y - 0.5 * world.height_um) / ry
    dx = (x - 0.5 * world.width_um) / rx
    return 0.62 * raw_tissue + 0.78 - (dy * dy + dx * dx)


def _regions(world: _World, raw: dict[str, np.ndarray]) -> np.ndarray:
    """Region probabilities (stroma, tumour, immune, duct, adipose) from raw fields -> (5, ...)."""
    width = 0.05  # half-width of a region boundary in raw units (about 10 µm)
    steps = [
        _smoothstep01(0.5 + (raw[name] - thr) / (2 * width))
        for name, thr in zip(("adipose", "tumour", "duct", "immune"), world.thresholds, strict=True)
    ]
    adipose = steps[0]
    rest = 1 - adipose
    tumour = rest * steps[1]
    rest = rest * (1 - steps[1])
    duct = rest * steps[2]
    rest = rest * (1 - steps[2])
    immune = rest * steps[3]
    return np.stack([rest * (1 - steps[3]), tumour, immune, duct, adipose])


def _ecm(world: _World, raw_ecm: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Stroma maturity in [0, 1]: a left-to-right gradient plus a smooth field (visible as eosin
    tone, collagen fibre density and fibroblast density; drives the smooth ECM genes)."""
    gradient = x / world.width_um - 0.5
    return np.clip(0.5 + 0.55 * gradient + 0.9 * raw_ecm, 0.0, 1.0)


def _hypoxia(raw_hyp: np.ndarray) -> np.ndarray:
    """Tumour hypoxia in [0, 1] (visible as more eosinophilic tumour cytoplasm)."""
    return _smoothstep01(0.5 + 1.6 * raw_hyp)
