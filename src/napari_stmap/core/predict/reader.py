"""Reading tile windows from a slide at the model's µm/px, through a cache of decoded blocks.

:class:`SlideReader` is what every tiled dense prediction reads with (the interactive
:class:`~napari_stmap.core.predict.predictor.Predictor`, whole-slide dask tasks and the
in-memory :func:`~napari_stmap.core.predict.dense.predict_map`): a tile's window (core + halo,
model px, axis order (y, x)) is read from the pyramid level its
:class:`~napari_stmap.core.tiling.TileSpec` names and resized by
:func:`~napari_stmap.core.io.slide.resample_window`, the resampler behind
:func:`~napari_stmap.core.io.slide.read_at_mpp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io.slide import Slide, open_slide, resample_window
from ..store import LRUCache
from ..tiling import TileSpec

__all__ = ["DEFAULT_IMAGE_CACHE_BYTES", "SlideReader", "Tile", "as_slide"]

#: Default byte limit of the cache of decoded slide blocks (per slide reader).
DEFAULT_IMAGE_CACHE_BYTES = 64 * 2**20
#: A tile ``(i, j)``: row and column in the tile grid of a :class:`TileSpec`.
Tile = tuple[int, int]


class SlideReader:
    """Reads tile windows at the model's µm/px from one pyramid level.

    Parameters
    ----------
    slide : Slide
        The slide.
    spec : TileSpec
        The tile plan (level, scale and window geometry).
    cache_bytes : int
        Byte limit of the LRU cache of decoded level blocks (the dask chunks of the level).
    """

    def __init__(self, slide: Slide, spec: TileSpec, cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.slide = slide
        self.spec = spec
        self._arr = slide.levels[spec.level]
        self._ybounds = np.cumsum((0, *self._arr.chunks[0]))
        self._xbounds = np.cumsum((0, *self._arr.chunks[1]))
        self.cache = LRUCache(cache_bytes)

    def window(self, tile: Tile) -> np.ndarray:
        """The read window of ``tile``: ``(W, W, 3)`` uint8 RGB at model px, white off-slide.

        Read from ``spec.level`` through the block cache and resized by
        :func:`~napari_stmap.core.io.slide.resample_window` (the resampler behind
        :func:`~napari_stmap.core.io.slide.read_at_mpp`); no resize when the level is at the
        model's µm/px.
        """
        y0, x0, y1, x1 = self.spec.window_model(tile)
        return resample_window(self.read_level, (y0, x0), (y1 - y0, x1 - x0), self.spec.scale)

    def read_level(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Level px ``[y0, y1) × [x0, x1)`` of ``spec.level`` as (h, w, 3) uint8; white outside."""
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        ys, xs = self._ybounds, self._xbounds
        cy0, cy1 = max(y0, 0), min(y1, int(ys[-1]))
        cx0, cx1 = max(x0, 0), min(x1, int(xs[-1]))
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        for bi in range(
            np.searchsorted(ys, cy0, "right") - 1, np.searchsorted(ys, cy1 - 1, "right")
        ):
            for bj in range(
                np.searchsorted(xs, cx0, "right") - 1, np.searchsorted(xs, cx1 - 1, "right")
            ):
                block = self._block(bi, bj)
                by, bx = int(ys[bi]), int(xs[bj])
                a0, a1 = max(cy0, by), min(cy1, by + block.shape[0])
                b0, b1 = max(cx0, bx), min(cx1, bx + block.shape[1])
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = block[
                    a0 - by : a1 - by, b0 - bx : b1 - bx
                ]
        return out

    def _block(self, bi: int, bj: int) -> np.ndarray:
        def load() -> np.ndarray:
            return np.asarray(self._arr.blocks[bi, bj].compute(scheduler="sync"))

        return self.cache.get_or_compute((int(bi), int(bj)), load)


def as_slide(slide: Slide | str | Path | Any) -> Slide:
    """``slide`` itself, or the slide opened from its path."""
    return slide if hasattr(slide, "levels") else open_slide(slide)
