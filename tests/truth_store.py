"""A prediction store that holds the synthetic truth: known-truth tests of what reads stores.

:func:`write_truth_store` makes a real store for a real model file (so ``stmap`` commands and
the viewer's predictor open it as theirs) whose map is the synthetic sample's expected counts
(:func:`~napari_stmap.core.synthetic.truth_density`) instead of the model's output: the head
is the identity on the first G + 1 embedding channels and each tile's embedding is
``softplus⁻¹`` of the truth, so ``softplus(w·e + b)`` gives the truth back (float32 store).
Tiles off tissue are skipped as a prediction would skip them. The model must have G + 1 <=
its embedding width (``pixnet_tiny``: 16, so at most 15 genes: ``make_model_file(15)``).

:func:`truth_regions` draws regions from the truth: the outline of the largest patch where
a cell type's smoothed abundance passes a level (level-0 px), e.g. tumour nests or stroma.
:func:`write_cells` writes a ``cells.h5ad`` as the cells contract describes it (disks summed
from a store), for code that reads cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_stmap.core.geometry import Polygon, Region
from napari_stmap.core.io.slide import open_slide
from napari_stmap.core.model import load_model
from napari_stmap.core.predict.predictor import tissue_grid
from napari_stmap.core.store import open_store
from napari_stmap.core.synthetic import CELL_TYPES, TRUTH_GRID_UM, truth_density
from napari_stmap.core.tiling import plan_tiles


def _inverse_softplus(d: np.ndarray) -> np.ndarray:
    d = np.maximum(np.asarray(d, dtype=np.float64), 1e-30)
    return (d + np.log(-np.expm1(-d))).astype(np.float32)  # log(expm1(d)), stable


def write_truth_store(sample, model_path: Path, store_path: Path) -> Path:
    """A store of ``model_path``'s model on ``sample``'s slide holding the truth (see module)."""
    import zarr

    model = load_model(model_path)
    slide = open_slide(sample.slide)
    spec = plan_tiles(slide, model)
    store = open_store(store_path, model, slide, spec, "w", dtype="float32", model_path=model_path)
    g1, d = model.num_outputs, store.embed_dim
    assert g1 <= d, f"{g1} outputs do not fit an embedding of {d} channels"
    group = zarr.open_group(str(store_path), mode="r+")
    group["head_weight"][...] = np.eye(g1, d, dtype=np.float32)
    group["head_bias"][...] = np.zeros(g1, dtype=np.float32)
    store = open_store(store_path, mode="r+")
    on_tissue = tissue_grid(slide, spec, True)
    grid = spec.grid
    for tile in spec.tiles():
        if not on_tissue[tile]:
            store.mark_skipped([tile])
            continue
        rows, cols = spec.output_slices(tile)
        oy, ox, p = grid.origin_yx[0], grid.origin_yx[1], grid.pixel_px
        box = (oy + rows.start * p, ox + cols.start * p, oy + rows.stop * p, ox + cols.stop * p)
        dens = truth_density(sample, bbox_yx=box, genes=list(model.genes), grid_um=p * slide.mpp)
        emb = np.zeros((d, *dens.shape[1:]), dtype=np.float32)
        emb[:g1] = _inverse_softplus(dens)
        store.write_tile(tile, emb)
    return store_path


def truth_regions(sample, cell_type: str, level: float, *, smooth_um: float = 8.0) -> Region:
    """The largest patch where ``cell_type``'s abundance (smoothed) exceeds ``level``.

    A :class:`~napari_stmap.core.geometry.Region` named after the cell type, level-0 px.
    """
    import zarr
    from scipy import ndimage
    from skimage.measure import find_contours

    group = zarr.open_group(str(sample.truth), mode="r")
    k = CELL_TYPES.index(cell_type)
    abundance = np.asarray(group["abundance"][k], dtype=np.float64)
    smooth = ndimage.gaussian_filter(abundance, smooth_um / TRUTH_GRID_UM)
    contours = find_contours(np.pad(smooth, 1), level)
    best = max(contours, key=lambda c: _area(c))
    yx_px = (best - 1 + 0.5) * TRUTH_GRID_UM / sample.mpp  # truth cell centres, level-0 px
    return Region(cell_type, [(Polygon(yx_px[:-1]), 1.0)])


def _area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def write_cells(path, source, slide, tissue, *, slide_name: str | None = None):
    """A cells.h5ad as the cells contract describes it: 8 µm disks on a jittered lattice."""
    import anndata as ad
    import pandas as pd

    from napari_stmap.core.geometry import disks

    rng = np.random.default_rng(0)
    step = 12.0 / slide.mpp
    yy, xx = np.mgrid[step / 2 : slide.shape_yx[0] : step, step / 2 : slide.shape_yx[1] : step]
    c = np.stack([yy.ravel(), xx.ravel()], 1) + rng.uniform(-2, 2, (yy.size, 2))
    h, w = tissue.mask.shape
    on = tissue.mask[
        np.minimum((c[:, 0] // tissue.px_yx[0]).astype(int), h - 1),
        np.minimum((c[:, 1] // tissue.px_yx[1]).astype(int), w - 1),
    ]
    c = c[on]
    counts = source.region_sums(disks(c, 8.0 / slide.mpp))
    ids = np.arange(1, len(c) + 1)
    obs = pd.DataFrame(
        {
            "cell_id": ids,
            "area_um2": np.pi * 16.0,
            "centroid_x": c[:, 1],
            "centroid_y": c[:, 0],
            "total_counts": counts[:, -1],
        },
        index=[str(i) for i in ids],
    )
    adata = ad.AnnData(
        counts[:, :-1].astype(np.float32), obs=obs, var=pd.DataFrame(index=source.genes)
    )
    adata.obsm["spatial"] = c[:, ::-1].copy()
    adata.uns["stmap"] = {"slide": slide_name or str(slide.path), "mpp": slide.mpp}
    adata.write_h5ad(path)
    return path
