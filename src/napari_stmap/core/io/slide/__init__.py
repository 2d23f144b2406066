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
- Through OpenSlide (the optional ``[openslide]`` extra: ``openslide-python`` and the
  ``openslide-bin`` library wheel): MIRAX ``.mrxs`` (with its folder), Hamamatsu ``.vms`` /
  ``.vmu``, Ventana ``.bif``, Sakura ``.svslide``, DICOM WSI ``.dcm``, and the TIFF-based
  Leica SCN, Philips TIFF, Ventana and Trestle files; any OpenSlide format when asked with
  ``backend="openslide"``. Levels are read with ``read_region`` in 1024 px blocks, RGBA
  composited over the slide's background colour (white), µm/px from ``openslide.mpp-x``.
- JPEG and PNG (for small images), decoded on demand through :func:`dask.delayed`.

``backend="auto"`` (the default) reads the TIFF family with tifffile, which decodes the tiles
straight from the file (faster, no RGBA copy), and hands OpenSlide the formats tifffile cannot
read or lay out (see :mod:`._slide`); ``backend="tifffile"`` / ``"openslide"`` force one.

Pixels are normalised lazily: grayscale becomes RGB (the channel repeated), an alpha channel
is dropped, other integer types are scaled to ``uint8`` (``65535 -> 255``; floats are taken to
be in ``[0, 1]``). A file without a pyramid (or whose coarsest level is still large) gets a
lazily computed one: 2 × 2 means, level by level, until the longest side is below
:data:`PYRAMID_MIN_PX`, so a viewer never pulls the full resolution to draw an overview.
Opening reads only the file's metadata and one small chunk (to catch truncated files early);
no pixels of the image are held in memory.

µm per pixel, first found wins: the user's ``mpp=``; OME ``PhysicalSizeX`` (with its unit);
the SVS ``MPP = …`` field; the TIFF ``XResolution`` / ``ResolutionUnit`` tags (print
defaults such as 72 dpi and unit "none" are ignored); through OpenSlide, ``openslide.mpp-x``
(else its ``tiff.XResolution`` properties). Values outside
:data:`PLAUSIBLE_MPP_UM` are ignored. When nothing is known, :data:`UNKNOWN_MPP_FALLBACK` is
used and a :class:`~napari_stmap.core.errors.StmapInputWarning` says how to pass the value.

Resampling: :func:`read_at_mpp` reads any window of the slide at a model's µm/px (model px
``(i, j)`` covers level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)``, ``f = mpp / slide.mpp``);
:func:`resample_window` is the one resize behind it and behind the engine's tile reader.

File handles: the TIFF stays open for the life of the :class:`Slide` (the zarr store behind
the dask arrays reads tiles on demand through one shared, locked file handle); it is closed
when the slide and its arrays are garbage collected. The same holds for the OpenSlide handle
(one per slide, shared by all threads, as OpenSlide allows). The dask graphs therefore hold an
open file: on a ``dask.distributed`` cluster, open the slide on each worker from its path.
"""

from __future__ import annotations

from ._mpp import PLAUSIBLE_MPP_UM, UNKNOWN_MPP_FALLBACK
from ._openslide import OPENSLIDE_INSTALL, openslide_available
from ._pixels import PYRAMID_MIN_PX
from ._resample import model_px_per_level0, read_at_mpp, resample_window
from ._slide import BACKENDS, OPENSLIDE_SUFFIXES, SUPPORTED_SUFFIXES, Slide, open_slide
from ._slide import RASTER_SUFFIXES as RASTER_SUFFIXES
from ._slide import TIFF_SUFFIXES as TIFF_SUFFIXES
from ._slide import USER_MPP_RANGE_UM as USER_MPP_RANGE_UM

__all__ = [
    "BACKENDS",
    "OPENSLIDE_INSTALL",
    "OPENSLIDE_SUFFIXES",
    "PLAUSIBLE_MPP_UM",
    "PYRAMID_MIN_PX",
    "SUPPORTED_SUFFIXES",
    "UNKNOWN_MPP_FALLBACK",
    "Slide",
    "model_px_per_level0",
    "open_slide",
    "openslide_available",
    "read_at_mpp",
    "resample_window",
]
