"""Open H&E slides as lazy multiscale RGB arrays with their µm per pixel.

:func:`open_slide` returns a :class:`Slide`: a tuple of dask arrays, one per pyramid level,
each ``(y, x, 3)`` ``uint8`` RGB with level 0 (full resolution) first, plus the µm per level-0
pixel (``mpp``) and where that value came from.

Formats
-------
- TIFF family (``.tif``, ``.tiff``, ``.ome.tif``, ``.svs``, ``.btf``, ``.tf8``, ``.tf2``,
  ``.ndpi``, ``.scn``, ``.qptiff``), read through tifffile's zarr store: pyramidal OME-TIFF
  (levels as SubIFDs or as reduced-resolution pages, i.e. tifffile's series levels), Aperio
  SVS (only the main series: label, macro and thumbnail images are left out), and plain tiled
  or stripped TIFF / BigTIFF. Uncompressed contiguous images stored as one huge block are
  memory-mapped so that they can still be read in chunks.
- JPEG and PNG (for small images), decoded on demand through :func:`dask.delayed`.

Pixels are normalised lazily: grayscale becomes RGB (the channel repeated), an alpha channel
is dropped, other integer types are scaled to ``uint8`` (``65535 -> 255``; floats are taken to
be in ``[0, 1]``). A file without a pyramid (or whose coarsest level is still large) gets a
lazily computed one: 2 × 2 means, level by level, until the longest side is below
:data:`PYRAMID_MIN_PX`, so a viewer never pulls the full resolution to draw an overview.
Opening reads only the file's metadata and one small chunk (to catch truncated files early);
no pixels of the image are held in memory.

µm per pixel, first found wins: the user's ``mpp=``; OME ``PhysicalSizeX`` (with its unit);
the SVS ``MPP = …`` field; the TIFF ``XResolution`` / ``ResolutionUnit`` tags (print
defaults such as 72 dpi and unit "none" are ignored). Values outside
:data:`PLAUSIBLE_MPP_UM` are ignored. When nothing is known, :data:`UNKNOWN_MPP_FALLBACK` is
used and a :class:`~napari_stmap.core.errors.StmapInputWarning` says how to pass the value.

Resampling: :func:`read_at_mpp` reads any window of the slide at a model's µm/px (model px
``(i, j)`` covers level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)``, ``f = mpp / slide.mpp``);
:func:`resample_window` is the one resize behind it and behind the engine's tile reader.

File handles: the TIFF stays open for the life of the :class:`Slide` (the zarr store behind
the dask arrays reads tiles on demand through one shared, locked file handle); it is closed
when the slide and its arrays are garbage collected. The dask graphs therefore hold an open
file: on a ``dask.distributed`` cluster, open the slide on each worker from its path.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr

from ..errors import StmapInputError, StmapInputWarning

__all__ = [
    "PLAUSIBLE_MPP_UM",
    "PYRAMID_MIN_PX",
    "SUPPORTED_SUFFIXES",
    "UNKNOWN_MPP_FALLBACK",
    "Slide",
    "model_px_per_level0",
    "open_slide",
    "read_at_mpp",
    "resample_window",
]

log = logging.getLogger(__name__)

#: µm/px used when the file declares none (a :class:`StmapInputWarning` says so).
UNKNOWN_MPP_FALLBACK: float = 1.0
#: µm/px a file's metadata may plausibly declare for microscopy (others are ignored).
PLAUSIBLE_MPP_UM: tuple[float, float] = (0.05, 50.0)
#: µm/px a user may pass with ``mpp=`` / ``--mpp``.
USER_MPP_RANGE_UM: tuple[float, float] = (0.01, 1000.0)
#: A computed pyramid adds levels until the longest side is below this many px.
PYRAMID_MIN_PX: int = 1024

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn", ".qptiff")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + RASTER_SUFFIXES

_CHUNK_PX = 1024  # target chunk side of the dask levels, px
_MAX_DISPLAY_CHUNK_PX = 4096  # wider chunks (full-width strips) are split for display
_MAX_CHUNK_BYTES = 32 * 2**20  # above this a native block is memory-mapped or warned about
_AUX_SERIES = ("label", "macro", "thumbnail", "overview")
_UNIT_UM = {  # OME length units -> µm
    **dict.fromkeys(("µm", "μm", "um", "micron"), 1.0),
    **{"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6},
}
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit: inch, cm, mm, µm
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([-+0-9.eE]+)")
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


@dataclass(frozen=True, eq=False)
class Slide:
    """A lazy multiscale H&E slide.

    Attributes
    ----------
    path : Path
        The file.
    levels : tuple of dask.array.Array
        Pyramid levels, level 0 (full resolution) first; each ``(y, x, 3)`` ``uint8`` RGB.
    mpp : float
        µm per level-0 pixel.
    mpp_source : str
        Where ``mpp`` came from: ``"user"``, ``"ome"``, ``"svs"``, ``"tiff-resolution"`` or
        ``"fallback"`` (unknown; :data:`UNKNOWN_MPP_FALLBACK`).

    Notes
    -----
    For TIFF files the arrays read from the open file on demand (see the module notes).
    Slides compare by identity.
    """

    path: Path
    levels: tuple[da.Array, ...]
    mpp: float
    mpp_source: str

    def __post_init__(self) -> None:
        if not self.levels:
            msg = "Slide needs at least one level"
            raise ValueError(msg)

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Level-0 size ``(H, W)`` in px."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def n_levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    @property
    def downsamples(self) -> tuple[float, ...]:
        """Level-0 size over each level's size (level 0: ``1.0``; always ``>= 1``).

        The integer factor (2, 4, 16 …) when the level's (y, x) size is level 0's divided by
        it and rounded either way, else the mean of the y and x ratios (as OpenSlide does).
        """
        shape0 = self.levels[0].shape[:2]
        return tuple(_level_downsample(shape0, lvl.shape[:2]) for lvl in self.levels)

    def level_mpp(self, level: int) -> float:
        """µm per pixel of ``level``."""
        return self.mpp * self.downsamples[self._check_level(level)]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """Coarsest level whose µm/px is at most ``target_mpp`` (within 0.1 %).

        Reading that level and resizing it to ``target_mpp`` never upsamples. Returns 0 when
        even level 0 is coarser than ``target_mpp``.
        """
        if not (math.isfinite(target_mpp) and target_mpp > 0):
            msg = f"target_mpp must be a positive number of µm/px, got {target_mpp!r}"
            raise ValueError(msg)
        limit = target_mpp * (1 + 1e-3)
        best = 0
        for level in range(self.n_levels):
            if self.level_mpp(level) <= limit:
                best = level
        return best

    def read_region(self, bbox_yx: tuple[int, int, int, int], level: int = 0) -> np.ndarray:
        """Read a crop of ``level`` covering a box given in level-0 px.

        Parameters
        ----------
        bbox_yx : (y0, x0, y1, x1)
            Box in level-0 px, ``y1``/``x1`` exclusive; may extend beyond the image.
        level : int
            Pyramid level to read from.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` ``uint8`` RGB, axes (y, x, c). With ``d = downsamples[level]`` the
            crop starts at level px ``round(y0 / d)`` and has ``round((y1 - y0) / d)`` rows
            (at least 1 for a non-empty box), likewise for x, so equal boxes give equal
            shapes. Parts outside the image are white (255).
        """
        arr = self.levels[self._check_level(level)]
        d = self.downsamples[level]
        (ly0, ly1), (lx0, lx1) = (_level_span(a, b, d) for a, b in _bbox_pairs(bbox_yx))
        out = np.full((ly1 - ly0, lx1 - lx0, 3), 255, dtype=np.uint8)
        sy0, sy1 = max(ly0, 0), min(ly1, arr.shape[0])
        sx0, sx1 = max(lx0, 0), min(lx1, arr.shape[1])
        if sy1 > sy0 and sx1 > sx0:
            crop = np.asarray(arr[sy0:sy1, sx0:sx1].compute(scheduler="threads"))
            out[sy0 - ly0 : sy1 - ly0, sx0 - lx0 : sx1 - lx0] = crop
        return out

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """Whole-slide overview whose longest side is at most ``max_px`` px.

        Computed from the coarsest level that is at least ``max_px`` on its longest side (the
        full level 0 only when the slide itself is that small), then box-downsampled.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` ``uint8`` RGB, axes (y, x, c).
        """
        from PIL import Image

        if max_px < 1:
            msg = f"max_px must be >= 1, got {max_px!r}"
            raise ValueError(msg)
        level = 0
        for i, lvl in enumerate(self.levels):
            if max(lvl.shape[:2]) >= max_px:
                level = i
        img = np.asarray(self.levels[level].compute(scheduler="threads"))
        scale = max_px / max(img.shape[:2])
        if scale >= 1:
            return img
        size_xy = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        return np.asarray(Image.fromarray(img).resize(size_xy, Image.Resampling.BOX))

    def _check_level(self, level: int) -> int:
        if not 0 <= level < self.n_levels:
            msg = f"level must be in 0..{self.n_levels - 1}, got {level!r}"
            raise IndexError(msg)
        return level


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open an H&E slide lazily.

    Parameters
    ----------
    path : str or Path
        TIFF / OME-TIFF / SVS / BigTIFF, JPEG or PNG file.
    mpp : float, optional
        µm per level-0 pixel; overrides what the file declares.

    Returns
    -------
    Slide
        Levels ``(y, x, 3)`` ``uint8`` as dask arrays (nothing is read yet), µm/px and its
        source.

    Raises
    ------
    StmapInputError
        Missing file, a folder, an unsupported type, a truncated or corrupt file, an image
        that is not RGB/grayscale, or an implausible ``mpp``.

    Warns
    -----
    StmapInputWarning
        When the µm/px is unknown and :data:`UNKNOWN_MPP_FALLBACK` is used.
    """
    path = _check_path(path)
    user_mpp = None if mpp is None else _check_user_mpp(mpp, path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        file_levels, file_mpp, notes = [_open_raster(path)], None, []
    else:
        file_levels, file_mpp, notes = _open_tiff(path)
    levels = _pyramid(file_levels)
    value, source = _choose_mpp(path, user_mpp, file_mpp, notes)
    slide = Slide(path=path, levels=levels, mpp=value, mpp_source=source)
    log.info(
        "opened %s: %d x %d px (y, x), %d levels (%d in the file), %.4g µm/px (%s)",
        path,
        *slide.shape_yx,
        slide.n_levels,
        len(file_levels),
        value,
        source,
    )
    return slide


# --- reading at a model's µm/px ------------------------------------------------------------


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


# --- checks -------------------------------------------------------------------------------


def _check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        msg = f"{path}: no such file; check the path"
        raise StmapInputError(msg)
    if path.is_dir():
        msg = f"{path}: is a folder, not a slide; pass the image file itself (e.g. he.ome.tif)"
        raise StmapInputError(msg)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        kinds = ", ".join(SUPPORTED_SUFFIXES)
        msg = (
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; open one of "
            f"{kinds} (convert other formats to a tiled pyramidal TIFF, e.g. with vips)"
        )
        raise StmapInputError(msg)
    return path


def _check_user_mpp(mpp: float, path: Path) -> float:
    lo, hi = USER_MPP_RANGE_UM
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(mpp, bool) or not (math.isfinite(value) and lo <= value <= hi):
        msg = (
            f"{path}: mpp={mpp!r} is not a plausible µm per pixel (expected {lo:g}-{hi:g}, "
            "e.g. 0.25 for a 40x scan, 0.5 for 20x); pass the slide's µm/px with --mpp"
        )
        raise StmapInputError(msg)
    return value


def _corrupt_msg(path: Path, exc: BaseException) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (
        f"{path}: cannot read this image ({type(exc).__name__}: {detail}); the file looks "
        "truncated or corrupt: copy or export it again"
    )


# --- TIFF ---------------------------------------------------------------------------------


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


# --- µm per pixel -------------------------------------------------------------------------


def _choose_mpp(
    path: Path, user: float | None, found: tuple[float, str] | None, notes: list[str]
) -> tuple[float, str]:
    """(mpp, source): the user's value, else the file's, else the fallback with a warning."""
    if user is not None:
        if found is not None and not math.isclose(user, found[0], rel_tol=1e-3):
            log.info("%s: mpp=%g overrides the file's %g µm/px (%s)", path, user, *found)
        return user, "user"
    if found is not None:
        return found
    ignored = f"; ignored: {', '.join(notes)}" if notes else ""
    msg = (
        f"{path.name}: µm per pixel unknown (no OME PhysicalSizeX, SVS MPP or TIFF resolution"
        f"{ignored}); using UNKNOWN_MPP_FALLBACK = {UNKNOWN_MPP_FALLBACK:g} µm/px, so µm "
        "values are really pixels: pass the true value with --mpp (CLI) or "
        "open_slide(..., mpp=...)"
    )
    warnings.warn(msg, StmapInputWarning, stacklevel=3)
    return UNKNOWN_MPP_FALLBACK, "fallback"


def _tiff_mpp(
    tf: tifffile.TiffFile, index: int, series: tifffile.TiffPageSeries, notes: list[str]
) -> tuple[float, str] | None:
    """First plausible µm/px among OME, SVS and the resolution tags; others go to ``notes``."""
    page = series.keyframe
    candidates = (
        ("ome", lambda: _ome_mpp(tf.ome_metadata, index) if tf.is_ome else None),
        ("svs", lambda: _svs_mpp(page.description)),
        ("tiff-resolution", lambda: _resolution_mpp(tf, page, notes)),
    )
    lo, hi = PLAUSIBLE_MPP_UM
    for source, read in candidates:
        value = read()
        if value is None:
            continue
        if lo <= value <= hi:
            return value, source
        notes.append(f"{source} {value:g} µm/px (implausible)")
        log.warning("%s: ignoring implausible %s µm/px %g", tf.filehandle.path, source, value)
    return None


def _ome_mpp(xml: str | None, index: int) -> float | None:
    """``PhysicalSizeX`` of OME Image ``index`` in µm (unit default µm), or None."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("OME-XML does not parse; ignoring it")
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None
    image = images[index] if index < len(images) else images[0]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm").strip()
    if unit not in _UNIT_UM:
        log.warning("OME PhysicalSizeXUnit %r is not a length unit; ignoring it", unit)
        return None
    try:
        return float(pixels.get("PhysicalSizeX")) * _UNIT_UM[unit]
    except ValueError:
        return None


def _svs_mpp(description: str | None) -> float | None:
    """The ``MPP = 0.4990`` field of an Aperio ImageDescription, in µm, or None."""
    match = _SVS_MPP.search(description or "")
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def _resolution_mpp(
    tf: tifffile.TiffFile, page: tifffile.TiffPage, notes: list[str]
) -> float | None:
    """µm/px from XResolution + ResolutionUnit; None for missing tags and print defaults."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    per_unit = float(num) / float(den) if den else 0.0
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if unit == 1 and (tf.imagej_metadata or {}).get("unit") in ("micron", "µm", "um", "\\u00B5m"):
        unit = 5  # ImageJ: unit "none" in the tag, micron in its description
    if per_unit <= 0 or unit not in _RESUNIT_UM:
        return None
    if unit == 2 and per_unit <= 1200 and per_unit == int(per_unit):
        notes.append(f"TIFF resolution {per_unit:g} dpi (a screen/print default)")
        return None
    return _RESUNIT_UM[unit] / per_unit
