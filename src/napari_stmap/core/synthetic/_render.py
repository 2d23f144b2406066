"""The H&E colour model: level-0 pixels of the synthetic slide as RGB.

Stain optical densities (haematoxylin, eosin) are built from the stroma fields, collagen fibres,
fat membranes, cell cytoplasm, duct lumens and nuclei, then turned into RGB by Beer-Lambert with
Macenko reference vectors, plus per-pixel chromatin and sensor grain from the pixel hash.
:func:`_render_rgb` is a pure function of the world and the pixel block.

Units: level-0 pixels (y, x); positions in µm; RGB uint8 (h, w, 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._cells import _FIBRE_ANGLES, _cells_near
from ._fields import (
    _ADI,
    _EPI,
    _LYM,
    _TUM,
    _bilinear,
    _ecm,
    _hypoxia,
    _interp_grid,
    _Nodes,
    _nodes,
    _tissue_value,
    _World,
)
from ._noise import _hash_bits, _smoothstep01, _value_noise
from ._raster import _fat_membranes, _Grid, _stamp_bodies, _stamp_lumens

# Optical density per unit stain (R, G, B), Macenko reference vectors.
_H_VEC = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_VEC = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
_I0 = np.array([246.0, 244.0, 248.0], dtype=np.float32)
_LUT_STEPS = 4096
_POW10 = (10.0 ** (-(np.arange(4 * _LUT_STEPS) + 0.5) / _LUT_STEPS)).astype(np.float32)
# Cytoplasm (eosin OD, haematoxylin OD) per type; fibroblasts look like their stroma.
_CYTO = {_TUM: (0.17, 0.13), _LYM: (0.14, 0.12), _EPI: (0.30, 0.07)}
_PIXEL_NAMES = ("tissue", "adipose", "ecm", "hypoxia", "illum")
_NODE_NAMES = (*_PIXEL_NAMES, "orient0", "orient1", "orient2", "warp")


def _pow10_neg(od: np.ndarray) -> np.ndarray:
    """10 ** -od (od ≥ 0) via a lookup table: fast and bitwise reproducible."""
    return _POW10[(np.minimum(od, np.float32(3.999)) * np.float32(_LUT_STEPS)).astype(np.int32)]


def _render_rgb(world: _World, gy0: int, gx0: int, h: int, w: int) -> np.ndarray:
    """H&E RGB of level-0 pixels [gy0, gy0+h) × [gx0, gx0+w) -> (h, w, 3) uint8."""
    grid = _Grid(gy0, gx0, h, w, world.mpp)
    ys, xs = grid.ys, grid.xs
    nodes = _nodes(world, *grid.box, names=_NODE_NAMES)
    raw = _interp_grid(nodes, ys, xs, _PIXEL_NAMES)
    tissue = _tissue_value(world, raw["tissue"], ys[:, None], xs[None, :]).astype(np.float32)
    adipose = (raw["adipose"] > world.thresholds[0]) & (tissue > 0)
    cells = _cells_near(world, grid.box, reach_um=14.0)
    label = np.full((h, w), -1, dtype=np.int8)
    label[adipose] = _ADI
    nuclei = (np.zeros((h, w), np.float32), np.zeros((h, w), np.float32))
    _stamp_bodies(grid, cells, label, nuclei)
    layers = {
        "tissue": tissue,
        "label": label,
        "nuclei": nuclei,
        "lumen": _stamp_lumens(grid, cells.ducts),
        "membrane": _fat_membranes(grid, cells.fat, adipose & (label == _ADI)),
        "fibres": _fibres(world, grid, nodes),
    }
    return _compose(world, grid, raw, layers)


def _compose(world: _World, grid: _Grid, raw: dict, layers: dict) -> np.ndarray:
    """Stain densities -> RGB: stroma, fat, cytoplasm, lumens, nuclei, grain (uint8 (h, w, 3))."""
    tissue, label, fib = layers["tissue"], layers["label"], layers["fibres"]
    inside = (tissue > 0) * (0.55 + 0.45 * _smoothstep01(tissue / np.float32(0.06)))
    ecm = _ecm(world, raw["ecm"], grid.xs[None, :].astype(np.float32))
    eosin = inside * (0.13 + 0.30 * ecm) * (0.5 + 0.85 * fib)
    haem = inside * (0.03 + 0.05 * fib)
    fat = label == _ADI
    eosin[fat] = 0.012 + 0.45 * layers["membrane"][fat]
    haem[fat] = 0.006 + 0.07 * layers["membrane"][fat]
    for kind, (e_od, h_od) in _CYTO.items():
        cyto = label == kind
        eosin[cyto] = e_od + (0.2 * _hypoxia(raw["hypoxia"][cyto]) if kind == _TUM else 0.0)
        haem[cyto] = h_od
    lumen = layers["lumen"]
    eosin = eosin * (1 - lumen) + 0.025 * lumen
    haem = haem * (1 - lumen) + 0.008 * lumen
    rows, cols = np.arange(grid.h) + grid.gy0, np.arange(grid.w) + grid.gx0
    bits = _hash_bits(world.seed, 400, rows[:, None], cols[None, :])
    chromatin = 0.78 + 0.44 * ((bits & np.uint64(0xFFFF)).astype(np.float32) / 65536)
    nuc_od, nuc_mask = layers["nuclei"]
    haem = haem * (1 - nuc_mask) + nuc_od * chromatin
    eosin = eosin * (1 - 0.75 * nuc_mask)
    return _stains_to_rgb(haem, eosin, 0.028 + 0.012 * raw["illum"], bits)


def _stains_to_rgb(
    haem: np.ndarray, eosin: np.ndarray, background: np.ndarray, bits: np.ndarray
) -> np.ndarray:
    """Beer-Lambert RGB of stain ODs (h, w) plus sensor grain from the pixel hash -> uint8 (h, w, 3)."""
    rgb = np.empty((*haem.shape, 3), dtype=np.uint8)
    for c in range(3):
        channel = _I0[c] * _pow10_neg(haem * _H_VEC[c] + eosin * _E_VEC[c] + background)
        grain = ((bits >> np.uint64(16 + 12 * c)) & np.uint64(0xFFF)).astype(
            np.float32
        ) * np.float32(5 / 4096)
        rgb[..., c] = np.clip(channel + grain - 2.0, 0, 255).astype(np.uint8)
    return rgb


def _bilinear_upsample(fn: Callable, ys: np.ndarray, xs: np.ndarray, step: float) -> np.ndarray:
    """Evaluate ``fn(node_ys, node_xs)`` on global nodes ``k·step`` µm and interpolate on ys × xs."""
    ty, tx = ys / step, xs / step
    iy, ix = np.floor(ty), np.floor(tx)
    fy, fx = (ty - iy)[:, None], tx - ix
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    vals = fn(np.arange(iy[0], iy[-1] + 2) * step, np.arange(ix[0], ix[-1] + 2) * step)
    return _bilinear(vals, iy - iy[0], fy, ix - ix[0], fx).astype(np.float32)


def _fibres(world: _World, grid: _Grid, nodes: _Nodes) -> np.ndarray:
    """Collagen fibre texture in [0, 1]: ridged anisotropic noise in three blended, wavy
    orientation families (computed on a 1 µm global grid, then interpolated)."""

    def fibre_nodes(yn: np.ndarray, xn: np.ndarray) -> np.ndarray:
        raw = _interp_grid(nodes, yn, xn, ("orient0", "orient1", "orient2", "warp"))
        yy, xx = yn[:, None], xn[None, :]
        total = weight_sum = 0.0
        for k, angle in enumerate(_FIBRE_ANGLES):
            c, s = math.cos(angle), math.sin(angle)
            along, across = yy * c + xx * s, xx * c - yy * s + 12.0 * raw["warp"]
            ridge = (1 - np.abs(_value_noise(world.seed, 300 + k, along, across, 30.0, 3.2))) ** 5
            weight = (raw[f"orient{k}"].astype(np.float64) + 1.3) ** 6
            total, weight_sum = total + weight * ridge, weight_sum + weight
        return total / weight_sum

    return _bilinear_upsample(fibre_nodes, grid.ys, grid.xs, min(1.0, 2 * world.mpp))
