"""Open vendor slides (MIRAX, NDPI, SCN, VMS/VMU, BIF, Philips TIFF …) through OpenSlide.

OpenSlide (``openslide-python`` with the library from the ``openslide-bin`` wheel, the
``[openslide]`` extra) is imported only when a slide needs it. Each pyramid level OpenSlide
reports becomes a lazy dask array ``(y, x, 3)`` ``uint8`` RGB (axes y, x, c) read block by
block with ``read_region``; transparent pixels (no scanned data: MIRAX gaps, areas outside
Leica/Philips regions) are composited over the slide's background colour (white unless the
file says otherwise), as OpenSlide advises. Coordinates are OpenSlide's own level-0 px (the
full slide area, not cropped to ``openslide.bounds-*``), so annotations made in other
OpenSlide-based tools (QuPath) line up.

Levels and downsamples: a level's array has OpenSlide's level size; :class:`~._slide.Slide`
derives its downsample from the sizes (the integer factor when the size is level 0's divided
by it, rounded either way, else the mean ratio), as for TIFF files. OpenSlide places level px
``x`` at level-0 px ``x · d`` with its own ``d`` (the mean size ratio for most formats, e.g.
``4.00012``); a block whose origin ``x · d`` is not a whole level-0 px is read from the
nearest whole px, and OpenSlide then interpolates by the remaining fraction (at most
``0.5 / d`` level px; none at level 0 or where ``d`` is an integer, as in MIRAX).

Threads: OpenSlide documents that one handle may be used from several threads at once without
locking; the handle is opened once per :class:`Slide` (under a lock, so threads see a fully
built object) and shared by every block of every level. It is closed when the last array that
reads from it is garbage collected (like the TIFF handle); pickling the arrays (dask
distributed) carries the path, and each process reopens the file.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import dask.array as da
import numpy as np

from ...errors import StmapInputError
from ._mpp import _openslide_mpp
from ._pixels import _CHUNK_PX, _corrupt_msg, _file_token

log = logging.getLogger(__name__)

#: ``pip`` command that installs OpenSlide (python binding + library wheel).
OPENSLIDE_INSTALL = 'pip install "napari-stmap[openslide]"'

#: OpenSlide vendors that tifffile cannot lay out itself (overlapping tiles, regions placed by
#: XML, sparse tiles): ``backend="auto"`` opens these TIFF-based files through OpenSlide.
OPENSLIDE_VENDORS = frozenset({"leica", "philips", "ventana", "trestle"})


def _openslide() -> ModuleType:
    """The ``openslide`` module, or a one-line error saying how to install it."""
    try:
        import openslide
    except ImportError as exc:  # not installed, or its library is missing
        msg = (
            f"OpenSlide is needed for this slide but cannot be imported ({exc}); install it "
            f"with {OPENSLIDE_INSTALL}"
        )
        raise StmapInputError(msg) from exc
    return openslide


def openslide_available() -> bool:
    """Whether OpenSlide (python binding and library) can be imported."""
    try:
        _openslide()
    except StmapInputError:
        return False
    return True


def _detect_vendor(path: Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (``"aperio"``, ``"mirax"`` …), or None."""
    openslide = _openslide()
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        return None


def _open_openslide(
    path: Path, unreadable: str
) -> tuple[list[da.Array], tuple[float, str] | None, list[str], str]:
    """File levels (RGB uint8 dask), the file's (mpp, source) if any, notes, vendor.

    ``unreadable`` is the message (one line) when OpenSlide cannot open the file.
    """
    openslide = _openslide()
    handle = _Handle(path)
    try:
        osr = handle.get()
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise StmapInputError(unreadable) from exc
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise StmapInputError(_corrupt_msg(path, exc)) from exc
    props = dict(osr.properties)
    vendor = props.get("openslide.vendor", "?")
    background = _background(props.get("openslide.background-color"))
    notes: list[str] = []
    file_mpp = _openslide_mpp(props, path, notes)
    token = _file_token(path)
    levels = []
    for level, (width, height) in enumerate(osr.level_dimensions):
        reader = _OpenSlideLevel(handle, level, (int(height), int(width)), background)
        levels.append(
            da.from_array(
                reader,
                chunks=(_CHUNK_PX, _CHUNK_PX, 3),
                name=f"stmap-openslide-{token}-l{level}",
                lock=False,
                fancy=False,
                asarray=True,
                meta=np.empty((0, 0, 3), dtype=np.uint8),
            )
        )
    _smoke_read(levels[-1], path)
    log.debug(
        "%s: OpenSlide vendor %s, levels %s, downsamples %s",
        path,
        vendor,
        osr.level_dimensions,
        osr.level_downsamples,
    )
    return levels, file_mpp, notes, vendor


def _background(value: str | None) -> np.ndarray:
    """RGB uint16 of OpenSlide's ``background-color`` (``"RRGGBB"``), white when absent."""
    try:
        text = (value or "").strip().lstrip("#")
        if len(text) == 6:
            return np.array([int(text[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint16)
    except ValueError:
        pass
    return np.array([255, 255, 255], dtype=np.uint16)


def _smoke_read(level: da.Array, path: Path) -> None:
    """Decode one block of ``level`` (a coarse one) to fail early on bad data."""
    corner = tuple(slice(0, min(c[0], 64)) for c in level.chunks[:2])
    try:
        level[corner].compute(scheduler="sync")
    except StmapInputError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # OpenSlideError is an Exception
        raise StmapInputError(_corrupt_msg(path, exc)) from exc


class _Handle:
    """One OpenSlide handle for a file, opened on first use (thread-safe), closed on GC.

    Pickles as its path (a new process opens its own handle).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._osr: Any = None

    def get(self) -> Any:
        osr = self._osr
        if osr is None:
            with self._lock:
                if self._osr is None:
                    self._osr = _openslide().OpenSlide(str(self.path))
                osr = self._osr
        return osr

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class _OpenSlideLevel:
    """Array-like ``(y, x, 3)`` uint8 view of one OpenSlide level, for :func:`dask.array.from_array`.

    ``self[ys, xs]`` reads level px rows ``ys`` and columns ``xs`` with one ``read_region``.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, handle: _Handle, level: int, shape_yx: tuple[int, int], bg: np.ndarray):
        self.handle = handle
        self.level = level
        self.shape = (*shape_yx, 3)
        self.background = bg

    def __getitem__(self, index: tuple) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (3 - len(index))
        (y0, y1, _), (x0, x1, _) = (index[i].indices(self.shape[i]) for i in (0, 1))
        h, w = max(y1 - y0, 0), max(x1 - x0, 0)
        rgb = self._read(y0, x0, h, w) if h and w else np.empty((h, w, 3), np.uint8)
        return rgb[:, :, index[2]]

    def _read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        openslide = _openslide()
        osr = self.handle.get()
        d = osr.level_downsamples[self.level]
        location = (round(x0 * d), round(y0 * d))  # level-0 px (x, y), nearest whole px
        try:
            rgba = np.asarray(osr.read_region(location, self.level, (w, h)))
        except openslide.OpenSlideError as exc:
            raise StmapInputError(_corrupt_msg(self.handle.path, exc)) from exc
        return _over_background(rgba, self.background)


def _over_background(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(h, w, 4) straight-alpha RGBA -> (h, w, 3) RGB composited over ``background``."""
    alpha = rgba[:, :, 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    a = alpha[:, :, None].astype(np.uint16)
    rgb = (rgba[:, :, :3].astype(np.uint16) * a + background * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)
