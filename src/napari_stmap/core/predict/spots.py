"""Predicted expected counts at spots, for any architecture.

:func:`predict_spots` gives expected counts per spot (genes, then total): dense models sum
their map (:func:`~napari_stmap.core.predict.dense.predict_map`, the tiled pipeline) over each
footprint with exact fractional weights (:func:`~napari_stmap.core.geometry.weight_matrix`);
spot models (``input_kind == "spot"``) see one crop per spot and their output is scaled by the
ratio of the spot's area to the spot area the model was trained on
(``model.metadata["training"]["spot_area_um2"]``, :func:`spot_area_ratio`), the only honest
way a one-vector-per-crop model can answer for a footprint of another size. Bin models
(``input_kind == "bins"``, MagNet) are scaled the same way; they see views around every centre
and a graph of the nearest centres (:func:`~napari_stmap.core.predict.bins.predict_footprints`).

Positions are level-0 px, axis order (y, x); crops are read at the model's µm/px. With
``tta=True`` embeddings are averaged over the 8 turns and flips of each tile or crop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..aggregate import aggregate
from ..errors import StmapInputError
from ..geometry import Footprint, disks, squares, weight_matrix
from ..io.slide import Slide, model_px_per_level0, read_at_mpp
from .bins import predict_footprints
from .dense import predict_map
from .device import dihedral_embed

__all__ = ["DEFAULT_CHUNK_PX", "predict_spots", "spot_area_ratio", "spot_footprints"]

logger = logging.getLogger(__name__)

#: Largest region (model px per side) :func:`predict_spots` asks :func:`predict_map` for.
DEFAULT_CHUNK_PX = 2048


def spot_footprints(spots: Any) -> list[Footprint]:
    """Footprints (level-0 px) of spots given as a ``Spots``-like object or a footprint list.

    A ``Spots``-like object has ``centers_yx`` (n, 2) level-0 px, ``footprint`` ("disk" or
    "square") and ``size_px`` (diameter or side, level-0 px).
    """
    if isinstance(spots, Footprint):
        return [spots]
    if isinstance(spots, Sequence) and all(isinstance(f, Footprint) for f in spots):
        return list(spots)
    kind, size = getattr(spots, "footprint", None), float(getattr(spots, "size_px", math.nan))
    if kind not in ("disk", "square") or not (math.isfinite(size) and size > 0):
        msg = (
            f"spots need footprint 'disk'/'square' and a size in px (got {kind!r}, {size!r}); "
            "pass Spots read with a known µm/px, or a list of footprints"
        )
        raise StmapInputError(msg)
    build = disks if kind == "disk" else squares
    return build(np.asarray(spots.centers_yx, dtype=float).reshape(-1, 2), size)


def predict_spots(
    model: Any,
    slide: Slide,
    spots: Any,
    *,
    device: Any = "cpu",
    tile_px: int | None = None,
    batch_size: int = 4,
    chunk_px: int = DEFAULT_CHUNK_PX,
    progress: Callable[[int, int], None] | None = None,
    tta: bool = False,
    precision: str = "auto",
) -> np.ndarray:
    """Predicted expected counts of every spot, for any architecture.

    Parameters
    ----------
    model : StmapModel
        Dense (``input_kind="dense"``) or spot-crop (``"spot"``) model.
    slide : Slide
        The slide the spots lie on.
    spots : Spots-like or sequence of Footprint
        ``centers_yx`` (n, 2) level-0 px + ``footprint`` + ``size_px``, or footprints.
    device, tile_px, batch_size
        As for :func:`predict_map` (``batch_size``: crops per pass for spot models).
    chunk_px : int
        Dense models: spots are grouped by centre into squares of this many model px and each
        group's bounding box is predicted with :func:`predict_map` separately (bounded memory).
    progress : callable, optional
        ``progress(done, total)`` in spots: the spots predicted so far (dense: in proportion
        to the tiles done of the current chunk; spot: after each batch of crops) of all
        ``total`` spots; ``done`` ends at ``total``.
    tta : bool
        Average the embedding over the 8 turns and flips (of each tile or crop).
    precision : {"auto", "fp32", "bf16", "fp16"}
        Dense models: autocast dtype of :func:`predict_map`; spot and bin models run fp32.

    Returns
    -------
    numpy.ndarray
        ``(n, G + 1)`` float64: genes then total. Dense: the map summed over each footprint
        with fractional pixel weights. Spot models: the crop's output × (footprint area / the
        spot area the model was trained on).
    """
    fps = spot_footprints(spots)
    if not fps:
        return np.zeros((0, model.num_outputs), dtype=np.float64)
    kind = getattr(model, "input_kind", "dense")
    if kind == "dense":
        args = (tile_px, device, batch_size, chunk_px, progress, tta, precision)
        return _dense_spots(model, slide, fps, *args)
    if kind == "spot":
        return _crop_spots(model, slide, fps, device, batch_size, progress, tta)
    if kind == "bins":  # MagNet: views around each centre + kNN graph over all of them
        step = None if progress is None else _in_spots(progress, 0, len(fps), len(fps))
        kw = {"device": device, "batch_size": batch_size, "progress": step, "tta": tta}
        return predict_footprints(model, slide, fps, **kw)
    msg = f"model input_kind {kind!r} is not supported; expected 'dense', 'spot' or 'bins'"
    raise StmapInputError(msg)


def _dense_spots(
    model, slide, fps, tile_px, device, batch_size, chunk_px, progress, tta=False, precision="auto"
) -> np.ndarray:
    """Group footprints by centre into chunks, predict each chunk's bbox, aggregate."""
    f = model_px_per_level0(slide, model.mpp)
    boxes = np.array([fp.bbox_yx() for fp in fps], dtype=float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell = np.floor(centres / (max(int(chunk_px), 1) * f)).astype(np.int64)
    keys, group = np.unique(cell, axis=0, return_inverse=True)
    group = group.ravel()
    out = np.zeros((len(fps), model.num_outputs), dtype=np.float64)
    before = 0
    for k in range(len(keys)):
        idx = np.flatnonzero(group == k)
        bbox = (*boxes[idx, :2].min(axis=0), *boxes[idx, 2:].max(axis=0))
        step = None if progress is None else _in_spots(progress, before, len(idx), len(fps))
        chunk, grid = predict_map(
            model,
            slide,
            bbox,
            tile_px=tile_px,
            device=device,
            batch_size=batch_size,
            tta=tta,
            precision=precision,
            progress=step,
        )
        out[idx] = aggregate(chunk, grid, weight_matrix([fps[i] for i in idx], grid))
        before += len(idx)
    return out


def _in_spots(
    progress: Callable[[int, int], None], before: int, n: int, total: int
) -> Callable[[int, int], None]:
    """``progress(done, total)`` of a part holding ``n`` of ``total`` spots, in spots.

    The part's own ``(done, of)`` (tiles, batches, chunks) is turned into
    ``before + round(n · done / of)`` spots done.
    """

    def step(done: int, of: int) -> None:
        progress(before + round(n * done / max(of, 1)), total)

    return step


def spot_area_ratio(model: Any, areas_um2: np.ndarray) -> np.ndarray:
    """Factor turning a spot model's output into counts of footprints of ``areas_um2`` µm².

    The model was trained to predict spots of ``model.metadata["training"]["spot_area_um2"]``
    µm²; without that record (an untrained model) the factor is 1.
    """
    ref = (getattr(model, "metadata", {}) or {}).get("training", {}).get("spot_area_um2")
    areas = np.asarray(areas_um2, dtype=np.float64)
    if not ref:
        logger.debug("spot model without training spot area: predictions are not area-scaled")
        return np.ones_like(areas)
    return areas / float(ref)


def _crop_spots(model, slide, fps, device, batch_size, progress, tta=False) -> np.ndarray:
    """One crop of ``model.crop_px`` model px per footprint centre; outputs area-scaled."""
    import torch

    f = model_px_per_level0(slide, model.mpp)
    crop = int(model.crop_px)
    boxes = np.array([fp.bbox_yx() for fp in fps], dtype=float)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / f
    origins = np.floor(centres - crop / 2 + 0.5).astype(np.int64)
    areas = np.array([fp.area_px() for fp in fps]) * float(slide.mpp) ** 2
    out = np.zeros((len(fps), model.num_outputs), dtype=np.float64)
    model.eval()
    n_batches = math.ceil(len(fps) / batch_size)
    for b in range(n_batches):
        sel = slice(b * batch_size, (b + 1) * batch_size)
        images = np.stack(
            [read_at_mpp(slide, tuple(o), (crop, crop), model.mpp) for o in origins[sel]]
        )
        with torch.inference_mode():
            x = model.preprocess(images).to(device)
            y = model.head(dihedral_embed(model, x)) if tta else model(x)
            out[sel] = y.double().cpu().numpy()
        if progress is not None:
            progress(min((b + 1) * batch_size, len(fps)), len(fps))
    return out * spot_area_ratio(model, areas)[:, None]
