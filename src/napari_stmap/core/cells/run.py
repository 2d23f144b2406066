"""One call from a prediction store and some cells to ``cells.h5ad`` + ``cells.geojson``.

:func:`open_cells` turns what the user has (a label image, GeoJSON polygons, a napari Labels
layer's array, or nothing: the built-in segmentation) into cells; :func:`measure_cells`
measures them against a prediction; :func:`run_cells` is ``stmap cells``: it checks the output,
opens the store (missing tiles are predicted, as ``stmap aggregate`` does; off-tissue tiles
count 0), streams the cells into the files and returns a summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StmapInputError
from .expand import expand_cells
from .export import CellWriter, check_targets
from .labels import LabelSource, labels_from_layer, open_labels
from .measure import CellBatch, iter_cells
from .polygons import PolygonCells, read_cells_geojson
from .segment import NucleusParams, segment_nuclei

__all__ = ["HALO_UM", "measure_cells", "open_cells", "run_cells"]

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], Any] | None

#: Halo read around each measurement tile, µm (cells larger than this are measured alone).
HALO_UM = 40.0
#: Decoded-embedding cache of the store while cells are measured.
STORE_CACHE_BYTES = 96 * 2**20


def open_cells(
    slide: Any,
    *,
    labels: str | Path | None = None,
    geojson: str | Path | None = None,
    layer: tuple[Any, Sequence[float], str] | None = None,
    segment: bool = False,
    expand_um: float = 0.0,
    bbox_yx: Sequence[float] | None = None,
    segment_out: str | Path | None = None,
    params: NucleusParams | None = None,
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
) -> LabelSource | PolygonCells:
    """Cells from exactly one of ``labels``, ``geojson``, ``layer`` or ``segment``.

    Parameters
    ----------
    slide
        The :class:`~napari_stmap.core.io.slide.Slide` the cells are on (size and µm/px).
    labels
        A label image (TIFF / OME-TIFF, zarr, .npy) at the slide's size or a whole-number
        downsample of it.
    geojson
        Cell or nucleus polygons (``[x, y]`` level-0 px, e.g. QuPath detections).
    layer
        ``(data, scale, name)`` of a napari Labels layer (scale in µm per layer px).
    segment
        Run the built-in nucleus segmentation (:mod:`~napari_stmap.core.cells.segment`) over
        ``bbox_yx`` (default the whole slide), into ``segment_out`` (zarr) or memory.
    expand_um
        Grow every cell by this many µm without overlapping its neighbours (0: as given).

    Returns
    -------
    LabelSource or PolygonCells
        Polygons only for GeoJSON without expansion (summed exactly as polygons).
    """
    given = [x is not None for x in (labels, geojson, layer)] + [bool(segment)]
    if sum(given) != 1:
        msg = "give exactly one source of cells: --labels FILE, --geojson FILE or --segment"
        raise StmapInputError(msg)
    if geojson is not None:
        cells = read_cells_geojson(geojson)
        if not expand_um:
            return cells
        base = cells.as_labels(slide.shape_yx)
    elif labels is not None:
        base = open_labels(labels, slide.shape_yx)
    elif layer is not None:
        data, scale, name = layer
        base = labels_from_layer(data, scale, mpp=slide.mpp, slide_hw=slide.shape_yx, name=name)
    else:
        base = segment_nuclei(
            slide, bbox_yx=bbox_yx, out=segment_out, params=params, progress=progress, cancel=cancel
        )
    return expand_cells(base, expand_um, slide.mpp)


def measure_cells(
    cells: LabelSource | PolygonCells,
    source: Any = None,
    *,
    mpp: float,
    bbox_yx: Sequence[float] | None = None,
    outlines: bool = True,
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[CellBatch]:
    """Measure ``cells`` against ``source`` (a StoreSource, or None), batch by batch.

    Label cells go through :func:`~napari_stmap.core.cells.measure.iter_cells` (halo
    :data:`HALO_UM`); polygons through :meth:`PolygonCells.iter_batches` (exact sums).
    ``bbox_yx`` (level-0 px) limits the cells measured to those of a region.
    """
    if isinstance(cells, PolygonCells):
        return cells.iter_batches(source, bbox_yx=bbox_yx, progress=progress)
    halo = int(math.ceil(HALO_UM / (mpp * cells.factor)))
    return iter_cells(
        cells,
        source,
        bbox_yx=bbox_yx,
        halo_px=halo,
        outlines=outlines,
        progress=progress,
        cancel=cancel,
    )


def run_cells(
    pred: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    geojson: str | Path | None = None,
    segment: bool = False,
    expand_um: float = 0.0,
    slide: str | Path | None = None,
    overwrite: bool = False,
    model: str | Path | None = None,
    device: str = "cpu",
    params: NucleusParams | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> dict[str, Any]:
    """``stmap cells``: cells of a slide with their predicted expression, to h5ad + GeoJSON.

    Parameters
    ----------
    pred
        Prediction store (``.zarr``) of a dense model on the slide.
    out
        ``cells.h5ad`` (``cells.geojson`` is written beside it). Refused when either exists,
        unless ``overwrite``.
    labels, geojson, segment, expand_um, params
        The cells (see :func:`open_cells`); the built-in segmentation's labels are kept as
        ``<out stem>.labels.zarr`` (reuse them with ``labels=``).
    slide
        The slide, when the store's recorded path moved (its size must match the store's).
    model, device
        For tiles the store lacks (model: when the store does not record its file).
    progress
        ``progress(stage)`` -> a ``(done, total)`` callback for ``"segment"`` and ``"cells"``.

    Returns
    -------
    dict
        ``h5ad``, ``geojson``, ``n_cells``, ``source``, ``labels`` (kept segmentation or None).
    """
    from ..io.slide import open_slide
    from ..store import open_store

    h5ad, geo = check_targets(out, overwrite=overwrite)
    seg_out = h5ad.with_suffix(".labels.zarr") if segment else None
    if seg_out is not None and seg_out.exists() and not overwrite:
        msg = f"{seg_out} already exists; choose another --out or pass --overwrite to replace it"
        raise StmapInputError(msg)
    # cells visit each store tile about once, in raster order: a cache of a few rows of tiles,
    # not the default 512 MB that a large slide would fill (memory flat in slide size)
    store = open_store(pred, mode="r", cache_bytes=STORE_CACHE_BYTES)
    meta = store.meta["slide"]
    mpp = float(meta["mpp"])
    slide_path = Path(slide) if slide is not None else Path(meta["path"])
    the_slide = _open_checked(open_slide, slide_path, mpp, meta)
    stage = progress or (lambda _name: None)
    cells = open_cells(
        the_slide,
        labels=labels,
        geojson=geojson,
        segment=segment,
        expand_um=expand_um,
        segment_out=seg_out,
        params=params,
        progress=stage("segment"),
    )
    provenance = {
        "store": str(Path(pred).resolve()),
        "slide": str(slide_path.resolve()),
        "mpp": mpp,
        "source": cells.kind,
        "cells_file": str(Path(labels or geojson or seg_out or "").resolve())
        if (labels or geojson or seg_out)
        else "",
        "expand_um": float(expand_um),
        "model": str(store.meta["model"].get("path", "")),
    }
    if segment:
        provenance["segment_threshold"] = float(getattr(cells, "threshold", np.nan))
    thumb = the_slide.thumbnail(2000)
    with _source(store, the_slide, model, device) as source:
        writer = CellWriter(
            h5ad,
            source.genes,
            mpp=mpp,
            provenance=provenance,
            overwrite=overwrite,
            library_id=_stem(slide_path),
            image=thumb,
            image_scale=thumb.shape[0] / the_slide.shape_yx[0],
        )
        with writer:
            for batch in measure_cells(cells, source, mpp=mpp, progress=stage("cells")):
                writer.add(batch)
            if writer.n == 0:
                raise StmapInputError(_no_cells(cells))
    return {
        "h5ad": h5ad,
        "geojson": geo,
        "n_cells": writer.n,
        "source": cells.kind,
        "labels": seg_out,
        "genes": len(source.genes),
    }


def _open_checked(open_slide, path: Path, mpp: float, meta: dict):
    if not path.exists():
        msg = f"{path}: the store's slide is not there; pass --slide SLIDE (the slide it was predicted on)"
        raise StmapInputError(msg)
    s = open_slide(path, mpp=mpp)
    want = tuple(int(v) for v in meta["shape_yx"])
    if tuple(s.shape_yx) != want:
        msg = f"{path} is {s.shape_yx[0]} × {s.shape_yx[1]} px but the store was predicted on a {want[0]} × {want[1]} px slide; pass the slide the store was made from"
        raise StmapInputError(msg)
    return s


@contextlib.contextmanager
def _source(store, slide, model, device):
    """A StoreSource over the store (off-tissue tiles 0); one predictor when tiles are missing."""
    from ..predict import Predictor, StoreSource

    if store.counts()["todo"] == 0:
        yield StoreSource(store, background=0.0)
        return
    model = model if model is not None else store.meta["model"].get("path")
    if not model:
        msg = f"{store.path} has tiles to predict but does not record its model file; pass --model"
        raise StmapInputError(msg)
    path = store.path
    with Predictor(slide, model, path, device=device) as predictor:
        yield StoreSource(predictor, background=0.0)


def _no_cells(cells) -> str:
    where = getattr(cells, "name", "the cells")
    if getattr(cells, "kind", "") == "segment":
        return f"no nuclei found by the built-in segmentation ({where}); check the slide, or bring a segmentation with --labels / --geojson"
    return f"{where}: no cells found (all labels 0 or no polygons on the slide); check the file matches this slide"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
