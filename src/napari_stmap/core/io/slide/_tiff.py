"""Open TIFF-family files (OME-TIFF, SVS, BigTIFF …) through tifffile's zarr store.

Picks the main series (not label/macro/thumbnail), checks that no tile lies past the end of
the file, wraps each level as a lazy dask array (memory-mapped when stored as one huge block)
and decodes one small chunk to fail early on a damaged file. The file stays open for the life
of the arrays.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr

from ...errors import StmapInputError
from ._mpp import _tiff_mpp
from ._pixels import _CHUNK_PX, _corrupt_msg, _file_token, _to_rgb_uint8

log = logging.getLogger(__name__)

_MAX_CHUNK_BYTES = 32 * 2**20  # above this a native block is memory-mapped or warned about
_AUX_SERIES = ("label", "macro", "thumbnail", "overview")
_READ_ERRORS = (  # what tifffile, zarr and the codecs raise on a damaged file
    tifffile.TiffFileError,
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
)


def _open_tiff(path: Path) -> tuple[list[da.Array], tuple[float, str] | None, list[str]]:
    """File levels (RGB uint8 dask), the file's (mpp, source) if any, notes on ignored mpp."""
    try:
        tf = tifffile.TiffFile(path)
    except _READ_ERRORS as exc:
        raise StmapInputError(_corrupt_msg(path, exc)) from exc
    try:
        index, series = _main_series(tf, path)
        _check_complete(tf, series, path)
        levels = _tiff_levels(tf, index, series, path)
        notes: list[str] = []
        file_mpp = _tiff_mpp(tf, index, series, notes)
    except StmapInputError:
        tf.close()
        raise
    except _READ_ERRORS as exc:
        tf.close()
        raise StmapInputError(_corrupt_msg(path, exc)) from exc
    return levels, file_mpp, notes


def _main_series(tf: tifffile.TiffFile, path: Path) -> tuple[int, tifffile.TiffPageSeries]:
    """The slide image: the first series that is not a label, macro or thumbnail."""
    for index, series in enumerate(tf.series):
        name = (series.name or "").strip().lower()
        if name not in _AUX_SERIES and len(series.shape) >= 2:
            log.debug("%s: series %d %r axes %s %s", path, index, name, series.axes, series.shape)
            return index, series
    if not tf.series:
        msg = f"{path}: no readable image in this TIFF (corrupt or truncated header); export the file again"
    else:
        msg = f"{path}: no image found in this TIFF (only label/macro/thumbnail); check the file"
    raise StmapInputError(msg)


def _check_complete(tf: tifffile.TiffFile, series: tifffile.TiffPageSeries, path: Path) -> None:
    """Raise when tiles or strips of any level lie beyond the end of the file (truncated)."""
    size = tf.filehandle.size
    for lvl in series.levels:
        for page in lvl.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size and int((offsets + counts)[counts > 0].max(initial=0)) > size:
                msg = (
                    f"{path}: truncated TIFF (image data ends past the file's {size} bytes); "
                    "copy or export the file again"
                )
                raise StmapInputError(msg)


def _tiff_levels(
    tf: tifffile.TiffFile, index: int, series: tifffile.TiffPageSeries, path: Path
) -> list[da.Array]:
    """The series' pyramid levels as lazy (y, x, 3) uint8 dask arrays."""
    root = zarr.open(series.aszarr(), mode="r")
    if isinstance(root, zarr.Group):
        arrays = [root[str(i)] for i in range(len(series.levels))]
    else:
        arrays = [root]
    axes = series.axes
    if len(axes) != arrays[0].ndim:
        axes = series.get_axes(squeeze=False)
    _smoke_read(arrays[-1], path)
    max_value = _max_value(series.keyframe, series.dtype)
    token = _file_token(path)
    levels = []
    for i, arr in enumerate(arrays):
        raw = _level_array(arr, path, index, i, f"stmap-slide-{token}-s{index}-l{i}")
        levels.append(_to_rgb_uint8(raw, axes, max_value, path))
    return levels


def _level_array(arr: zarr.Array, path: Path, index: int, level: int, name: str) -> da.Array:
    """One level as dask, chunked like the file (memory-mapped if stored as one huge block)."""
    chunk_bytes = math.prod(arr.chunks) * arr.dtype.itemsize
    if chunk_bytes <= _MAX_CHUNK_BYTES:
        return da.from_array(arr, chunks=arr.chunks, name=name, lock=False, fancy=False)
    try:
        mm = tifffile.memmap(path, series=index, level=level, mode="r")
    except ValueError:  # compressed or not contiguous: cannot be split without decoding
        log.warning(
            "%s: level %d is stored as one %d MiB block; every read decodes all of it "
            "(convert to a tiled pyramidal TIFF for speed)",
            path,
            level,
            chunk_bytes // 2**20,
        )
        return da.from_array(arr, chunks=arr.chunks, name=name, lock=False, fancy=False)
    chunks = tuple(min(n, _CHUNK_PX) if n > 8 else n for n in mm.shape)
    log.debug("%s: level %d memory-mapped, chunks %s", path, level, chunks)
    return da.from_array(mm, chunks=chunks, name=name + "-mm", lock=False, fancy=False)


def _smoke_read(arr: zarr.Array, path: Path) -> None:
    """Decode the last chunk of ``arr`` (a coarse level) to fail early on bad data or codecs."""
    if math.prod(arr.chunks) * arr.dtype.itemsize > _MAX_CHUNK_BYTES:
        return
    corner = tuple(
        slice((n - 1) // c * c, n) if n else slice(0, 0)
        for n, c in zip(arr.shape, arr.chunks, strict=True)
    )
    try:
        arr[corner]
    except _READ_ERRORS as exc:
        raise StmapInputError(_corrupt_msg(path, exc)) from exc


def _max_value(page: tifffile.TiffPage, dtype: np.dtype) -> int | None:
    """Largest pixel value of an unsigned integer image (BitsPerSample may be < the dtype)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "u":
        return None
    bits = int(getattr(page, "bitspersample", 0) or 0)
    if 0 < bits < dtype.itemsize * 8:
        return (1 << bits) - 1
    return int(np.iinfo(dtype).max)
