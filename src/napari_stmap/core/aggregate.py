"""Dense map + footprints -> region values (sums), in numpy/scipy and in torch.

The value of a region is the sum over map pixels of (fraction of the pixel covered) × (map
value): see :mod:`napari_stmap.core.geometry` and ``DESIGN.md`` ("One rule for expression
values"). Both back ends use the same sparse weight matrix from
:func:`~napari_stmap.core.geometry.weight_matrix`, so the viewer, the CLI and training agree.

Axis order: maps are (C, H, W) or (B, C, H, W) with the "total" channel last; results are
(n, C) or (B, n, C). Positions are level-0 slide px (y, x).

Torch is imported inside the torch functions only, so importing this module stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import Footprint, MapGrid, weight_matrix

if TYPE_CHECKING:
    import torch

__all__ = [
    "BatchWeights",
    "aggregate",
    "aggregate_torch",
    "batch_weights",
    "sum_bins",
    "to_torch_sparse",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ numpy
def aggregate(
    map_chw: Any,
    grid: MapGrid,
    footprints: Sequence[Footprint] | Footprint | sp.spmatrix | sp.sparray,
) -> np.ndarray:
    """Sum a dense map over footprints.

    Parameters
    ----------
    map_chw
        Map of shape (C, H, W): numpy array or anything array-like with ``__getitem__``
        slicing (a dask array is only computed over the pixels the footprints touch).
    grid
        Where the map lies, level-0 px; ``grid.shape_hw`` must equal (H, W).
    footprints
        Footprints in level-0 px, or a precomputed ``weight_matrix(footprints, grid)``
        of shape (n, H·W).

    Returns
    -------
    numpy.ndarray
        (n, C) float64 sums (accumulated in float64). A spot that covers any NaN map pixel
        (by a fraction > 0) is NaN in that channel; spots not touching NaN pixels are unaffected.
        Spots entirely outside the grid sum to 0.
    """
    shape = tuple(getattr(map_chw, "shape", ()))
    if len(shape) != 3 or tuple(shape[1:]) != tuple(grid.shape_hw):
        msg = f"map of shape {shape} does not match grid {grid.shape_hw}: pass a (C, H, W) map on that grid."
        raise StmapInputError(msg)
    weights = _as_weights(footprints, grid)
    n_ch = shape[0]
    if weights.nnz == 0:
        return np.zeros((weights.shape[0], n_ch), dtype=np.float64)
    rows, cols, sub = _touched_window(weights, grid)
    block = np.asarray(map_chw[:, rows, cols], dtype=np.float64)
    values = block.reshape(n_ch, -1).T
    return np.asarray(sub @ values, dtype=np.float64)


def _as_weights(footprints, grid: MapGrid) -> sp.csr_matrix:
    """Accept footprints or a weight matrix; check its shape against the grid."""
    if isinstance(footprints, Footprint) or (
        isinstance(footprints, Sequence) and not sp.issparse(footprints)
    ):
        return weight_matrix(footprints, grid)
    if not sp.issparse(footprints):
        msg = f"footprints of type {type(footprints).__name__} not understood: pass footprints or weight_matrix(...)."
        raise StmapInputError(msg)
    weights = sp.csr_matrix(footprints)
    h, w = grid.shape_hw
    if weights.shape[1] != h * w:
        msg = f"weight matrix has {weights.shape[1]} columns, grid has H*W={h * w}: rebuild it with weight_matrix(footprints, grid)."
        raise StmapInputError(msg)
    return weights


def _touched_window(weights: sp.csr_matrix, grid: MapGrid) -> tuple[slice, slice, sp.csr_matrix]:
    """Smallest row/col window of the map that the weights touch, and the weights re-indexed."""
    w = grid.shape_hw[1]
    used = np.unique(weights.indices)
    r, c = np.divmod(used, w)
    rows, cols = slice(int(r.min()), int(r.max()) + 1), slice(int(c.min()), int(c.max()) + 1)
    pr, pc = np.divmod(weights.indices.astype(np.int64), w)
    width = cols.stop - cols.start
    flat = (pr - rows.start) * width + (pc - cols.start)
    size = (rows.stop - rows.start) * width
    sub = sp.csr_matrix((weights.data, flat, weights.indptr), shape=(weights.shape[0], size))
    return rows, cols, sub


# ------------------------------------------------------------------------------------ torch
def to_torch_sparse(
    weights: sp.spmatrix | sp.sparray, *, dtype: Any = None, device: Any = None
) -> torch.Tensor:
    """scipy sparse (n, P) -> coalesced torch sparse COO tensor (n, P).

    Parameters
    ----------
    weights
        E.g. ``weight_matrix(footprints, grid)``.
    dtype, device
        Torch dtype (default ``torch.float32``) and device.
    """
    import torch

    coo = sp.coo_matrix(weights)
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(np.asarray(coo.data, dtype=np.float64))
    out = torch.sparse_coo_tensor(indices, values, coo.shape, dtype=dtype or torch.float32)
    return out.coalesce().to(device) if device is not None else out.coalesce()


@dataclass(frozen=True)
class BatchWeights:
    """Spots of a batch of B map tiles where each tile has its own spots.

    Attributes
    ----------
    matrix
        Torch sparse COO (N, B·H·W), N = total spots; block-diagonal: the spots of item b
        only weight pixels of item b.
    item_index
        (N,) int64 tensor: the batch item of each spot (spots are in item order).
    counts
        Number of spots per item.
    shape_hw
        (H, W) of every map tile.
    """

    matrix: torch.Tensor
    item_index: torch.Tensor
    counts: tuple[int, ...]
    shape_hw: tuple[int, int]

    def to(self, device: Any) -> BatchWeights:
        """The same weights on another torch device."""
        return BatchWeights(
            self.matrix.to(device), self.item_index.to(device), self.counts, self.shape_hw
        )


def batch_weights(
    per_item: Sequence[sp.spmatrix | sp.sparray], shape_hw: tuple[int, int], *, dtype: Any = None
) -> BatchWeights:
    """Stack per-tile weight matrices (each (n_b, H·W)) into one block-diagonal :class:`BatchWeights`.

    Cheap enough for a DataLoader ``collate_fn``; build each item's matrix with
    ``weight_matrix(spots_of_tile, tile_grid)``.
    """
    import torch

    h, w = (int(v) for v in shape_hw)
    for b, m in enumerate(per_item):
        if m.shape[1] != h * w:
            msg = f"weights of item {b} have {m.shape[1]} columns, tiles have H*W={h * w}: build them on the tile grid."
            raise StmapInputError(msg)
    if not per_item:
        msg = "batch_weights got no items: pass one weight matrix per map tile."
        raise StmapInputError(msg)
    stacked = sp.block_diag(list(per_item), format="csr")
    counts = tuple(int(m.shape[0]) for m in per_item)
    item = torch.repeat_interleave(
        torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long)
    )
    return BatchWeights(to_torch_sparse(stacked, dtype=dtype), item, counts, (h, w))


def aggregate_torch(map_bchw: torch.Tensor, weights: Any) -> torch.Tensor:
    """Differentiable sums of a map over footprints (same numbers as :func:`aggregate`).

    Parameters
    ----------
    map_bchw
        (B, C, H, W) or (C, H, W) tensor (e.g. the model output for a batch of tiles).
    weights
        One of:

        - torch sparse (n, H·W) from :func:`to_torch_sparse` (or a scipy sparse matrix,
          converted here): the **same** spots for every item -> (B, n, C), or (n, C) for a
          3-D map;
        - :class:`BatchWeights` from :func:`batch_weights`: each item its **own** spots ->
          (N, C) with rows in item order (``weights.item_index`` says which item).

    Returns
    -------
    torch.Tensor
        Region sums in the map's dtype and device. Gradients flow to ``map_bchw``
        (d out[k, c] / d map[c, i, j] = fraction of pixel (i, j) covered by spot k).
    """
    import torch

    if isinstance(weights, BatchWeights):
        return _aggregate_batched(map_bchw, weights)
    if sp.issparse(weights):
        weights = to_torch_sparse(weights)
    squeeze = map_bchw.dim() == 3
    maps = map_bchw.unsqueeze(0) if squeeze else map_bchw
    if maps.dim() != 4 or weights.shape[1] != maps.shape[2] * maps.shape[3]:
        msg = f"map {tuple(map_bchw.shape)} and weights {tuple(weights.shape)} do not match: pass (B, C, H, W) and (n, H*W)."
        raise StmapInputError(msg)
    b, c, h, w = maps.shape
    mat = weights.to(device=maps.device, dtype=maps.dtype)
    dense = maps.reshape(b * c, h * w).transpose(0, 1)  # (H·W, B·C)
    out = torch.sparse.mm(mat, dense).reshape(-1, b, c).permute(1, 0, 2)  # (B, n, C)
    return out[0] if squeeze else out


def _aggregate_batched(maps: torch.Tensor, weights: BatchWeights) -> torch.Tensor:
    import torch

    b, c, h, w = maps.shape
    if (h, w) != tuple(weights.shape_hw) or b != len(weights.counts):
        msg = f"map {tuple(maps.shape)} does not match BatchWeights of {len(weights.counts)} items of {weights.shape_hw}: rebuild them with batch_weights."
        raise StmapInputError(msg)
    dense = maps.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B·H·W, C)
    mat = weights.matrix.to(device=maps.device, dtype=maps.dtype)
    return torch.sparse.mm(mat, dense)


# ----------------------------------------------------------------------------- bins & norms
def sum_bins(
    values: np.ndarray | sp.spmatrix | sp.sparray,
    centers_yx: np.ndarray,
    *,
    bin_px: float,
    target_px: float,
    origin_yx: tuple[float, float] | None = None,
    index_yx: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix, np.ndarray]:
    """Sum square bins into coarser square bins (e.g. 2 µm -> 8 µm: 4 × 4 blocks).

    Parameters
    ----------
    values
        (n, C) dense values or sparse counts, one row per fine bin.
    centers_yx
        (n, 2) level-0 px centres of the fine bins.
    bin_px, target_px
        Fine and coarse bin sides in level-0 px; ``target_px / bin_px`` must be an integer f.
    origin_yx
        Level-0 px top-left corner of fine bin (0, 0) of the lattice. Default: half a bin
        above/left of the smallest centre in y and in x.
    index_yx
        Optional (n, 2) integer lattice indices (e.g. Visium HD ``array_row, array_col``);
        when given, groups are ``index // f`` and centres are only used to place the result
        (robust to a lattice slightly rotated against the image).

    Returns
    -------
    new_centers_yx, summed, group
        (m, 2) level-0 px centres of the coarse bins (the block centres, or the mean of member
        centres when ``index_yx`` is given), (m, C) sums (sparse in -> CSR out), and (n,) the
        coarse bin of every fine bin. Partial blocks are summed over the bins present.
    """
    centers = np.asarray(centers_yx, dtype=float).reshape(-1, 2)
    values = values if sp.issparse(values) else np.asarray(values)
    factor = _block_factor(bin_px, target_px)
    if values.shape[0] != len(centers):
        msg = f"values have {values.shape[0]} rows but centers_yx has {len(centers)}: pass one row per bin."
        raise StmapInputError(msg)
    if index_yx is not None:
        block = np.floor_divide(np.asarray(index_yx, dtype=np.int64).reshape(-1, 2), factor)
    else:
        origin = centers.min(axis=0) - bin_px / 2 if origin_yx is None else np.asarray(origin_yx)
        fine = np.floor((centers - origin) / bin_px + 1e-6).astype(np.int64)
        block = np.floor_divide(fine, factor)
    keys, group = np.unique(block, axis=0, return_inverse=True)
    group = group.ravel()
    member = sp.csr_matrix(
        (np.ones(len(group)), (group, np.arange(len(group)))), shape=(len(keys), len(group))
    )
    summed = member @ values
    summed = sp.csr_matrix(summed) if sp.issparse(values) else np.asarray(summed)
    if index_yx is not None:
        new_centers = (member @ centers) / np.bincount(group)[:, None]
    else:
        new_centers = origin + (keys + 0.5) * factor * bin_px
    return new_centers, summed, group


def _block_factor(bin_px: float, target_px: float) -> int:
    ratio = float(target_px) / float(bin_px)
    factor = round(ratio)
    if not (bin_px > 0 and factor >= 1 and abs(ratio - factor) < 1e-6 * ratio):
        msg = f"target_px={target_px} is not a whole multiple of bin_px={bin_px}: pass e.g. 8 µm for 2 µm bins."
        raise StmapInputError(msg)
    return factor
