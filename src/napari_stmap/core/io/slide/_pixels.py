"""Pixels of a slide: JPEG/PNG rasters, conversion to RGB ``uint8``, the lazy pyramid.

Every level leaves here as a lazy dask array ``(y, x, 3)`` ``uint8`` RGB (axes y, x, c):
grayscale is repeated, alpha dropped, other types scaled. The computed pyramid adds 2 x 2
means until the longest side is below :data:`PYRAMID_MIN_PX`; chunks stay near
``_CHUNK_PX`` px. Also the level-0 px <-> level px arithmetic of :class:`Slide`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from ...errors import StmapInputError

log = logging.getLogger(__name__)

#: A computed pyramid adds levels until the longest side is below this many px.
PYRAMID_MIN_PX: int = 1024

_CHUNK_PX = 1024  # target chunk side of the dask levels, px
_MAX_DISPLAY_CHUNK_PX = 4096  # wider chunks (full-width strips) are split for display


def _corrupt_msg(path: Path, exc: BaseException) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (
        f"{path}: cannot read this image ({type(exc).__name__}: {detail}); the file looks "
        "truncated or corrupt: copy or export it again"
    )


def _file_token(path: Path) -> str:
    stat = path.stat()
    return dask.base.tokenize(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# --- JPEG / PNG ---------------------------------------------------------------------------


def _open_raster(path: Path) -> da.Array:
    """A JPEG/PNG as a lazy (y, x, 3) uint8 dask array (decoded when first computed)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode, (width, height) = img.mode, img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StmapInputError(_corrupt_msg(path, exc)) from exc
    target, channels, dtype = _raster_plan(mode)
    shape = (height, width) if channels == 1 else (height, width, channels)
    token = _file_token(path)
    load = dask.delayed(_read_raster, pure=True)(str(path), target, dtype.str)
    arr = da.from_delayed(load, shape=shape, dtype=dtype, name=f"stmap-raster-{token}")
    axes = "YX" if channels == 1 else "YXS"
    return _to_rgb_uint8(arr, axes, None, path)


def _raster_plan(mode: str) -> tuple[str | None, int, np.dtype]:
    """(PIL mode to convert to or None, channels, dtype) for a PIL image mode."""
    if mode in ("L", "RGB", "RGBA", "LA"):
        return None, {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode], np.dtype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        return None, 1, np.dtype(np.uint16)
    if mode == "1":
        return "L", 1, np.dtype(np.uint8)
    return "RGB", 3, np.dtype(np.uint8)


def _read_raster(path: str, target: str | None, dtype: str) -> np.ndarray:
    """Decode a JPEG/PNG into (y, x[, c]) of ``dtype`` (called by dask)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if target is not None:
                img = img.convert(target)
            data = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise StmapInputError(_corrupt_msg(Path(path), exc)) from exc
    if np.dtype(dtype) == np.uint16:
        data = np.clip(data, 0, 65535)
    return data.astype(dtype, copy=False)


# --- pixel normalisation ------------------------------------------------------------------


def _to_rgb_uint8(arr: da.Array, axes: str, max_value: int | None, path: Path) -> da.Array:
    """Any (…, Y, X, …) image with tifffile ``axes`` -> (y, x, 3) uint8 RGB, lazily."""
    arr = _to_yxc(arr, axes, path)
    channels = arr.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        arr = da.concatenate([arr[:, :, :1]] * 3, axis=2)
    elif channels == 4:  # RGBA
        arr = arr[:, :, :3]
    elif channels != 3:
        msg = (
            f"{path}: image has {channels} channels; stmap needs a brightfield RGB (or "
            "grayscale) H&E image: export the RGB image"
        )
        raise StmapInputError(msg)
    arr = _to_uint8(arr, max_value, path)
    return arr.rechunk({2: -1})


def _to_yxc(arr: da.Array, axes: str, path: Path) -> da.Array:
    """Select plane 0 of extra axes (Z, T, …) and order as (y, x, c) with c >= 1."""
    if "Y" not in axes or "X" not in axes:
        msg = f"{path}: image axes {axes!r} have no Y and X; export a 2-D RGB image"
        raise StmapInputError(msg)
    index: list[int | slice] = []
    kept = ""
    for ax, n in zip(axes, arr.shape, strict=True):
        if ax in "YXSC":
            index.append(slice(None))
            kept += ax
        else:
            if n > 1:
                log.warning("%s: axis %s has %d planes; using the first", path, ax, n)
            index.append(0)
    arr = arr[tuple(index)]
    channel_axes = [ax for ax in kept if ax in "SC"]
    if len(channel_axes) == 2:  # samples within channels: keep the samples of channel 0
        arr = arr[tuple(0 if ax == "C" else slice(None) for ax in kept)]
        kept = kept.replace("C", "")
        channel_axes = ["S"]
    if not channel_axes:
        return arr.transpose(kept.index("Y"), kept.index("X"))[:, :, None]
    return arr.transpose(kept.index("Y"), kept.index("X"), kept.index(channel_axes[0]))


def _to_uint8(arr: da.Array, max_value: int | None, path: Path) -> da.Array:
    """Scale integer/float/bool pixels to uint8 lazily (integers: 0..max -> 0..255)."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind in "ui":
        top = max_value or int(np.iinfo(arr.dtype).max)
        return arr.map_blocks(_scale_block, float(top), dtype=np.uint8)
    if kind == "f":
        log.warning("%s: floating-point pixels are taken to be in [0, 1]", path)
        return arr.map_blocks(_scale_block, 1.0, dtype=np.uint8)
    msg = f"{path}: pixel type {arr.dtype} is not supported; export an 8- or 16-bit RGB image"
    raise StmapInputError(msg)


def _scale_block(block: np.ndarray, top: float) -> np.ndarray:
    values = np.clip(block.astype(np.float64), 0.0, top)
    return np.rint(values * (255.0 / top)).astype(np.uint8)


# --- pyramid ------------------------------------------------------------------------------


def _pyramid(file_levels: list[da.Array]) -> tuple[da.Array, ...]:
    """File levels, extended by 2 x 2 means until the longest side < PYRAMID_MIN_PX."""
    levels = [_merge_chunks(a) for a in file_levels]
    while max(levels[-1].shape[:2]) >= PYRAMID_MIN_PX and min(levels[-1].shape[:2]) >= 2:
        levels.append(_halve(levels[-1]))
    if len(levels) > len(file_levels):
        log.debug("computed %d extra levels", len(levels) - len(file_levels))
    return tuple(_display_chunks(a) for a in levels)


def _merge_chunks(arr: da.Array) -> da.Array:
    """Rechunk (y, x) to multiples of the current chunks near _CHUNK_PX (even sizes)."""
    new = {}
    for axis in (0, 1):
        native, size = arr.chunks[axis][0], arr.shape[axis]
        target = max(1, round(_CHUNK_PX / native)) * native
        if target % 2:
            target += native
        new[axis] = min(target, size) if native < size else size
    return arr.rechunk(new)


def _halve(arr: da.Array) -> da.Array:
    """2 x 2 mean (rounded) of a (y, x, 3) uint8 array; an odd last row/column is dropped."""
    height, width = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
    arr = arr[:height, :width]
    even = {axis: arr.chunks[axis][0] + arr.chunks[axis][0] % 2 for axis in (0, 1)}
    arr = arr.rechunk(even)
    total = da.coarsen(np.sum, arr.astype(np.uint16), {0: 2, 1: 2}, dtype=np.uint16)
    return _merge_chunks(((total + 2) // 4).astype(np.uint8))


def _display_chunks(arr: da.Array) -> da.Array:
    """Split very wide chunks (full-width strips) so a view reads a few MB at a time."""
    new = {axis: _CHUNK_PX * 2 for axis in (0, 1) if arr.chunks[axis][0] > _MAX_DISPLAY_CHUNK_PX}
    return arr.rechunk(new) if new else arr


def _level_downsample(shape0: tuple[int, ...], shape: tuple[int, ...]) -> float:
    """Level-0 size over a level's size: an exact integer factor when it fits both axes."""
    ratios = [n0 / n for n0, n in zip(shape0[:2], shape[:2], strict=True)]
    mean = sum(ratios) / 2
    factor = round(mean)
    if factor >= 1 and all(
        n in (n0 // factor, -(-n0 // factor)) for n0, n in zip(shape0[:2], shape[:2], strict=True)
    ):
        return float(factor)
    return max(1.0, mean)


def _bbox_pairs(bbox_yx: tuple[int, int, int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    y0, x0, y1, x1 = (int(v) for v in bbox_yx)
    if y1 < y0 or x1 < x0:
        msg = f"bbox_yx must be (y0, x0, y1, x1) with y1 >= y0 and x1 >= x0, got {bbox_yx!r}"
        raise ValueError(msg)
    return (y0, y1), (x0, x1)


def _level_span(start: int, stop: int, d: float) -> tuple[int, int]:
    """Level px [a, b) for level-0 px [start, stop) at downsample ``d``."""
    first = math.floor(start / d + 0.5)
    size = 0 if stop == start else max(1, math.floor((stop - start) / d + 0.5))
    return first, first + size
