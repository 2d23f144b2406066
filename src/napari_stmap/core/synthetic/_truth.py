"""The expression truth on the 2 µm grid: computing it, writing ``truth.zarr``, reading it back.

Per truth cell (2 µm × 2 µm): the area fraction of every cell type (``abundance``, axes
(type, y, x)), the tissue fraction and the smooth fields (ECM, hypoxia, noise factors), from the
very cells the slide shows; and the gene-by-component ``profiles`` in UMI per µm² at the
reference depth. :func:`_components` turns stored arrays into component maps, so a gene's
density is ``profiles[g] @ components``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._cells import _cells_near
from ._fields import (
    _ADI,
    CELL_TYPES,
    TRUTH_GRID_UM,
    _ecm,
    _hypoxia,
    _interp_grid,
    _nodes,
    _tissue_value,
    _World,
)
from ._genes import _COMPONENTS, _load_weights
from ._raster import _block_mean, _Grid, _pieces, _stamp_bodies, _stamp_lumens
from ._sample import _Progress

_SUB = 4  # truth sub-samples per truth cell side (0.5 µm)
_TRUTH_CHUNK = 256  # truth cells per zarr chunk side (512 µm)
_FIELD_NAMES = ("ecm", "hypoxia", "noise1", "noise2", "noise3")
_NOISE_SIGMA = 2.4  # log-scale amplitude of the noise fields (raw fields have sd ≈ 0.3)


def _truth_chunk(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> tuple[np.ndarray, ...]:
    """Abundance (5, ch, cw), tissue (ch, cw) and fields (F, ch, cw) of truth cells from (cy0, cx0).

    Cell bodies are rasterised at 0.5 µm (4 × 4 samples per 2 µm cell), so abundances are
    area fractions in multiples of 1/16.
    """
    grid = _Grid(cy0 * _SUB, cx0 * _SUB, ch * _SUB, cw * _SUB, TRUTH_GRID_UM / _SUB)
    names = ("tissue", "adipose")
    nodes = _nodes(world, *grid.box, names=names)
    raw = _interp_grid(nodes, grid.ys, grid.xs, names)
    tissue = _tissue_value(world, raw["tissue"], grid.ys[:, None], grid.xs[None, :]) > 0
    label = np.full((grid.h, grid.w), -1, dtype=np.int8)
    label[(raw["adipose"] > world.thresholds[0]) & tissue] = _ADI
    cells = _cells_near(world, grid.box, reach_um=14.0)
    _stamp_bodies(grid, cells, label)
    lumen = _stamp_lumens(grid, cells.ducts) > 0.5
    label[lumen] = -1
    tissue = (tissue | (label >= 0)) & ~lumen
    abundance = np.stack([_block_mean(label == k, _SUB) for k in range(len(CELL_TYPES))])
    fields = _truth_fields(world, cy0, cx0, ch, cw)
    return abundance.astype(np.float16), _block_mean(tissue, _SUB).astype(np.float16), fields


def _truth_block(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> tuple[np.ndarray, ...]:
    """:func:`_truth_chunk` computed in pieces of at most 128 × 128 truth cells (less memory)."""
    parts = [np.zeros((len(CELL_TYPES), ch, cw), np.float16), np.zeros((ch, cw), np.float16)]
    parts.append(np.zeros((len(_FIELD_NAMES), ch, cw), np.float16))
    for y, x, ph, pw in _pieces(ch, cw, _TRUTH_CHUNK // 2):
        for out, value in zip(parts, _truth_chunk(world, cy0 + y, cx0 + x, ph, pw), strict=True):
            out[..., y : y + ph, x : x + pw] = value
    return tuple(parts)


def _truth_fields(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> np.ndarray:
    """Smooth fields (ecm, hypoxia, noise1..3 as multiplicative factors) at truth cell centres."""
    ys = (np.arange(ch) + cy0 + 0.5) * TRUTH_GRID_UM
    xs = (np.arange(cw) + cx0 + 0.5) * TRUTH_GRID_UM
    names = _FIELD_NAMES
    raw = _interp_grid(_nodes(world, ys[0], xs[0], ys[-1], xs[-1], names), ys, xs, names)
    fields = [_ecm(world, raw["ecm"], xs[None, :]), _hypoxia(raw["hypoxia"])]
    s = _NOISE_SIGMA
    fields += [np.exp(s * raw[n].astype(np.float64) - 0.5 * (0.3 * s) ** 2) for n in names[2:]]
    return np.stack(fields).astype(np.float16)


def _write_truth(
    world: _World, path: Path, genes: list[dict], profiles: np.ndarray, steps: _Progress
) -> None:
    """Write truth.zarr chunk by chunk (each chunk 512 µm × 512 µm)."""
    import zarr

    th, tw = world.truth_shape
    group = zarr.open_group(path, mode="w")
    c = _TRUTH_CHUNK
    nt, nf = len(CELL_TYPES), len(_FIELD_NAMES)
    abundance = group.create_array(
        "abundance", shape=(nt, th, tw), chunks=(nt, c, c), dtype="float16", fill_value=0
    )
    tissue = group.create_array(
        "tissue", shape=(th, tw), chunks=(c, c), dtype="float16", fill_value=0
    )
    fields = group.create_array(
        "fields", shape=(nf, th, tw), chunks=(nf, c, c), dtype="float16", fill_value=0
    )
    group.create_array("profiles", data=profiles.astype(np.float32), chunks=profiles.shape)
    group.attrs.update(_truth_attrs(world, genes, profiles))
    for cy0, cx0, ch, cw in _pieces(th, tw, c):
        ab, ti, fi = _truth_block(world, cy0, cx0, ch, cw)
        abundance[:, cy0 : cy0 + ch, cx0 : cx0 + cw] = ab
        tissue[cy0 : cy0 + ch, cx0 : cx0 + cw] = ti
        fields[:, cy0 : cy0 + ch, cx0 : cx0 + cw] = fi
        steps.tick()


def _truth_attrs(world: _World, genes: list[dict], profiles: np.ndarray) -> dict:
    """Self-description of truth.zarr (units, axes, how genes are built from components)."""
    return {
        "grid_um": TRUTH_GRID_UM,
        "mpp": world.mpp,
        "shape_px": [world.height_px, world.width_px],
        "axes": "abundance (type, y, x); tissue (y, x); fields (field, y, x); profiles (gene, component)",
        "cell_types": list(CELL_TYPES),
        "field_names": list(_FIELD_NAMES),
        "genes": [g["name"] for g in genes],
        "components": list(_COMPONENTS),
        "load_weights": _load_weights(genes, profiles),
        "units": (
            "abundance/tissue: area fraction of each 2 µm cell; profiles: expected UMI per µm² at the "
            "reference depth; gene density = sum_k profiles[g, k] * component_k, where component "
            "'a*b' is map a times field b and 'load' = sum of load_weights times their maps"
        ),
    }


def _read_truth(group: Any, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, ...]:
    """Stored truth arrays (abundance, tissue, fields) of cells [r0, r1) × [c0, c1) of truth.zarr."""
    return (
        np.asarray(group["abundance"][:, r0:r1, c0:c1]),
        np.asarray(group["tissue"][r0:r1, c0:c1]),
        np.asarray(group["fields"][:, r0:r1, c0:c1]),
    )


def _components(
    attrs: Any, abundance: np.ndarray, tissue: np.ndarray, fields: np.ndarray
) -> np.ndarray:
    """Component maps (K, rows, cols) float32 from stored truth arrays (see ``_truth_attrs``)."""
    tissue = tissue.astype(np.float32)
    base = dict(zip(attrs["cell_types"], abundance.astype(np.float32), strict=True))
    base["tissue"], base["ambient"] = tissue, np.ones_like(tissue)
    field = dict(zip(attrs["field_names"], fields.astype(np.float32), strict=True))
    names = {c: k for k, c in enumerate(attrs["components"])}
    out = np.empty((len(names), *tissue.shape), dtype=np.float32)
    for loads in (False, True):  # "load" is a weighted sum of the other components
        for comp, k in names.items():
            left, _, right = comp.partition("*")
            if (left == "load") == loads:
                out[k] = base[left] * field[right] if right else base[left]
        if not loads:
            weights = attrs["load_weights"].items()
            base["load"] = sum(np.float32(w) * out[names[c]] for c, w in weights)
    return out
