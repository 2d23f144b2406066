"""Dense prediction without the engine: read a slide at the model's µm/px, tile, stitch.

Slide windows come from :func:`~napari_stmap.core.io.slide.read_at_mpp` (the one resampler).

Coordinates
-----------
Two pixel frames appear here, both with axis order (y, x):

- **level-0 px** of the slide (what :class:`~napari_stmap.core.io.spots.Spots` and
  :class:`~napari_stmap.core.geometry.MapGrid` use), and
- **model px**: the slide resampled to the model's ``mpp``. Model pixel ``(i, j)`` covers
  level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)`` with ``f = model_mpp / slide.mpp``, so model
  px 0 starts at level-0 px 0 whatever region is read.

:func:`predict_map` aligns its tiles to multiples of the model's ``align_px`` (its encoder's
max stride) in model px, so a map pixel gets the same value whatever region was asked for and
whatever ``tile_px`` was used (exactly so for models with ``exact_tiling``; the halo is the
model's ``halo_px``).

:func:`predict_spots` gives expected counts per spot (genes, then total) for any
architecture: dense models sum their map over each footprint (exact fractional weights,
:func:`~napari_stmap.core.geometry.weight_matrix`); spot models (``input_kind == "spot"``) see
one crop per spot and their output is scaled by the ratio of the spot's area to the spot area
the model was trained on (``model.metadata["training"]["spot_area_um2"]``), the only honest
way a one-vector-per-crop model can answer for a footprint of another size. Bin models
(``input_kind == "bins"``, MagNet) are scaled the same way; they see views around every
centre and a graph of the nearest centres (:func:`~napari_stmap.core.model.magnet.predict_bins`).

Test-time augmentation (``tta=True``): the embedding is averaged over the 8 turns and flips
of the input, each turned back first (:func:`dihedral_embed`), then the pointwise head is
applied. For a dense model every transform of a tile (with its halo) is an exact, aligned
forward pass, so the averaged map is still seamless: it depends on the slide, not on the
tiling. It costs 8 forward passes; the engine does not use it (its maps stay single-pass).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .aggregate import aggregate
from .bins import predict_footprints
from .errors import StmapInputError
from .geometry import Footprint, MapGrid, disks, squares, weight_matrix
from .io.slide import Slide, model_px_per_level0, read_at_mpp
from .tiling import _round_up

__all__ = [
    "dihedral_embed",
    "predict_map",
    "predict_spots",
    "spot_footprints",
]

logger = logging.getLogger(__name__)

#: Default side of the output region of one tile, in model px (rounded to ``align_px``).
DEFAULT_TILE_PX = 512
#: Largest region (model px per side) :func:`predict_spots` asks :func:`predict_map` for.
DEFAULT_CHUNK_PX = 2048


# ------------------------------------------------------------------------------ dense maps
def _align(model: Any) -> int:
    """Tile origins and sizes step: the least common multiple of ``align_px`` and ``stride``."""
    a, s = max(int(model.align_px), 1), max(int(model.stride), 1)
    return a * s // math.gcd(a, s)


def _tile_plan(model: Any, tile_px: int | None) -> tuple[int, int]:
    """(tile, halo) in model px, both multiples of :func:`_align` (so of the stride)."""
    align = _align(model)
    tile = _round_up(max(int(tile_px or DEFAULT_TILE_PX), 1), align)
    halo = _round_up(max(int(model.halo_px), 0), align)
    return tile, halo


def map_region(model: Any, slide: Slide, bbox_yx: Sequence[float]) -> tuple[int, ...]:
    """Model-px region ``(Y0, X0, Y1, X1)`` covering a level-0 bbox, aligned to ``align_px``."""
    f = model_px_per_level0(slide, model.mpp)
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    if not (y1 > y0 and x1 > x0):
        msg = f"bbox_yx must be (y0, x0, y1, x1) level-0 px with y1 > y0, x1 > x0; got {bbox_yx!r}"
        raise StmapInputError(msg)
    a = _align(model)
    ys = (math.floor(y0 / f / a) * a, _round_up(y1 / f, a))
    xs = (math.floor(x0 / f / a) * a, _round_up(x1 / f, a))
    return ys[0], xs[0], ys[1], xs[1]


def predict_map(
    model: Any,
    slide: Slide,
    bbox_yx: Sequence[float],
    *,
    tile_px: int | None = None,
    device: Any = "cpu",
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    tta: bool = False,
) -> tuple[np.ndarray, MapGrid]:
    """Dense expected counts over a region, tiled with the model's halo and stitched.

    Parameters
    ----------
    model : StmapModel
        A dense model (``input_kind == "dense"``), e.g. PixNet.
    slide : Slide
        The slide.
    bbox_yx : (y0, x0, y1, x1)
        Region in level-0 px; the map covers it, grown outwards to whole aligned tiles.
    tile_px : int, optional
        Output side of one tile in model px (default 512; rounded up to ``align_px``).
        Every tile is read with ``halo_px`` of context on each side.
    device : str or torch.device
        Where the network runs.
    batch_size : int
        Tiles per forward pass.
    progress : callable, optional
        ``progress(done, total)`` after each batch.
    tta : bool
        Average the embedding over the 8 turns and flips of every tile (module notes).

    Returns
    -------
    map_chw : numpy.ndarray
        float32 ``(G + 1, H, W)`` expected counts per output pixel, genes then total.
    grid : MapGrid
        Where the map lies: origin in level-0 px, ``pixel_px = stride · f`` level-0 px.
    """
    if getattr(model, "input_kind", "dense") != "dense":
        msg = f"predict_map needs a dense model; {model.arch!r} predicts one value per spot crop"
        raise StmapInputError(msg)
    f = model_px_per_level0(slide, model.mpp)
    ry0, rx0, ry1, rx1 = map_region(model, slide, bbox_yx)
    tile, halo = _tile_plan(model, tile_px)
    s = int(model.stride)
    grid = MapGrid((ry0 * f, rx0 * f), s * f, ((ry1 - ry0) // s, (rx1 - rx0) // s))
    out = np.zeros((model.num_outputs, *grid.shape_hw), dtype=np.float32)
    tiles = [
        (ty, tx, min(tile, ry1 - ty), min(tile, rx1 - tx))
        for ty in range(ry0, ry1, tile)
        for tx in range(rx0, rx1, tile)
    ]
    groups: dict[tuple[int, int], list] = {}
    for t in tiles:
        groups.setdefault(t[2:], []).append(t)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    for done, batch in enumerate(batches, start=1):
        maps = _forward_tiles(model, slide, batch, halo, device, tta)
        for (ty, tx, th, tw), m in zip(batch, maps, strict=True):
            oy, ox = (ty - ry0) // s, (tx - rx0) // s
            out[:, oy : oy + th // s, ox : ox + tw // s] = m
        if progress is not None:
            progress(done, len(batches))
    return out, grid


def dihedral_embed(model: Any, x: Any) -> Any:
    """Mean of ``model.embed`` over the 8 turns and flips of ``x``, each turned back.

    Parameters
    ----------
    model : StmapModel
        Dense (embedding (B, D, h, w)) or spot model (embedding (B, D)).
    x : torch.Tensor
        (B, 3, H, W) model input (H and W multiples of ``align_px`` for dense models).

    Returns
    -------
    torch.Tensor
        The averaged embedding; ``model.head`` of it is the TTA prediction. A dense map
        pixel covering input px ``[i·s, (i+1)·s)`` is turned back onto the same pixel, so the
        result is exactly equivariant: ``dihedral_embed(turn(x)) == turn(dihedral_embed(x))``.
    """
    import torch

    total = None
    for k in range(4):
        for flip in (False, True):
            xt = torch.rot90(x, k, dims=(2, 3))
            xt = torch.flip(xt, dims=(3,)) if flip else xt
            e = model.embed(xt)
            if e.ndim == 4:
                e = torch.flip(e, dims=(3,)) if flip else e
                e = torch.rot90(e, -k, dims=(2, 3))
            total = e if total is None else total + e
    return total / 8.0


def _forward_tiles(
    model: Any,
    slide: Slide,
    batch: list[tuple[int, int, int, int]],
    halo: int,
    device: Any,
    tta: bool = False,
) -> np.ndarray:
    """Forward a batch of equal-size tiles with halo; returns their centres (B, C, th/s, tw/s)."""
    import torch

    th, tw = batch[0][2], batch[0][3]
    images = np.stack(
        [
            read_at_mpp(slide, (ty - halo, tx - halo), (th + 2 * halo, tw + 2 * halo), model.mpp)
            for ty, tx, _, _ in batch
        ]
    )
    s, hs = int(model.stride), halo // int(model.stride)
    model.eval()
    with torch.inference_mode():
        x = model.preprocess(images).to(device)
        y = model.head(dihedral_embed(model, x)) if tta else model(x)
        y = y[:, :, hs : hs + th // s, hs : hs + tw // s]
    return y.float().cpu().numpy()


# ----------------------------------------------------------------------------- spot values
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
        return _dense_spots(model, slide, fps, tile_px, device, batch_size, chunk_px, progress, tta)
    if kind == "spot":
        return _crop_spots(model, slide, fps, device, batch_size, progress, tta)
    if kind == "bins":  # MagNet: views around each centre + kNN graph over all of them
        step = None if progress is None else _in_spots(progress, 0, len(fps), len(fps))
        kw = {"device": device, "batch_size": batch_size, "progress": step, "tta": tta}
        return predict_footprints(model, slide, fps, **kw)
    msg = f"model input_kind {kind!r} is not supported; expected 'dense', 'spot' or 'bins'"
    raise StmapInputError(msg)


def _dense_spots(
    model, slide, fps, tile_px, device, batch_size, chunk_px, progress, tta=False
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
