"""Export predicted regions/spots as AnnData (scanpy/squidpy conventions) and CSV.

Values follow the additive rule: ``X`` holds the predicted counts of each region (sum of the
dense map over the region's footprint), ``obs['total_counts']`` the predicted all-transcript
total, and ``layers['lognorm']`` = log1p(1e4 · X / total), computed after summing.
Coordinates: ``obsm['spatial']`` is (x, y) in full-resolution (level-0) px — the one place
besides the readers where (y, x) is swapped. Files are written atomically and never replace an
existing file unless ``overwrite=True``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import StmapInputError

logger = logging.getLogger(__name__)

__all__ = ["build_anndata", "check_output", "write_anndata", "write_csv", "write_regions"]


def build_anndata(
    counts: np.ndarray,
    total: np.ndarray,
    genes: Sequence[str],
    centers_yx: np.ndarray,
    *,
    mpp: float,
    area_um2: np.ndarray,
    footprint: Sequence[str] | str,
    names: Sequence[str] | None = None,
    library_id: str = "stmap",
    image: np.ndarray | None = None,
    image_scale: float = 1.0,
    uns_meta: dict | None = None,
):
    """Build an AnnData of predicted regions.

    Parameters
    ----------
    counts : (n, G) array
        Predicted expected counts per region and gene (additive rule).
    total : (n,) array
        Predicted all-transcript total per region.
    genes : sequence of str
        Gene names (``var_names``).
    centers_yx : (n, 2) array
        Region centres in level-0 px, (y, x).
    mpp : float
        µm per level-0 px.
    area_um2 : (n,) array
        Region areas in µm².
    footprint : str or sequence of str
        ``"disk"``, ``"square"``, ``"polygon"``, ... per region.
    image : (h, w, 3) uint8, optional
        Thumbnail stored as ``uns['spatial'][library_id]['images']['hires']``.
    image_scale : float
        Thumbnail px per level-0 px (``tissue_hires_scalef``).
    """
    import anndata as ad
    import pandas as pd

    counts = np.asarray(counts, dtype=np.float32)
    total = np.asarray(total, dtype=np.float64).ravel()
    n = counts.shape[0]
    _check_lengths(n, total=total, centers_yx=centers_yx, area_um2=area_um2)
    obs = pd.DataFrame(
        {
            "total_counts": total,
            "area_um2": np.asarray(area_um2, dtype=np.float64),
            "footprint": pd.Categorical(np.broadcast_to(np.asarray(footprint), (n,))),
            "y_px": np.asarray(centers_yx, float)[:, 0],
            "x_px": np.asarray(centers_yx, float)[:, 1],
        },
        index=pd.Index([str(s) for s in (names if names is not None else range(n))], name="region"),
    )
    adata = ad.AnnData(
        X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), name="gene"))
    )
    adata.layers["lognorm"] = _lognorm(counts, total)
    adata.obsm["spatial"] = np.asarray(centers_yx, dtype=np.float64)[:, ::-1].copy()  # (x, y)
    adata.uns["spatial"] = {library_id: _spatial_uns(adata, mpp, image, image_scale, uns_meta)}
    return adata


def _lognorm(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log1p(1e4 * counts / total[:, None])
    out[~(total > 0)] = np.nan
    return out.astype(np.float32)


def _spatial_uns(adata, mpp: float, image, image_scale: float, meta: dict | None) -> dict:
    area_px = adata.obs["area_um2"].to_numpy() / mpp**2
    diameter_px = float(np.sqrt(4.0 * np.median(area_px) / np.pi)) if len(area_px) else 0.0
    entry = {
        "scalefactors": {
            "spot_diameter_fullres": diameter_px,
            "tissue_hires_scalef": float(image_scale),
            "microns_per_pixel": float(mpp),
        },
        "images": {},
        "metadata": {
            k: (v if isinstance(v, (str, int, float)) else str(v)) for k, v in (meta or {}).items()
        },
    }
    if image is not None:
        entry["images"]["hires"] = np.ascontiguousarray(image)
    return entry


def _check_lengths(n: int, **arrays) -> None:
    for name, arr in arrays.items():
        if len(arr) != n:
            msg = f"{name} has {len(arr)} rows but counts has {n}; pass one row per region"
            raise ValueError(msg)


def write_anndata(adata, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adata`` to ``path`` (.h5ad) atomically; refuse to replace a file unless asked."""
    path = check_output(path, (".h5ad",), overwrite)
    with _atomic(path) as tmp:
        adata.write_h5ad(tmp)
    logger.info("wrote %s (%d regions × %d genes)", path, adata.n_obs, adata.n_vars)
    return path


def write_csv(
    adata, path: str | Path, *, overwrite: bool = False, layer: str | None = None
) -> Path:
    """Write one row per region: id, x/y px, area, total, then one column per gene.

    ``layer=None`` writes predicted counts; ``layer="lognorm"`` the normalised expression.
    """
    import pandas as pd

    path = check_output(path, (".csv",), overwrite)
    values = adata.X if layer is None else adata.layers[layer]
    table = pd.concat(
        [
            adata.obs[["x_px", "y_px", "area_um2", "footprint", "total_counts"]],
            pd.DataFrame(np.asarray(values), index=adata.obs_names, columns=adata.var_names),
        ],
        axis=1,
    )
    with _atomic(path) as tmp:
        table.to_csv(tmp, index_label="region")
    return path


def write_regions(adata, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write by extension: ``.h5ad`` (AnnData) or ``.csv``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return write_csv(adata, path, overwrite=overwrite)
    return write_anndata(adata, path, overwrite=overwrite)


def check_output(path: str | Path, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    """An output path, refused in one line before any work: another type than ``suffixes``,
    an existing file or folder (unless ``overwrite``), or a missing parent folder."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        msg = f"{path}: unsupported output type {path.suffix!r}; use one of {', '.join(suffixes)}"
        raise StmapInputError(msg)
    if path.exists() and not overwrite:
        msg = f"{path} already exists; choose another name or pass --overwrite to replace it"
        raise StmapInputError(msg)
    if not path.parent.is_dir():
        msg = f"{path}: folder {path.parent} does not exist; create it first"
        raise StmapInputError(msg)
    return path


class _atomic:
    """Write to a temporary file beside ``path``, then rename it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=self.path.suffix, dir=self.path.parent
        )
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
