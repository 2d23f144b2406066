"""``.h5ad`` spots in the scanpy / squidpy spatial convention (``obsm['spatial']`` is (x, y))."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ...errors import StmapInputError
from ._checks import check_finite, check_scalefactor_images, require_exists, warn_input
from ._container import Spots
from ._spaceranger import counts_dtype, physical_scale

logger = logging.getLogger(__name__)


def _image_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(y, x[, c]) image of any dtype → (y, x, 3) RGB uint8 (floats assumed in [0, 1])."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _h5ad_library(adata: Any, path: Path, library_id: str | None) -> tuple[str, dict]:
    """The library (id, ``uns['spatial'][id]``) to read; ``(stem, {})`` when absent."""
    libs = adata.uns.get("spatial", {}) if hasattr(adata.uns, "get") else {}
    if library_id is not None:
        if library_id not in libs:
            msg = (
                f"{path}: no library {library_id!r} in uns['spatial'] (have {sorted(libs)}); pass "
                "one of them"
            )
            raise StmapInputError(msg)
        return library_id, dict(libs[library_id])
    if len(libs) > 1:
        msg = (
            f"{path}: {len(libs)} libraries in uns['spatial'] ({sorted(libs)}); pass library_id= "
            "one of them"
        )
        raise StmapInputError(msg)
    if not libs:
        logger.warning("%s: no uns['spatial'] (scale factors, images)", path)
        return path.stem, {}
    lib = next(iter(libs))
    return str(lib), dict(libs[lib])


def _h5ad_counts(adata: Any, path: Path) -> sp.csr_matrix:
    """Raw counts: ``layers['counts']`` when present, else ``X``; warns when not integer."""
    source = "layers['counts']" if "counts" in adata.layers else "X"
    matrix = adata.layers["counts"] if source != "X" else adata.X
    if matrix is None:
        msg = f"{path}: no X and no layers['counts']; the file holds no expression"
        raise StmapInputError(msg)
    counts = counts_dtype(sp.csr_matrix(matrix))
    data = counts.data
    if data.size and (data.min() < 0 or not np.allclose(data, np.round(data))):
        msg = (
            f"{path}: {source} holds non-integer or negative values (normalised?); put raw counts "
            "in layers['counts']"
        )
        warn_input(msg)
    return counts


def _h5ad_genes(adata: Any) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, ids) from var_names and ``var['gene_ids']`` (or a symbol column)."""
    names = np.asarray(adata.var_names, dtype=str)
    var = adata.var
    ids = var["gene_ids"].to_numpy(str) if "gene_ids" in var else names
    for column in ("gene_symbols", "gene_symbol", "feature_name", "SYMBOL"):
        if column in var and "gene_ids" not in var:
            return var[column].to_numpy(str), names
    return names, ids


def _h5ad_obs_arrays(adata: Any, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``in_tissue`` (all True when absent) and ``array_rc`` (None when absent) from obs."""
    obs = adata.obs
    in_tissue = obs["in_tissue"].to_numpy().astype(bool) if "in_tissue" in obs else np.ones(n, bool)
    array_rc = None
    if "array_row" in obs and "array_col" in obs:
        array_rc = obs[["array_row", "array_col"]].to_numpy(np.int64)
    return in_tissue, array_rc


def read_spots_h5ad(path: str | Path, *, library_id: str | None = None) -> Spots:
    """Read spots from an ``.h5ad`` in the scanpy / squidpy spatial convention.

    Parameters
    ----------
    path : str or Path
        ``.h5ad`` with ``obsm['spatial']`` = (x, y) full-resolution px per spot and, ideally,
        ``uns['spatial'][library]['scalefactors']`` (+ ``['images']``). Counts come from
        ``layers['counts']`` if present, else ``X``.
    library_id : str, optional
        Library in ``uns['spatial']`` (needed when there are several).

    Returns
    -------
    Spots
        Squares when ``bin_size_um`` < 55 (HD bins), else disks (55 µm Visium when no
        ``bin_size_um``; 100 µm at 200 µm pitch for legacy ST). ``mpp`` from
        ``microns_per_pixel``, else ``65 / spot_diameter_fullres`` (Visium) or
        ``bin_size_um / spot_diameter_fullres``; None (with a warning) if neither is given.
    """
    p = require_exists(path)
    import anndata

    try:
        adata = anndata.read_h5ad(p)
    except Exception as err:  # h5py / anndata raise many types
        msg = f"{p}: cannot read as .h5ad ({err}); expected an AnnData file"
        raise StmapInputError(msg) from err
    if "spatial" not in adata.obsm:
        msg = (
            f"{p}: no obsm['spatial'] (have {list(adata.obsm)}); expected (x, y) full-resolution "
            "px per spot as scanpy/squidpy write it"
        )
        raise StmapInputError(msg)
    lib, entry = _h5ad_library(adata, p, library_id)
    if "library_id" in adata.obs and library_id is not None:
        adata = adata[adata.obs["library_id"].astype(str) == lib]
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    yx = xy[:, ::-1].copy()  # obsm['spatial'] is (x, y): the one swap
    check_finite(yx, p)
    sf = dict(entry.get("scalefactors", {}))
    genes, gene_ids = _h5ad_genes(adata)
    in_tissue, array_rc = _h5ad_obs_arrays(adata, len(yx))
    images = {str(k): _image_rgb_uint8(v) for k, v in dict(entry.get("images", {})).items()}
    spots = Spots(
        centers_yx=yx,
        counts=_h5ad_counts(adata, p),
        genes=genes,
        gene_ids=gene_ids,
        barcodes=np.asarray(adata.obs_names, dtype=str),
        in_tissue=in_tissue,
        array_rc=array_rc,
        library_id=lib,
        scalefactors=sf,
        images=images,
        source=p,
        **physical_scale(sf, kind="auto", source=p),
    )
    check_scalefactor_images(spots)
    logger.info("read %r from %s", spots, p)
    return spots


def h5ad_has_spatial(path: Path) -> bool:
    """True when the HDF5 file has ``obsm/spatial`` (read without loading anything)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "obsm" in f and "spatial" in f["obsm"]
