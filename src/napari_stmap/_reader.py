"""npe2 reader: H&E slides, Space Ranger output folders, spatial ``.h5ad``, SpatialData ``.zarr``
stores (their measured bins) and GeoJSON shapes.

``napari_get_reader`` returns ``None`` for anything it does not recognise and never raises on
foreign files. Slides (every type :func:`~napari_stmap.core.io.slide.open_slide` reads: the
TIFF family, OpenSlide's vendor formats such as ``.mrxs``, ``.ndpi``, ``.scn``, ``.vms``,
``.bif``, and JPEG/PNG) open as a multiscale RGB image in µm; measured bins open aligned with the
slide. A Space Ranger folder (which holds no full-resolution image) also shows its hires image
scaled into full-resolution coordinates, so the bins sit on the tissue. GeoJSON shapes (QuPath
annotations, ``[x, y]`` level-0 px) open as a Shapes layer in level-0 px (y, x) scaled by the
µm/px of the slide opened last (:func:`~napari_stmap._layers.annotations_layer`); a ``.json``
that is not GeoJSON is not ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

GEOJSON_SUFFIXES = (".geojson", ".json")


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return a reader function for ``path``, or ``None`` when it is not ours."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        kind = _classify(Path(path))
    except Exception:  # a reader must never raise on foreign input
        logger.debug("napari-stmap: cannot classify %s", path, exc_info=True)
        return None
    readers = {
        "slide": read_slide_layers,
        "spots": read_spots_layers,
        "geojson": read_geojson_layers,
    }
    return readers.get(kind)


def _classify(path: Path) -> str | None:
    from .core.io.spots import detect_spots_layout

    if path.is_dir():
        return "spots" if detect_spots_layout(path) else None
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return "spots" if detect_spots_layout(path) else None
    if suffix in _slide_suffixes() and path.is_file():
        return "slide" if suffix != ".dcm" or _is_dicom_slide(path) else None
    if suffix in GEOJSON_SUFFIXES:
        from .core.io.regions import is_geojson

        return "geojson" if is_geojson(path) else None
    return None


def _slide_suffixes() -> tuple[str, ...]:
    from .core.io.slide import SUPPORTED_SUFFIXES

    return SUPPORTED_SUFFIXES


def _is_dicom_slide(path: Path) -> bool:
    """A ``.dcm`` is ours only when OpenSlide sees a whole-slide image (not CT/MR)."""
    from .core.io.slide import openslide_available

    if not openslide_available():
        return False
    import openslide

    return openslide.OpenSlide.detect_format(str(path)) == "dicom"


def read_slide_layers(path: str | list[str]) -> list:
    """Layer data for one slide: ``[(levels, kwargs, "image")]``."""
    from ._layers import slide_layer
    from .core.io.slide import open_slide

    path = path[0] if isinstance(path, list) else path
    return [slide_layer(open_slide(path))]


def read_spots_layers(path: str | list[str]) -> list:
    """Layer data for measured spots/bins (+ the Space Ranger hires image when present)."""
    from ._layers import spaceranger_image_layer, spots_layer
    from .core.io.spots import read_spots

    path = path[0] if isinstance(path, list) else path
    spots = read_spots(path)
    layers = []
    kinds = [k for k in ("hires", "lowres") if k in spots.image_paths or k in spots.images]
    if kinds:
        layers.append(spaceranger_image_layer(spots, kinds[0]))
    layers.append(spots_layer(spots, opened=path))
    return layers


def read_geojson_layers(path: str | list[str]) -> list:
    """One Shapes layer of a GeoJSON file's annotations, named after the file.

    Data in level-0 px (y, x), ``scale`` the µm/px of the slide opened last; metadata
    ``{"stmap": {"kind": "regions", "units": "px", "source": path, "mpp": ...}}``. Points
    without a radius and lines are left out (logged).
    """
    from ._layers import _stem, annotations_layer
    from .core.io.regions import read_annotations

    path = path[0] if isinstance(path, list) else path
    annotations = read_annotations(path, points="skip")
    return [annotations_layer(annotations, name=_stem(path), source=str(path))]
