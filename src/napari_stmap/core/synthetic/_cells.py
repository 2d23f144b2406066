"""Cells of the synthetic tissue: tumour, lymphocytes, fibroblasts, duct epithelium, fat seeds.

Cells come from jittered lattices whose random numbers are hashes of the lattice index, thinned
by region, tissue and exclusion around other cells; ducts are rings of luminal and myoepithelial
cells around a lumen. :func:`_cells_near` returns every cell near a µm box in a fixed global
order, so the slide and the truth see exactly the same cells whatever the tiling.

Units: µm, axis order (y, x); angles in radians from +y towards +x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ._fields import (
    _EPI,
    _FIB,
    _LYM,
    _R_DUCT,
    _STROMA,
    _TUM,
    _ecm,
    _interp_points,
    _Nodes,
    _nodes,
    _regions,
    _tissue_value,
    _World,
)
from ._noise import _hash_u01, _scalar_cos_sin

_MARGIN_UM = 100.0  # cells are generated this far around a region (exclusion chains, ducts)
# Per lattice cell type: stream, lattice spacing (µm), jitter (fraction of spacing),
# acceptance per region (stroma, tumour, immune, duct, adipose).
_LATTICES = {
    _TUM: (101, 10.5, 0.3, (0.0, 0.95, 0.0, 0.0, 0.0)),
    _LYM: (102, 6.4, 0.3, (0.045, 0.06, 0.85, 0.05, 0.01)),
    _FIB: (103, 12.0, 0.35, (-1.0, 0.03, 0.08, 0.22, 0.02)),  # -1: ECM-dependent
}
# Per type: nucleus semi-major axis range (µm), aspect (minor/major) range, haematoxylin OD
# range, body/nucleus scale along major and minor axes, vesicular chromatin (0/1).
_NUCLEI = {
    _TUM: ((4.0, 6.4), (0.62, 0.95), (0.55, 0.78), (1.8, 1.95), 1.0),
    _LYM: ((2.3, 2.9), (0.85, 1.0), (1.05, 1.3), (1.3, 1.3), 0.0),
    _FIB: ((5.5, 8.5), (0.2, 0.3), (0.75, 0.95), (1.25, 2.4), 0.0),
    _EPI: ((3.3, 4.1), (0.68, 0.85), (0.62, 0.8), (1.0, 1.0), 0.3),
}
_EXCLUDE_UM = {_LYM: 5.0, _FIB: 6.5}  # no such cell this close to a tumour/lymphocyte centre
_FIBRE_ANGLES = (0.35, 1.4, 2.45)  # radians; fibre families blended by the orient fields
_ADIPOCYTE_UM = 46.0
_DUCT_WALL_UM = 11.5  # luminal cells + myoepithelial layer around a lumen
# Duct rings: stream, radius past the lumen (µm), pitch along the ring (µm), nucleus spec
# (semi-major range, aspect range, OD range, vesicular), body (along, across) in µm or None,
# nucleus orientation relative to the radial direction (radians).
_RINGS = (
    (105, 4.2, 7.2, ((3.3, 4.1), (0.68, 0.85), (0.62, 0.8), 0.3), None, 0.0),
    (108, 9.6, 11.0, ((3.0, 3.6), (0.3, 0.4), (0.8, 0.95), 0.0), (3.9, 1.9), 0.5 * math.pi),
)
_POINT_NAMES = (
    "tissue",
    "adipose",
    "tumour",
    "duct",
    "immune",
    "ecm",
    "orient0",
    "orient1",
    "orient2",
)


@dataclass(frozen=True)
class _Cells:
    """Cells (and ducts, adipocyte seeds) near a region, in a fixed global order."""

    y: np.ndarray  # centre, µm
    x: np.ndarray
    kind: np.ndarray  # cell type index
    na: np.ndarray  # nucleus semi-axes, µm
    nb: np.ndarray
    theta: np.ndarray  # major-axis angle, radians, measured from +y towards +x
    ba: np.ndarray  # body semi-axes, µm
    bb: np.ndarray
    od: np.ndarray  # nuclear haematoxylin OD
    ves: np.ndarray  # vesicular chromatin 0..1
    shape: np.ndarray  # (n, 4): harmonic amplitudes/phases of nucleus outline
    ducts: np.ndarray  # (m, 3): y, x, lumen radius (µm)
    fat: np.ndarray  # (k, 2): adipocyte seeds y, x (µm)


def _lattice(world: _World, stream: int, spacing: float, jitter: float, box: Sequence[float]):
    """Jittered lattice points in the µm box and 6 uniforms each (pure function of the index)."""
    i = np.arange(math.floor(box[0] / spacing) - 1, math.ceil(box[2] / spacing) + 1)
    j = np.arange(math.floor(box[1] / spacing) - 1, math.ceil(box[3] / spacing) + 1)
    ii, jj = (a.ravel() for a in np.meshgrid(i, j, indexing="ij"))
    u = _hash_u01(world.seed, stream, ii[None], jj[None], np.arange(8)[:, None])
    y = (ii + 0.5 + jitter * (2 * u[0] - 1)) * spacing
    x = (jj + 0.5 + jitter * (2 * u[1] - 1)) * spacing
    keep = (y >= box[0]) & (y < box[2]) & (x >= box[1]) & (x < box[3])
    return y[keep], x[keep], u[2:, keep]


def _point_fields(
    world: _World, y: np.ndarray, x: np.ndarray, nodes: _Nodes
) -> dict[str, np.ndarray]:
    """Tissue, regions, ECM and dominant fibre angle at scattered points (µm)."""
    raw = _interp_points(nodes, y, x, _POINT_NAMES)
    orient = np.stack([raw[f"orient{k}"] for k in range(3)])
    return {
        "tissue": _tissue_value(world, raw["tissue"], y, x) > 0,
        "regions": _regions(world, raw),
        "ecm": _ecm(world, raw["ecm"], x),
        "angle": np.asarray(_FIBRE_ANGLES)[np.argmax(orient, axis=0)],
    }


def _ducts(world: _World, box: Sequence[float], nodes: _Nodes) -> np.ndarray:
    """Ducts (y, x, lumen radius µm) whose centres lie in the µm box, in duct regions."""
    y, x, u = _lattice(world, 104, 80.0, 0.15, box)
    f = _point_fields(world, y, x, nodes)
    keep = f["tissue"] & (f["regions"][_R_DUCT] > 0.5) & (u[0] < 0.85)
    radius = 7.0 + 11.0 * u[1]
    return np.stack([y[keep], x[keep], radius[keep]], axis=1)


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Cell attribute dicts joined attribute by attribute, in the order of ``parts``."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _duct_cells(world: _World, ducts: np.ndarray) -> dict[str, np.ndarray]:
    """Epithelial cells of each duct: luminal cells (cuboidal, pink cytoplasm) in a ring around
    the lumen, and flat myoepithelial cells outside them."""
    return _concat([_ring_cells(world, ducts, ring) for ring in _RINGS])


def _ring_cells(world: _World, ducts: np.ndarray, ring_spec: tuple) -> dict[str, np.ndarray]:
    """One ring of epithelial cells around each duct lumen (see ``_RINGS``)."""
    stream, offset, pitch, nucleus, body, turn = ring_spec
    ring = ducts[:, 2] + offset
    count = np.maximum(6, np.round(2 * np.pi * ring / pitch)).astype(np.int64)
    duct_id = np.repeat(np.arange(len(ducts)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    key_y = np.round(ducts[duct_id, 0] * 64).astype(np.int64)  # duct identity, not duct order
    key_x = np.round(ducts[duct_id, 1] * 64).astype(np.int64)
    u = _hash_u01(world.seed, stream, key_y[None], key_x[None], k[None], np.arange(6)[:, None])
    phase = _hash_u01(world.seed, stream + 100, key_y, key_x)
    angle = 2 * np.pi * ((k + 0.25 * (u[0] - 0.5)) / np.maximum(count[duct_id], 1) + phase)
    radius = ring[duct_id] + 0.8 * (u[1] - 0.5)
    cells = _nucleus_attributes(_EPI, u[2:], len(k), nucleus)
    cos, sin = _scalar_cos_sin(angle)
    cells["y"] = ducts[duct_id, 0] + radius * cos
    cells["x"] = ducts[duct_id, 1] + radius * sin
    cells["theta"] = angle + turn
    along = np.pi * ring[duct_id] / np.maximum(count[duct_id], 1) + 0.6
    cells["ba"] = np.full(len(k), 4.4) if body is None else np.full(len(k), body[0])
    cells["bb"] = along if body is None else np.full(len(k), body[1])
    return cells


def _nucleus_attributes(
    kind: int, u: np.ndarray, n: int, spec: tuple | None = None
) -> dict[str, np.ndarray]:
    """Nucleus size, shape, OD and body size from 4 uniforms per cell (rows of ``u``)."""
    (a_lo, a_hi), (r_lo, r_hi), (h_lo, h_hi), ves = spec or _NUCLEI[kind][:3] + _NUCLEI[kind][4:]
    sa, sb = _NUCLEI[kind][3]
    na = a_lo + (a_hi - a_lo) * u[0]
    nb = na * (r_lo + (r_hi - r_lo) * u[1])
    pleo = 0.14 if kind == _TUM else 0.04
    shape = np.stack([pleo * u[2], 2 * np.pi * u[3], 0.6 * pleo * u[1], 2 * np.pi * u[0]], axis=1)
    return {
        "kind": np.full(n, kind, dtype=np.int8),
        "na": na,
        "nb": nb,
        "od": h_lo + (h_hi - h_lo) * u[2],
        "ves": np.full(n, ves),
        "shape": shape,
        "ba": na * sa,
        "bb": nb * sb,
    }


def _excluded(y: np.ndarray, x: np.ndarray, taken: tuple) -> np.ndarray:
    """True for points closer to any taken centre (cy, cx) than its reach (µm, scalar or per centre)."""
    cy, cx, reach = taken
    if not len(cy) or not len(y):
        return np.zeros(len(y), dtype=bool)
    reach = np.broadcast_to(np.asarray(reach, dtype=np.float64), cy.shape)
    k = min(4, len(cy))
    dist, idx = cKDTree(np.stack([cy, cx], axis=1)).query(np.stack([y, x], axis=1), k=k)
    dist, idx = dist.reshape(len(y), k), idx.reshape(len(y), k)
    return (dist < reach[np.minimum(idx, len(cy) - 1)]).any(axis=1)


def _lattice_cells(
    world: _World, kind: int, box: Sequence[float], nodes: _Nodes, taken: list
) -> dict:
    """Cells of one lattice type in the µm box, thinned by region, tissue and exclusion."""
    stream, spacing, jitter, accept = _LATTICES[kind]
    y, x, u = _lattice(world, stream, spacing, jitter, box)
    f = _point_fields(world, y, x, nodes)
    rates = np.asarray(accept, dtype=np.float64)[:, None] * np.ones_like(y)
    if accept[_STROMA] < 0:  # fibroblast density follows the ECM field
        rates[_STROMA] = 0.1 + 0.42 * f["ecm"]
    keep = f["tissue"] & (u[0] < (rates * f["regions"]).sum(axis=0))
    for other in taken:
        keep &= ~_excluded(y, x, other)
    cells = _nucleus_attributes(kind, u[1:5, keep], int(keep.sum()))
    cells.update(y=y[keep], x=x[keep], theta=2 * np.pi * u[5, keep])
    if kind == _FIB:  # spindles follow the collagen fibres
        cells["theta"] = f["angle"][keep] + 0.3 * (u[5, keep] - 0.5)
    return cells


def _cells_near(world: _World, box: Sequence[float], reach_um: float) -> _Cells:
    """All cells whose centre lies within ``reach_um`` of the µm box (y0, x0, y1, x1).

    Cells are generated over a wider margin so that exclusion between types is the same for
    every box; the order is global (type, then lattice index), whatever the box.
    """
    m = _MARGIN_UM
    big = (box[0] - m, box[1] - m, box[2] + m, box[3] + m)
    nodes = _nodes(world, *big, names=_POINT_NAMES)
    ducts = _ducts(world, big, nodes)
    near_duct = ducts[:, 0], ducts[:, 1], ducts[:, 2] + _DUCT_WALL_UM
    tum = _lattice_cells(world, _TUM, big, nodes, [(*near_duct[:2], near_duct[2] + 3)])
    lym_taken = [(*near_duct[:2], near_duct[2] + 2), (tum["y"], tum["x"], _EXCLUDE_UM[_LYM])]
    lym = _lattice_cells(world, _LYM, big, nodes, lym_taken)
    fib_taken = [(*near_duct[:2], near_duct[2] + 4)]
    fib_taken += [(c["y"], c["x"], _EXCLUDE_UM[_FIB]) for c in (tum, lym)]
    fib = _lattice_cells(world, _FIB, big, nodes, fib_taken)
    merged = _concat([_duct_cells(world, ducts), tum, lym, fib])
    y, x = merged["y"], merged["x"]
    near = (y > box[0] - reach_um) & (y < box[2] + reach_um)
    near &= (x > box[1] - reach_um) & (x < box[3] + reach_um)
    fat_y, fat_x, _ = _lattice(world, 107, _ADIPOCYTE_UM, 0.38, big)
    fat = np.stack([fat_y, fat_x], axis=1)
    return _Cells(**{k: v[near] for k, v in merged.items()}, ducts=ducts, fat=fat)
