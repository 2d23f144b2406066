"""A dense map of a region in memory, through the same tiled pipeline as the store-backed engine.

:func:`predict_map` plans the region's tiles as a :class:`~napari_stmap.core.tiling.TileSpec`
(:func:`region_spec`: tile size and halo from :func:`~napari_stmap.core.tiling.plan_tiles`),
reads each window with :class:`~napari_stmap.core.predict.reader.SlideReader` and runs
:func:`~napari_stmap.core.predict.pipeline.embed_windows` (with the head) in the threaded
pipeline, stitching the cores into one array instead of a store.

Coordinates
-----------
Two pixel frames appear here, both with axis order (y, x):

- **level-0 px** of the slide (what :class:`~napari_stmap.core.io.spots.Spots` and
  :class:`~napari_stmap.core.geometry.MapGrid` use), and
- **model px**: the slide resampled to the model's ``mpp``. Model pixel ``(i, j)`` covers
  level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)`` with ``f = model_mpp / slide.mpp``, so model
  px 0 starts at level-0 px 0 whatever region is read.

Tiles are aligned to multiples of the model's alignment (the least common multiple of its
encoder's max stride ``align_px`` and its ``stride``) in model px, so a map pixel gets the
same value whatever region was asked for and whatever ``tile_px`` was used (exactly so for
models with ``exact_tiling``; the halo is the model's ``halo_px``).

Test-time augmentation (``tta=True``): the embedding is averaged over the 8 turns and flips
of each window, each turned back first
(:func:`~napari_stmap.core.predict.device.dihedral_embed`), then the pointwise head is applied.
Every transform of a window is an exact, aligned forward pass, so the averaged map is still
seamless: it depends on the slide, not on the tiling. It costs 8 forward passes; the engine's
stores do not use it (their maps stay single-pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import StmapInputError
from ..geometry import MapGrid
from ..io.slide import Slide, model_px_per_level0
from ..tiling import TileSpec, _lcm, _round_up, plan_tiles
from .device import resolve_precision, torch_device
from .pipeline import _ListFeed, _Pipeline
from .reader import SlideReader, Tile

__all__ = ["DEFAULT_MAP_TILE_PX", "map_region", "predict_map", "region_spec"]

#: Default side of the core of one tile of :func:`predict_map`, model px (rounded to the
#: alignment); smaller than a store's tiles, since regions asked for here are often small.
DEFAULT_MAP_TILE_PX = 512


def map_region(model: Any, slide: Slide, bbox_yx: Sequence[float]) -> tuple[int, int, int, int]:
    """Model-px region ``(Y0, X0, Y1, X1)`` covering a level-0 bbox, aligned both ends.

    Not clipped to the slide: a map of a box at the slide's edge reads white beyond it.
    """
    f = model_px_per_level0(slide, model.mpp)
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    if not (y1 > y0 and x1 > x0):
        msg = f"bbox_yx must be (y0, x0, y1, x1) level-0 px with y1 > y0, x1 > x0; got {bbox_yx!r}"
        raise StmapInputError(msg)
    a = _lcm(model.align_px, model.stride)
    ys = (math.floor(y0 / f / a) * a, _round_up(y1 / f, a))
    xs = (math.floor(x0 / f / a) * a, _round_up(x1 / f, a))
    return ys[0], xs[0], ys[1], xs[1]


def region_spec(
    model: Any, slide: Slide, bbox_yx: Sequence[float], tile_px: int | None = None
) -> TileSpec:
    """Tile plan of the aligned region :func:`map_region` of a level-0 box.

    Tile size, halo, pyramid level and scale are those of
    :func:`~napari_stmap.core.tiling.plan_tiles` (``tile_px`` default
    :data:`DEFAULT_MAP_TILE_PX`); only the region differs (aligned at both ends, not clipped
    to the slide).
    """
    whole = plan_tiles(slide, model, tile_px=tile_px or DEFAULT_MAP_TILE_PX)
    y0, x0, y1, x1 = map_region(model, slide, bbox_yx)
    size, t = (y1 - y0, x1 - x0), whole.tile_px
    return replace(
        whole,
        origin_model_yx=(y0, x0),
        size_model_hw=size,
        grid_shape=(math.ceil(size[0] / t), math.ceil(size[1] / t)),
    )


class _MapSink:
    """Stitches tile outputs ``(C, T/s, T/s)`` into one in-memory map (a pipeline sink)."""

    def __init__(self, spec: TileSpec, channels: int) -> None:
        self.spec = spec
        self.map = np.zeros((channels, *spec.out_shape_hw), dtype=np.float32)

    def write_tile(self, tile: Tile, out: np.ndarray) -> None:
        rows, cols = self.spec.output_slices(tile)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        self.map[:, rows, cols] = out[:, :h, :w]


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
    precision: str = "auto",
) -> tuple[np.ndarray, MapGrid]:
    """Dense expected counts over a region, tiled with the model's halo and stitched.

    Parameters
    ----------
    model : StmapModel
        A dense model (``input_kind == "dense"``), e.g. PixNet, on ``device``.
    slide : Slide
        The slide.
    bbox_yx : (y0, x0, y1, x1)
        Region in level-0 px; the map covers it, grown outwards to the alignment.
    tile_px : int, optional
        Core side of one tile in model px (default :data:`DEFAULT_MAP_TILE_PX`; rounded up to
        the alignment). Every tile is read with ``halo_px`` of context on each side.
    device : str or torch.device
        Where the network runs.
    batch_size : int
        Tiles per forward pass.
    progress : callable, optional
        ``progress(done, total)`` in tiles, after each tile (from a worker thread).
    tta : bool
        Average the embedding over the 8 turns and flips of every tile (module notes).
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast dtype (``"auto"``: :func:`~napari_stmap.core.predict.device.resolve_precision`
        for ``device`` and ``model``); fp32 runs without autocast.

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
    spec = region_spec(model, slide, bbox_yx, tile_px)
    sink = _MapSink(spec, model.num_outputs)
    feed = _ListFeed(spec.tiles(), progress)
    model.eval()
    dev = torch_device(device)
    pipe = _Pipeline(
        model,
        SlideReader(slide, spec),
        sink,
        batch_size=batch_size,
        device=dev,
        precision=resolve_precision(dev, model, precision),
        tta=tta,
        head=True,
    )
    pipe.run(feed, pooled=True)
    feed.raise_error()
    return sink.map, spec.grid
