"""A simple built-in nucleus segmentation, tile by tile, for slides without one.

This is a **baseline**, not a deep-learning segmenter: the haematoxylin channel (colour
deconvolution, :func:`skimage.color.rgb2hed`) is smoothed and thresholded (one threshold for the
whole slide: Otsu over tissue samples, or the one given), small holes are filled and specks
removed, touching nuclei are split by a watershed of the distance transform, and objects outside
a size range are dropped. It finds well-stained, separated nuclei; it merges tight clusters and
misses pale or out-of-focus nuclei. For real work bring a deep-learning segmentation instead:
run Cellpose, StarDist or InstanSeg on the slide and save its label image as a TIFF
(``stmap cells --labels labels.tif``; a whole-number downsample of the slide is fine), or export
QuPath's cell detections as GeoJSON (``--geojson cells.geojson``).

Tiling: the slide is cut into tiles of ``tile_px`` label px, each read with a halo of
``halo_um`` on every side, only on tissue (:func:`~napari_stmap.core.tiling.tissue_mask`, as the
predictor). A tile keeps the nuclei whose centroid lies in its core and that do not touch its
window's edge, so a nucleus cut by a tile border is found whole, once, by the tile that owns its
centroid; ids are numbered globally as tiles finish (raster order). The threshold is global, so
a nucleus far from the window edge gets the same pixels whatever the tiling. Labels are written
into a numpy array (a region) or a zarr array on disk (a whole slide: memory stays one window).

Frames: labels are at a whole-number downsample ``f`` of level 0 (the pyramid level nearest
``work_um`` µm/px with a whole-number downsample; 1 on most slides), label px ``(a, b)`` covering
level-0 px ``[a·f, (a+1)·f) × [b·f, (b+1)·f)``, axis order (y, x).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StmapInputError
from .labels import ArrayLabels

__all__ = ["NucleusParams", "hematoxylin", "segment_nuclei", "segment_window", "work_level"]

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], Any] | None


@dataclass(frozen=True)
class NucleusParams:
    """Settings of the built-in nucleus segmentation (sizes in µm).

    Attributes
    ----------
    work_um : float
        Target µm per px of the image segmented (a pyramid level near it is used).
    threshold : float or None
        Haematoxylin optical density above which a pixel is nucleus; None: Otsu over tissue.
    smooth_um : float
        Gaussian sigma applied to the haematoxylin channel.
    min_area_um2, max_area_um2 : float
        Nuclei outside this area range are dropped.
    min_distance_um : float
        Least distance between the centres of two touching nuclei (watershed seeds).
    halo_um : float
        Context read around each tile (at least twice the largest nucleus diameter).
    tile_px : int
        Tile core side in label px.
    """

    work_um: float = 0.5
    threshold: float | None = None
    smooth_um: float = 0.5
    min_area_um2: float = 10.0
    max_area_um2: float = 250.0
    min_distance_um: float = 3.0
    halo_um: float = 30.0
    tile_px: int = 1024


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (colour deconvolution, Ruifrok & Johnston) of (h, w, 3) uint8."""
    from skimage.color import rgb2hed

    return rgb2hed(np.asarray(rgb)[..., :3])[..., 0].astype(np.float32)


def segment_window(
    rgb: np.ndarray, px_um: float, threshold: float, params: NucleusParams
) -> np.ndarray:
    """Nuclei of one image window: (h, w) int32 labels 1..n (0: background).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB, axes (y, x, c).
    px_um
        µm per px of ``rgb``.
    threshold
        Haematoxylin optical density threshold (global for the slide).
    params
        Sizes and smoothing (µm).
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian
    from skimage.segmentation import watershed

    area_px = 1.0 / px_um**2
    hem = gaussian(hematoxylin(rgb), sigma=params.smooth_um / px_um, preserve_range=True)
    mask = hem > threshold
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    holes = ~mask
    hole_lab, _ = ndimage.label(holes)
    hole_size = np.bincount(hole_lab.ravel())
    small = hole_size < params.min_area_um2 * area_px
    small[0] = False
    mask |= small[hole_lab]
    dist = ndimage.distance_transform_edt(mask)
    dist = gaussian(dist, sigma=1.0, preserve_range=True)
    comps, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.int32)
    md = max(1, int(round(params.min_distance_um / px_um)))
    peaks = peak_local_max(dist, min_distance=md, labels=comps, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    sizes = np.bincount(labels.ravel())
    keep = (sizes >= params.min_area_um2 * area_px) & (sizes <= params.max_area_um2 * area_px)
    keep[0] = False
    lut = np.zeros(len(sizes), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def work_level(slide: Any, work_um: float) -> tuple[int, int]:
    """Pyramid level and its whole-number downsample ``f`` to segment ``slide`` at.

    The coarsest level no coarser than ``work_um`` whose downsample is a whole number (within
    0.1%); level 0 when none is.
    """
    best = (0, 1)
    for level, d in enumerate(slide.downsamples):
        f = round(float(d))
        if f >= 1 and abs(d - f) <= 1e-3 * f and slide.mpp * d <= work_um * 1.25:
            best = (level, f) if f > best[1] else best
    return best


def slide_threshold(slide: Any, level: int, f: int, tissue: Any, params: NucleusParams) -> float:
    """Global haematoxylin threshold: Otsu over up to 16 windows of 256 px on tissue."""
    from skimage.filters import threshold_otsu

    if params.threshold is not None:
        return float(params.threshold)
    sy, sx = tissue.px_yx
    rows, cols = np.nonzero(tissue.mask)
    if rows.size == 0:
        msg = f"{slide.path.name}: no tissue found, so no nuclei to segment; check the slide"
        raise StmapInputError(msg)
    pick = np.linspace(0, rows.size - 1, min(16, rows.size)).astype(int)
    values = []
    half = 128 * f
    for r, c in zip(rows[pick], cols[pick], strict=True):
        cy, cx = int((r + 0.5) * sy), int((c + 0.5) * sx)
        rgb = slide.read_region((cy - half, cx - half, cy + half, cx + half), level=level)
        values.append(hematoxylin(rgb).ravel())
    hem = np.concatenate(values)
    hem = hem[np.isfinite(hem)]
    thr = float(threshold_otsu(hem)) if np.ptp(hem) > 1e-6 else float(hem.max(initial=0.0))
    logger.info("haematoxylin threshold %.4f (Otsu over %d tissue px)", thr, hem.size)
    return thr


def segment_nuclei(
    slide: Any,
    *,
    bbox_yx: Sequence[float] | None = None,
    out: str | Path | None = None,
    params: NucleusParams | None = None,
    tissue: Any = "auto",
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
) -> ArrayLabels:
    """Segment nuclei over a slide (or a level-0 px box of it), tile by tile.

    Parameters
    ----------
    slide
        A :class:`~napari_stmap.core.io.slide.Slide`.
    bbox_yx
        Only this level-0 px box ``(y0, x0, y1, x1)`` (default: the whole slide).
    out
        A ``.zarr`` path: labels are written there (memory stays one window); None: a numpy
        array in memory (regions).
    params
        :class:`NucleusParams` (defaults: a baseline for H&E at 20–40×).
    tissue
        A :class:`~napari_stmap.core.tiling.TissueMask`, ``"auto"`` (computed, as the predictor
        does) or None (every tile).
    progress, cancel
        ``progress(done, total)`` per tile; ``cancel()`` True stops after the current tile
        (the labels so far are kept).

    Returns
    -------
    ArrayLabels
        ``kind="segment"``, its ``origin`` the box's top-left label px; ``.threshold`` and
        ``.params`` record what was used.
    """
    from ..tiling import tissue_mask

    params = params or NucleusParams()
    level, f = work_level(slide, params.work_um)
    px_um = slide.mpp * f
    if isinstance(tissue, str):
        tissue = tissue_mask(slide)
    sh, sw = slide.shape_yx
    box = (0.0, 0.0, float(sh), float(sw)) if bbox_yx is None else tuple(float(v) for v in bbox_yx)
    sampled = tissue if tissue is not None else _box_mask(box, slide)
    thr = slide_threshold(slide, level, f, sampled, params)
    win = (
        max(0, math.floor(box[0] / f)),
        max(0, math.floor(box[1] / f)),
        min(math.ceil(sh / f), math.ceil(box[2] / f)),
        min(math.ceil(sw / f), math.ceil(box[3] / f)),
    )
    if win[2] <= win[0] or win[3] <= win[1]:
        msg = f"box {box} (level-0 px) does not overlap the slide (0, 0, {sh}, {sw})"
        raise StmapInputError(msg)
    shape = (win[2] - win[0], win[3] - win[1])
    labels = _output(out, shape)
    halo = int(math.ceil(params.halo_um / px_um))
    tiles = _tiles(win, params.tile_px, f, tissue)
    next_id = 1
    for k, core in enumerate(tiles):
        if cancel is not None and cancel():
            break
        window = (core[0] - halo, core[1] - halo, core[2] + halo, core[3] + halo)
        rgb = slide.read_region(tuple(v * f for v in window), level=level)
        local = segment_window(rgb, px_um, thr, params)
        next_id = _claim(labels, win, window, core, local, next_id)
        if progress is not None:
            progress(k + 1, len(tiles))
    name = Path(out).name if out is not None else f"{slide.path.name} nuclei"
    source = ArrayLabels(labels, f, kind="segment", name=name, origin=(win[0], win[1]))
    source.threshold, source.params = thr, asdict(params)
    logger.info("segmented %d nuclei in %d tiles (threshold %.4f)", next_id - 1, len(tiles), thr)
    return source


def _box_mask(bbox_yx, slide):
    """A coarse 8 × 8 "tissue" mask that is True over a level-0 px box (threshold samples)."""
    from ..tiling import TissueMask

    sh, sw = slide.shape_yx
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    n = 8
    mask = np.zeros((n, n), dtype=bool)
    py, px = sh / n, sw / n
    mask[int(y0 // py) : int(math.ceil(y1 / py)), int(x0 // px) : int(math.ceil(x1 / px))] = True
    return TissueMask(mask, (py, px))


def _output(out: str | Path | None, shape: tuple[int, int]) -> Any:
    if out is None:
        return np.zeros(shape, dtype=np.int32)
    import zarr

    chunks = (min(1024, shape[0]), min(1024, shape[1]))
    return zarr.open_array(
        str(out), mode="w", shape=shape, chunks=chunks, dtype="int32", fill_value=0
    )


def _tiles(win, tile_px: int, f: int, tissue) -> list[tuple[int, int, int, int]]:
    """Tile cores (label px) over ``win`` that touch tissue, in raster order."""
    r0, c0, r1, c1 = win
    cores = [
        (y, x, min(y + tile_px, r1), min(x + tile_px, c1))
        for y in range(r0, r1, tile_px)
        for x in range(c0, c1, tile_px)
    ]
    if tissue is None or not cores:
        return cores
    keep = tissue.any_in(np.array(cores, dtype=float) * f)
    return [c for c, k in zip(cores, keep, strict=True) if k]


def _claim(labels, win, window, core, local: np.ndarray, next_id: int) -> int:
    """Write the nuclei of ``local`` (labels of ``window``) that ``core`` owns; new global ids.

    Owned: centroid inside the core and not touching the window's edge. A nucleus whose pixels
    are mostly taken already (a neighbour's tile found it first) is dropped; otherwise it gets
    the free pixels. Returns the next free id.
    """
    n = int(local.max(initial=0))
    if n == 0:
        return next_id
    h, w = local.shape
    yy, xx = np.indices(local.shape)
    flat = local.ravel()
    count = np.bincount(flat, minlength=n + 1).astype(float)
    cy = np.bincount(flat, (yy.ravel() + 0.5), minlength=n + 1) / np.maximum(count, 1)
    cx = np.bincount(flat, (xx.ravel() + 0.5), minlength=n + 1) / np.maximum(count, 1)
    edge = np.unique(np.concatenate([local[0], local[-1], local[:, 0], local[:, -1]]))
    oy, ox = core[0] - window[0], core[1] - window[1]
    inside = (cy >= oy) & (cy < oy + core[2] - core[0]) & (cx >= ox) & (cx < ox + core[3] - core[1])
    owned = inside & (count > 0)
    owned[0] = False
    owned[edge] = False
    if not owned.any():
        return next_id
    # the part of the window inside the output array
    ys, ye = max(window[0], win[0]), min(window[2], win[2])
    xs, xe = max(window[1], win[1]), min(window[3], win[3])
    sub = local[ys - window[0] : ye - window[0], xs - window[1] : xe - window[1]]
    current = np.asarray(labels[ys - win[0] : ye - win[0], xs - win[1] : xe - win[1]])
    taken = np.bincount(sub[current != 0].ravel(), minlength=n + 1)
    owned &= taken <= 0.5 * count
    lut = np.zeros(n + 1, dtype=np.int32)
    ids = np.flatnonzero(owned)
    lut[ids] = np.arange(next_id, next_id + ids.size, dtype=np.int32)
    new = lut[sub]
    write = (new != 0) & (current == 0)
    if write.any():
        current = np.where(write, new, current)
        labels[ys - win[0] : ye - win[0], xs - win[1] : xe - win[1]] = current
    return next_id + int(ids.size)
