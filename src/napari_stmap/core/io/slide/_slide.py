"""The :class:`Slide` (lazy levels plus µm/px) and :func:`open_slide`, with its argument checks.

:func:`open_slide` checks the path, ``mpp=`` and ``backend=``, opens the file (TIFF family
through :mod:`._tiff`, vendor formats through :mod:`._openslide`, JPEG/PNG through
:mod:`._pixels`), completes the pyramid and settles the µm/px (:mod:`._mpp`).

Which reader (``backend="auto"``): JPEG/PNG -> Pillow; ``.mrxs``, ``.vms``, ``.vmu``,
``.bif``, ``.svslide``, ``.dcm`` -> OpenSlide (tifffile cannot read them, or cannot stitch
their overlapping tiles); the TIFF family -> tifffile (it reads the tiles straight from the
file: faster, no RGBA copy), except a file OpenSlide recognises as Leica, Philips, Ventana or
Trestle (their regions, sparse or overlapping tiles need OpenSlide's layout), and except a
TIFF that tifffile cannot read but OpenSlide can (then OpenSlide, logged). Without OpenSlide
installed, "auto" reads the TIFF family with tifffile as before.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from ...errors import StmapInputError
from ._mpp import _choose_mpp
from ._openslide import OPENSLIDE_INSTALL, OPENSLIDE_VENDORS, _detect_vendor, _open_openslide
from ._openslide import openslide_available as _openslide_available
from ._pixels import _bbox_pairs, _level_downsample, _level_span, _open_raster, _pyramid
from ._tiff import _open_tiff

log = logging.getLogger(__name__)

#: µm/px a user may pass with ``mpp=`` / ``--mpp``.
USER_MPP_RANGE_UM: tuple[float, float] = (0.01, 1000.0)

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn", ".qptiff")
#: Formats only OpenSlide reads: MIRAX, Hamamatsu VMS/VMU, Ventana BIF, Sakura, DICOM WSI.
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + RASTER_SUFFIXES
#: ``backend=`` values of :func:`open_slide` (``--backend`` in the CLI).
BACKENDS = ("auto", "tifffile", "openslide")


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
        Where ``mpp`` came from: ``"user"``, ``"ome"``, ``"svs"``, ``"tiff-resolution"``,
        ``"openslide"`` (OpenSlide's ``openslide.mpp-x``) or ``"fallback"`` (unknown;
        :data:`UNKNOWN_MPP_FALLBACK`).
    backend : str
        The reader behind ``levels``: ``"tifffile"``, ``"openslide"`` or ``"pillow"``
        (JPEG/PNG).

    Notes
    -----
    For TIFF and OpenSlide files the arrays read from the open file on demand (see the notes
    of :mod:`napari_stmap.core.io.slide`).
    Slides compare by identity.
    """

    path: Path
    levels: tuple[da.Array, ...]
    mpp: float
    mpp_source: str
    backend: str = "tifffile"

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


def open_slide(path: str | Path, *, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open an H&E slide lazily.

    Parameters
    ----------
    path : str or Path
        TIFF / OME-TIFF / SVS / BigTIFF / NDPI / SCN / Philips TIFF, MIRAX ``.mrxs`` (next to
        its folder), Hamamatsu ``.vms`` / ``.vmu``, Ventana ``.bif``, Sakura ``.svslide``,
        DICOM WSI ``.dcm``, JPEG or PNG file.
    mpp : float, optional
        µm per level-0 pixel; overrides what the file declares.
    backend : {"auto", "tifffile", "openslide"}
        Reader: ``"auto"`` picks tifffile for the TIFF family it lays out natively and
        OpenSlide for the rest (see the module notes); ``"tifffile"`` (JPEG/PNG: Pillow) and
        ``"openslide"`` force one. OpenSlide needs ``pip install "napari-stmap[openslide]"``.

    Returns
    -------
    Slide
        Levels ``(y, x, 3)`` ``uint8`` as dask arrays (nothing is read yet), µm/px and its
        source.

    Raises
    ------
    StmapInputError
        Missing file, a folder, an unsupported type, a truncated or corrupt file, a file no
        reader can open, an image that is not RGB/grayscale, an implausible ``mpp``, an
        unknown ``backend``, or OpenSlide needed but not installed.

    Warns
    -----
    StmapInputWarning
        When the µm/px is unknown and :data:`UNKNOWN_MPP_FALLBACK` is used.
    """
    backend = _check_backend(backend)
    path = _check_path(path)
    user_mpp = None if mpp is None else _check_user_mpp(mpp, path)
    file_levels, file_mpp, notes, used = _open_levels(path, backend)
    levels = _pyramid(file_levels)
    value, source = _choose_mpp(path, user_mpp, file_mpp, notes)
    slide = Slide(path=path, levels=levels, mpp=value, mpp_source=source, backend=used)
    log.info(
        "opened %s with %s: %d x %d px (y, x), %d levels (%d in the file), %.4g µm/px (%s)",
        path,
        used,
        *slide.shape_yx,
        slide.n_levels,
        len(file_levels),
        value,
        source,
    )
    return slide


def _open_levels(
    path: Path, backend: str
) -> tuple[list[da.Array], tuple[float, str] | None, list[str], str]:
    """(file levels, file mpp, mpp notes, backend used) by the rules of the module notes."""
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        if backend == "openslide":
            msg = (
                f"{path}: OpenSlide does not read {suffix} images; use backend 'auto' or 'tifffile'"
            )
            raise StmapInputError(msg)
        return [_open_raster(path)], None, [], "pillow"
    if backend == "tifffile" and suffix in OPENSLIDE_SUFFIXES:
        msg = (
            f"{path}: tifffile cannot read {suffix} slides; use backend 'openslide' or 'auto' "
            f"(needs {OPENSLIDE_INSTALL})"
        )
        raise StmapInputError(msg)
    if backend == "openslide" or (backend == "auto" and suffix in OPENSLIDE_SUFFIXES):
        return _via_openslide(path)
    if backend == "auto" and _openslide_available():
        vendor = _detect_vendor(path)
        if vendor in OPENSLIDE_VENDORS:
            log.info("%s: %s slide, read through OpenSlide", path, vendor)
            return _via_openslide(path)
        try:
            return (*_open_tiff(path), "tifffile")
        except StmapInputError as exc:
            if vendor is None:
                msg = f"{exc}; OpenSlide cannot read it either (supported: {_formats_text()})"
                raise StmapInputError(msg) from exc
            log.warning(
                "%s: tifffile cannot read it (%s); trying OpenSlide (%s)", path, exc, vendor
            )
            try:
                return _via_openslide(path)
            except StmapInputError:
                raise exc from None
    return (*_open_tiff(path), "tifffile")


def _via_openslide(path: Path) -> tuple[list[da.Array], tuple[float, str] | None, list[str], str]:
    levels, file_mpp, notes, _vendor = _open_openslide(path, _unreadable_msg(path))
    return levels, file_mpp, notes, "openslide"


def _unreadable_msg(path: Path) -> str:
    hint = (
        "; a MIRAX .mrxs needs its folder of the same name next to it"
        if path.suffix.lower() == ".mrxs"
        else ""
    )
    return (
        f"{path}: OpenSlide cannot read this file (not a slide it knows, or damaged){hint}; "
        f"supported: {_formats_text()}"
    )


def _formats_text() -> str:
    return (
        "TIFF family via tifffile (" + ", ".join(TIFF_SUFFIXES) + "); via OpenSlide: MIRAX "
        ".mrxs, Hamamatsu .ndpi/.vms/.vmu, Leica .scn, Ventana .bif, Philips TIFF, Sakura "
        ".svslide, DICOM WSI .dcm, Aperio .svs, generic tiled TIFF; JPEG/PNG"
    )


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        msg = (
            f"backend={backend!r} is not a slide reader; use one of "
            + ", ".join(repr(b) for b in BACKENDS)
            + " (--backend in the CLI)"
        )
        raise StmapInputError(msg)
    return backend


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
