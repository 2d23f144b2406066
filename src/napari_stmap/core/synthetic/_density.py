"""Expected counts from the truth: :func:`truth_density`, integrated exactly over any grid.

Output cells are overlap-weighted sums of 2 µm truth cells (sparse overlap matrices along y and
x), so values are additive: the same counts whatever the grid they are summed on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from napari_stmap.core.errors import StmapInputError

from ._fields import TRUTH_GRID_UM
from ._sample import SyntheticSample, load_synthetic
from ._truth import _TRUTH_CHUNK, _components, _read_truth


def truth_density(
    sample_or_root: SyntheticSample | str | Path,
    *,
    bbox_yx: Sequence[float] | None = None,
    genes: Sequence[str] | None = None,
    grid_um: float = 2.0,
) -> np.ndarray:
    """Expected counts (reference depth) per grid cell, integrated exactly over each cell.

    Parameters
    ----------
    sample_or_root : SyntheticSample or path
        The sample.
    bbox_yx : (y0, x0, y1, x1), optional
        Region in level-0 pixels of the slide; default the whole slide.
    genes : sequence of str, optional
        Genes to return (default all, in sample order).
    grid_um : float
        Side of the output cells in µm (normally a multiple of 2 µm). Cells start at the bbox's
        top-left corner; a last partial row or column covers only the part inside the bbox.

    Returns
    -------
    numpy.ndarray
        float32, shape (C, H, W): the requested genes and a last channel "total" = the sum over
        all genes of the sample. Values are expected UMI counts (not per µm²), additive over
        cells. Multiply by the sample's ``depth`` to compare with its counts.
    """
    import zarr

    sample = (
        sample_or_root
        if isinstance(sample_or_root, SyntheticSample)
        else load_synthetic(sample_or_root)
    )
    group = zarr.open_group(sample.truth, mode="r")
    profiles = np.asarray(group["profiles"][:], dtype=np.float64)
    matrix = np.vstack([profiles[_gene_index(sample, genes)], profiles.sum(axis=0)])
    box_um = _bbox_um(sample, group, bbox_yx)
    if not grid_um > 0:
        msg = f"grid_um must be > 0 µm, got {grid_um}"
        raise StmapInputError(msg)
    wy = _overlap_matrix(box_um[0], box_um[2], grid_um, group["tissue"].shape[0])
    wx = _overlap_matrix(box_um[1], box_um[3], grid_um, group["tissue"].shape[1])
    return _integrate(group, matrix.astype(np.float32), wy, wx)


def _gene_index(sample: SyntheticSample, genes: Sequence[str] | None) -> np.ndarray:
    """Indices of the requested genes in the sample (all when None)."""
    if genes is None:
        return np.arange(len(sample.genes))
    lookup = {g: i for i, g in enumerate(sample.genes)}
    missing = [g for g in genes if g not in lookup]
    if missing:
        msg = f"genes {missing[:5]} are not in the synthetic sample {sample.root}; it has e.g. {list(sample.genes[:5])}"
        raise StmapInputError(msg)
    return np.array([lookup[g] for g in genes], dtype=np.int64)


def _bbox_um(
    sample: SyntheticSample, group: Any, bbox_yx: Sequence[float] | None
) -> tuple[float, ...]:
    """The level-0 pixel bbox (default: whole slide) converted to µm."""
    height, width = group.attrs["shape_px"]
    box = (
        (0.0, 0.0, float(height), float(width))
        if bbox_yx is None
        else tuple(float(v) for v in bbox_yx)
    )
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        msg = f"bbox_yx must be (y0, x0, y1, x1) level-0 px with y1 > y0 and x1 > x0, got {bbox_yx}"
        raise StmapInputError(msg)
    return tuple(v * sample.mpp for v in box)


def _overlap_matrix(start: float, stop: float, grid_um: float, n_cells: int):
    """Sparse (n_out, n_cells) overlap in µm between output cells from ``start`` µm and truth cells."""
    n_out = max(1, math.ceil((stop - start) / grid_um - 1e-9))
    edges = start + grid_um * np.arange(n_out + 1)
    edges[-1] = stop
    span = math.ceil(grid_um / TRUTH_GRID_UM) + 1
    first = np.floor(edges[:-1] / TRUTH_GRID_UM).astype(np.int64)
    cells = first[:, None] + np.arange(span)[None, :]
    lo = np.maximum(edges[:-1, None], cells * TRUTH_GRID_UM)
    hi = np.minimum(edges[1:, None], (cells + 1) * TRUTH_GRID_UM)
    weight = np.clip(hi - lo, 0.0, None)
    ok = (weight > 0) & (cells >= 0) & (cells < n_cells)
    rows = np.broadcast_to(np.arange(n_out)[:, None], cells.shape)
    return sparse.csr_matrix((weight[ok], (rows[ok], cells[ok])), shape=(n_out, n_cells))


def _integrate(group: Any, matrix: np.ndarray, wy: Any, wx: Any) -> np.ndarray:
    """Sum component maps over output cells (overlap-weighted), then apply the gene matrix."""
    used_rows, used_cols = np.unique(wy.indices), np.unique(wx.indices)
    n_comp = matrix.shape[1]
    agg = np.zeros((n_comp, wy.shape[0], wx.shape[0]), dtype=np.float64)
    if len(used_rows) and len(used_cols):
        c0, c1 = int(used_cols[0]), int(used_cols[-1]) + 1
        wx_cols = wx[:, c0:c1].tocsr()  # (n_out_x, cols)
        for r0 in range(int(used_rows[0]), int(used_rows[-1]) + 1, _TRUTH_CHUNK):
            r1 = min(r0 + _TRUTH_CHUNK, int(used_rows[-1]) + 1)
            comps = _components(group.attrs, *_read_truth(group, r0, r1, c0, c1))
            wy_band = wy[:, r0:r1]
            for k in range(n_comp):
                agg[k] += wy_band @ (wx_cols @ comps[k].astype(np.float64).T).T
    out = matrix.astype(np.float64) @ agg.reshape(n_comp, -1)
    return out.reshape(len(matrix), wy.shape[0], wx.shape[0]).astype(np.float32)
