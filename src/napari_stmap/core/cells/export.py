"""Cells to files: ``cells.h5ad`` (AnnData cells × genes) and ``cells.geojson`` (outlines).

Layout (the contract the contrast and SpatialData code rely on):

- ``X``: predicted expected counts, float32, additive (the map summed over each cell's mask);
  ``obs_names`` = ``str(cell_id)``; ``obs``: ``cell_id`` (the label value), ``area_um2``,
  ``centroid_x``, ``centroid_y`` (level-0 px), ``total_counts``; ``obsm['spatial']`` = (x, y)
  level-0 px; ``layers['lognorm']`` = log1p(1e4 · X / total); ``uns['spatial']`` as the spot
  export (:func:`~napari_stmap.core.export.build_anndata`); ``uns['stmap']`` the provenance
  (store, slide, µm/px, cell source, expand_um, ...).
- ``cells.geojson`` beside it (same stem): a FeatureCollection of outlines, ``[x, y]`` level-0
  px, ``"objectType": "detection"`` (QuPath), ``properties.cell_id`` = ``obs['cell_id']``.

:class:`CellWriter` writes both while cells arrive, batch by batch: counts go to an HDF5
dataset and features to the GeoJSON file as they come, so memory does not grow with the number
of cells times genes. Both files are written beside the targets and renamed into place at the
end; an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StmapInputError
from ..export import build_anndata, check_output
from .measure import CellBatch, CellTable

__all__ = [
    "CellWriter",
    "build_cells_anndata",
    "cell_features",
    "geojson_path",
    "write_cells",
]

logger = logging.getLogger(__name__)


def geojson_path(h5ad: str | Path) -> Path:
    """The outlines file that goes with ``h5ad``: same folder and stem, ``.geojson``."""
    return Path(h5ad).with_suffix(".geojson")


def check_targets(path: str | Path, *, overwrite: bool) -> tuple[Path, Path]:
    """``(cells.h5ad, cells.geojson)``, refused before any work if either exists (no overwrite)."""
    h5ad = check_output(path, (".h5ad",), overwrite)
    geo = geojson_path(h5ad)
    if geo.exists() and not overwrite:
        msg = f"{geo} already exists; choose another --out or pass --overwrite to replace it"
        raise StmapInputError(msg)
    return h5ad, geo


def _obs_frame(ids, area_px, centroid_yx, total, mpp: float):
    import pandas as pd

    ids = np.asarray(ids, dtype=np.int64)
    c = np.asarray(centroid_yx, dtype=np.float64).reshape(-1, 2)
    return pd.DataFrame(
        {
            "cell_id": ids,
            "area_um2": np.asarray(area_px, dtype=np.float64) * mpp**2,
            "centroid_x": c[:, 1],
            "centroid_y": c[:, 0],
            "total_counts": np.asarray(total, dtype=np.float64),
        },
        index=pd.Index([str(i) for i in ids], name="cell"),
    )


def build_cells_anndata(
    table: CellTable,
    genes: Sequence[str],
    *,
    mpp: float,
    provenance: dict,
    library_id: str = "stmap",
    image: np.ndarray | None = None,
    image_scale: float = 1.0,
    with_x: bool = True,
):
    """AnnData of cells × genes (see the module notes for the layout).

    ``table.counts`` holds genes then total; ``with_x=False`` builds everything but ``X`` and
    ``layers`` (the streaming writer adds those to the file), and needs only the total (the
    last column of ``table.counts``).
    """
    g = len(genes)
    counts = table.counts if table.counts is not None else np.zeros((table.n, g + 1))
    total = counts[:, -1]
    base = build_anndata(
        counts[:, :g] if with_x else np.zeros((table.n, 0), np.float32),
        total,
        list(genes) if with_x else [],
        table.centroid_yx,
        mpp=mpp,
        area_um2=table.area_px * mpp**2,
        footprint="cell",
        names=[str(i) for i in table.ids],
        library_id=library_id,
        image=image,
        image_scale=image_scale,
        uns_meta={k: v for k, v in provenance.items() if k in ("store", "slide", "source")},
    )
    import anndata as ad
    import pandas as pd

    obs = _obs_frame(table.ids, table.area_px, table.centroid_yx, total, mpp)
    var = pd.DataFrame(index=pd.Index(list(genes), name="gene"))
    adata = ad.AnnData(
        X=base.X if with_x else None,
        obs=obs,
        var=var,
        obsm={"spatial": base.obsm["spatial"]},
        uns={"spatial": base.uns["spatial"], "stmap": _plain(provenance)},
    )
    if with_x:
        adata.layers["lognorm"] = base.layers["lognorm"]
    return adata


def _plain(meta: dict) -> dict:
    """Provenance with values h5ad can store (None -> "", paths -> str)."""
    out = {}
    for k, v in meta.items():
        if v is None:
            out[k] = ""
        elif isinstance(v, dict):
            out[k] = _plain(v)
        elif isinstance(v, (str, int, float, bool, np.integer, np.floating)):
            out[k] = v
        else:
            out[k] = str(v)
    return out


def cell_features(batch: CellBatch) -> list[dict[str, Any]]:
    """GeoJSON features (QuPath detections, ``[x, y]`` level-0 px) of a batch's outlines."""
    feats = []
    for cid, parts in zip(batch.ids.tolist(), batch.outlines, strict=True):
        polys = [[_ring_xy(r) for r in part] for part in parts]
        if not polys:
            continue
        geom = (
            {"type": "Polygon", "coordinates": polys[0]}
            if len(polys) == 1
            else {"type": "MultiPolygon", "coordinates": polys}
        )
        props = {"objectType": "detection", "cell_id": int(cid), "name": f"cell {cid}"}
        feats.append({"type": "Feature", "geometry": geom, "properties": props})
    return feats


def _ring_xy(ring: np.ndarray) -> list[list[float]]:
    xy = np.round(np.asarray(ring, dtype=np.float64)[:, ::-1], 3)
    return np.vstack([xy, xy[:1]]).tolist()


def write_cells(
    table: CellTable,
    path: str | Path,
    genes: Sequence[str],
    *,
    mpp: float,
    provenance: dict,
    overwrite: bool = False,
    **anndata_options: Any,
) -> tuple[Path, Path]:
    """Write an in-memory :class:`CellTable` as ``cells.h5ad`` + ``cells.geojson``."""
    h5ad, _ = check_targets(path, overwrite=overwrite)
    with CellWriter(
        h5ad, genes, mpp=mpp, provenance=provenance, overwrite=overwrite, **anndata_options
    ) as writer:
        writer.add(table)
    return writer.paths


class CellWriter:
    """Write cells batch by batch: counts to HDF5, outlines to GeoJSON, obs kept (small).

    Use as a context manager: :meth:`add` each batch; on a clean exit the ``.h5ad`` (with
    ``X``, ``layers['lognorm']``, ``obs``, ``obsm['spatial']``, ``uns``) and the ``.geojson``
    are renamed into place; on an error both temporary files are removed.

    Parameters
    ----------
    path
        The ``.h5ad`` target (the ``.geojson`` goes beside it).
    genes, mpp, provenance
        Gene names (``var_names``), µm per level-0 px, ``uns['stmap']``.
    anndata_options
        ``library_id``, ``image``, ``image_scale`` (as :func:`build_cells_anndata`).
    """

    def __init__(
        self,
        path: str | Path,
        genes: Sequence[str],
        *,
        mpp: float,
        provenance: dict,
        overwrite: bool = False,
        **anndata_options: Any,
    ) -> None:
        self.h5ad, self.geojson = check_targets(path, overwrite=overwrite)
        self.genes, self.mpp, self.provenance = list(genes), float(mpp), provenance
        self.options = anndata_options
        self.n = 0
        self._ids, self._area, self._centroid, self._total = [], [], [], []

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.h5ad, self.geojson

    def __enter__(self) -> CellWriter:
        import h5py

        self._tmp_h5 = _temp_beside(self.h5ad)
        self._tmp_geo = _temp_beside(self.geojson)
        self._h5 = h5py.File(self._tmp_h5, "w")
        g = len(self.genes)
        chunks = (max(1, min(1024, 2**20 // max(g, 1))), max(g, 1))
        opts = {"maxshape": (None, g), "chunks": chunks, "dtype": "float32"}
        self._x = self._h5.create_dataset("X", shape=(0, g), **opts)
        self._ln = self._h5.create_dataset("lognorm", shape=(0, g), **opts)
        self._geo = self._tmp_geo.open("w", encoding="utf-8")
        self._geo.write('{"type": "FeatureCollection", "features": [\n')
        self._first = True
        return self

    def add(self, batch: CellBatch) -> None:
        """Append a batch of cells (its ``counts``: genes then total)."""
        if batch.n == 0:
            return
        g = len(self.genes)
        counts = batch.counts if batch.counts is not None else np.zeros((batch.n, g + 1))
        x = counts[:, :g].astype(np.float32)
        total = np.array(counts[:, g], dtype=np.float64)  # a copy: a view would keep counts
        with np.errstate(divide="ignore", invalid="ignore"):
            ln = np.log1p(1e4 * counts[:, :g] / total[:, None])
        ln[~(total > 0)] = np.nan
        for ds, block in ((self._x, x), (self._ln, ln.astype(np.float32))):
            ds.resize(self.n + batch.n, axis=0)
            ds[self.n :] = block
        self.n += batch.n
        self._ids.append(batch.ids)
        self._area.append(batch.area_px)
        self._centroid.append(batch.centroid_yx)
        self._total.append(total)
        for feat in cell_features(batch):
            self._geo.write(("" if self._first else ",\n") + json.dumps(feat))
            self._first = False

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._geo.write("\n]}\n")
            self._geo.close()
            self._h5.close()
            if exc_type is None:
                self._finish()
        finally:
            if exc_type is not None or not self.h5ad.exists():
                self._tmp_h5.unlink(missing_ok=True)
            if exc_type is not None:
                self._tmp_geo.unlink(missing_ok=True)

    def _finish(self) -> None:
        """Write obs, var, obsm and uns with anndata, then move X and lognorm in."""
        import h5py

        table = CellTable(
            ids=_cat(self._ids, (0,), np.int64),
            counts=_cat(self._total, (0,), float)[:, None],  # the total only: no n × G array
            area_px=_cat(self._area, (0,), float),
            centroid_yx=_cat(self._centroid, (0, 2), float),
        )
        adata = build_cells_anndata(
            table,
            self.genes,
            mpp=self.mpp,
            provenance=self.provenance,
            with_x=False,
            **self.options,
        )
        final = _temp_beside(self.h5ad)
        try:
            adata.write_h5ad(final)
            with h5py.File(final, "r+") as out, h5py.File(self._tmp_h5, "r") as src:
                _copy_rows(src["X"], out, "X")
                _copy_rows(src["lognorm"], out["layers"], "lognorm")
            os.replace(final, self.h5ad)
            os.replace(self._tmp_geo, self.geojson)
        finally:
            final.unlink(missing_ok=True)
            self._tmp_h5.unlink(missing_ok=True)
        logger.info("wrote %s and %s (%d cells)", self.h5ad, self.geojson, self.n)


def _copy_rows(src, group, name: str, rows: int = 8192) -> None:
    """Copy an (n, G) HDF5 dataset into ``group[name]`` block by block (memory: one block)."""
    n, g = src.shape
    chunks = (min(src.chunks[0], n), max(g, 1)) if n and g else None
    dst = group.create_dataset(name, shape=src.shape, dtype=src.dtype, chunks=chunks)
    for start in range(0, src.shape[0], rows):
        dst[start : start + rows] = src[start : start + rows]
    dst.attrs["encoding-type"] = "array"
    dst.attrs["encoding-version"] = "0.2.0"


def _cat(parts: list, empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=dtype)


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)
