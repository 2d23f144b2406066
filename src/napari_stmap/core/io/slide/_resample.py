"""Reading a slide at a model's µm/px: :func:`read_at_mpp` and the one resampler.

Model px ``(i, j)`` covers level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)`` with
``f = mpp / slide.mpp`` (:func:`model_px_per_level0`); :func:`resample_window` is the one
resize behind :func:`read_at_mpp` and the engine's tile reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ...errors import StmapInputError
from ._slide import Slide


def model_px_per_level0(slide: Slide, mpp: float) -> float:
    """Level-0 px per model px, ``f = mpp / slide.mpp``.

    Parameters
    ----------
    slide : Slide
        The slide (its µm per level-0 px).
    mpp : float
        The model's µm/px.

    Raises
    ------
    StmapInputError
        When ``mpp`` is not a positive finite number.
    """
    if not (math.isfinite(mpp) and mpp > 0):
        msg = f"model µm/px must be a positive number, got {mpp!r}"
        raise StmapInputError(msg)
    return float(mpp) / float(slide.mpp)


def read_at_mpp(
    slide: Slide, origin_yx: tuple[int, int], shape_hw: tuple[int, int], mpp: float
) -> np.ndarray:
    """Read a region of the slide resampled to ``mpp`` µm/px.

    Parameters
    ----------
    slide : Slide
        The slide.
    origin_yx : (int, int)
        Top-left model px (y, x) of the region (may be negative: outside is white).
    shape_hw : (int, int)
        Size (h, w) in model px.
    mpp : float
        Target µm/px.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8 RGB. Read from the coarsest pyramid level that is at least as fine
        as ``mpp`` (:meth:`Slide.best_level_for_mpp`) and resized with an antialiasing
        (triangle) filter whose geometry is exact to sub-pixel; read directly, without
        resampling, when that level is already at ``mpp`` (see :func:`resample_window`).
    """
    oy, ox = (int(v) for v in origin_yx)
    h, w = (int(v) for v in shape_hw)
    f = model_px_per_level0(slide, mpp)
    level = slide.best_level_for_mpp(mpp)
    scale = f / slide.downsamples[level]  # level px per model px
    return resample_window(_level_reader(slide, level), (oy, ox), (h, w), scale)


def resample_window(
    read_level: Callable[[int, int, int, int], np.ndarray],
    origin_yx: tuple[int, int],
    shape_hw: tuple[int, int],
    scale: float,
) -> np.ndarray:
    """Resize a window of one pyramid level to model px (the one resampler of the project).

    Parameters
    ----------
    read_level : callable
        ``read_level(y0, x0, y1, x1)`` -> ``(y1 - y0, x1 - x0, 3)`` uint8 RGB: level px
        ``[y0, y1) × [x0, x1)`` of the level, white outside the image.
    origin_yx : (int, int)
        Top-left model px (y, x) of the window (may be negative).
    shape_hw : (int, int)
        Size (h, w) of the window in model px.
    scale : float
        Level px per model px: model px ``(i, j)`` covers level px
        ``[i·scale, (i+1)·scale) × [j·scale, (j+1)·scale)``.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8 RGB. When ``scale`` is 1 (within 1e-6) the level px are returned
        as read; otherwise PIL's bilinear filter (antialiased: a triangle filter as wide as the
        downsampling) resizes exactly the box of the window, read with a margin of
        ``ceil(2·max(scale, 1)) + 2`` level px so the filter never reaches the crop's edge.
    """
    from PIL import Image

    oy, ox = origin_yx
    h, w = shape_hw
    if abs(scale - 1.0) < 1e-6:
        return read_level(oy, ox, oy + h, ox + w)
    ly0, lx0, ly1, lx1 = oy * scale, ox * scale, (oy + h) * scale, (ox + w) * scale
    pad = math.ceil(2 * max(scale, 1.0)) + 2
    iy0, ix0 = math.floor(ly0) - pad, math.floor(lx0) - pad
    iy1, ix1 = math.ceil(ly1) + pad, math.ceil(lx1) + pad
    crop = Image.fromarray(read_level(iy0, ix0, iy1, ix1))
    box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def _level_reader(slide: Slide, level: int) -> Callable[[int, int, int, int], np.ndarray]:
    """``read(y0, x0, y1, x1)`` of level px of ``level`` through :meth:`Slide.read_region`."""
    d = slide.downsamples[level]

    def read(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        box = (round(y0 * d), round(x0 * d), round(y1 * d), round(x1 * d))
        return _fit(slide.read_region(box, level), y1 - y0, x1 - x0)

    return read


def _fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Crop or white-pad an image to exactly (h, w) (guards ±1 px rounding of odd levels)."""
    if img.shape[0] == h and img.shape[1] == w:
        return img
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    hh, ww = min(h, img.shape[0]), min(w, img.shape[1])
    out[:hh, :ww] = img[:hh, :ww]
    return out
