"""Layer-data tuples for slides and measured bins (napari's ``(data, kwargs, layer_type)``).

No napari import here: the tuples are plain data, so the reader, the sample data and the docks
share them and tests can check them without a viewer. The world is in µm: a layer of a slide
with ``mpp`` µm/px gets ``scale=(mpp, mpp)``. When µm/px is unknown the world falls back to
level-0 px (``mpp = 1``) and the layer metadata says so.

Shapes of regions (GeoJSON from QuPath, drawn regions) keep their data in level-0 px (y, x)
with ``scale=(mpp, mpp)`` and ``metadata["stmap"] = {"kind": "regions", "units": "px", ...}``:
a reader of shapes does not know the slide, so it uses the µm/px of the slide most recently
opened through napari-stmap (:func:`slide_mpp_hint`) and :func:`align_shapes_to_slide` re-scales
the layer once the slide is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .core.io.regions import Annotation
    from .core.io.slide import Slide
    from .core.io.spots import Spots

LayerData = tuple[Any, dict[str, Any], str]

#: Spots per layer above which measured bins on a regular grid are shown as a raster.
RASTER_MIN_SPOTS = 5000
#: Edge colour of regions without a class (the Regions dock draws in it too), and as 0–255 RGB.
REGION_COLOR = "#00e5ff"
REGION_RGB = (0x00, 0xE5, 0xFF)

#: µm/px and whether it is known, of the slide whose layer was made last (see slide_mpp_hint).
_SLIDE_HINT: dict[str, Any] = {}


def slide_mpp_hint() -> tuple[float, bool]:
    """(µm/px, known) of the slide opened last through napari-stmap; (1.0, False) before any.

    Readers of files in level-0 px that do not name their slide (GeoJSON shapes) scale their
    layers with it, so that they sit on that slide in a world in µm.
    """
    return float(_SLIDE_HINT.get("mpp", 1.0)), bool(_SLIDE_HINT.get("known", False))


def slide_layer(slide: Slide, *, name: str | None = None) -> LayerData:
    """Multiscale RGB image layer of ``slide`` with ``scale=(mpp, mpp)`` (world in µm)."""
    meta = {
        "stmap": {
            "kind": "slide",
            "path": str(slide.path),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
        }
    }
    kwargs = {
        "name": name or _stem(slide.path),
        "rgb": True,
        "multiscale": slide.n_levels > 1,
        "scale": (slide.mpp, slide.mpp),
        "units": _units(slide.mpp_source != "fallback"),
        "metadata": meta,
    }
    data = list(slide.levels) if slide.n_levels > 1 else slide.levels[0]
    _SLIDE_HINT.update(mpp=float(slide.mpp), known=slide.mpp_source != "fallback")
    return data, kwargs, "image"


def annotations_layer(
    annotations: list[Annotation], *, name: str, source: str | None = None
) -> LayerData:
    """Shapes layer of GeoJSON annotations: data level-0 px (y, x), ``scale=(mpp, mpp)``.

    ``mpp`` is :func:`slide_mpp_hint`. One shape per ring: a part of an annotation is its own
    shape and a hole too, tied together by the features ``feature`` (the annotation's index)
    and ``hole`` (True for a hole, drawn with half the edge width); ``name`` and
    ``classification`` are the annotation's. The edge colour is the class colour
    (:data:`REGION_COLOR` without one); faces are transparent. New shapes drawn in the layer get
    ``feature = -1``: each a region of its own.
    """
    from .core.regions import footprint_shape

    mpp, known = slide_mpp_hint()
    data, types, rows, colors = [], [], [], []
    for index, ann in enumerate(annotations):
        rgba = _rgba(ann.color)
        for poly in ann.polygons:
            for k, fp in enumerate(poly):
                kind, vertices = footprint_shape(fp)
                data.append(vertices)
                types.append(kind)
                rows.append((ann.name, ann.classification, index, k > 0))
                colors.append(rgba)
    width = 1.5 / max(mpp, 1e-9)  # 1.5 µm in level-0 px
    meta = {"kind": "regions", "units": "px", "mpp": mpp}
    if source is not None:
        meta["source"] = str(source)
    kwargs = {
        "name": name,
        "shape_type": types,
        "edge_color": np.array(colors, dtype=float) if colors else REGION_COLOR,
        "face_color": "transparent",
        "edge_width": [width / 2 if row[3] else width for row in rows],
        "features": _annotation_features(rows),
        "feature_defaults": {"name": "", "classification": "", "feature": -1, "hole": False},
        "scale": (mpp, mpp),
        "units": _units(known),
        "metadata": {"stmap": meta},
    }
    return data, kwargs, "shapes"


def _annotation_features(rows: list[tuple]) -> dict[str, np.ndarray]:
    names, classes, features, holes = zip(*rows, strict=True) if rows else ([], [], [], [])
    return {
        "name": np.array(names, dtype=object),
        "classification": np.array(classes, dtype=object),
        "feature": np.array(features, dtype=np.int64),
        "hole": np.array(holes, dtype=bool),
    }


def _rgba(rgb: tuple[int, int, int] | None) -> list[float]:
    """RGBA in [0, 1] of an ``(r, g, b)`` 0–255 colour (:data:`REGION_COLOR` when None)."""
    return [c / 255.0 for c in (REGION_RGB if rgb is None else rgb)] + [1.0]


def align_shapes_to_slide(layer, mpp: float, *, units: tuple[str, str] | None = None) -> None:
    """Put a regions Shapes layer (data in level-0 px) on a slide of ``mpp`` µm/px.

    Sets the layer's last two ``scale`` entries to ``(mpp, mpp)`` (world in µm), records
    ``mpp`` in ``metadata["stmap"]`` and, when given, sets ``units`` (e.g. ``("um", "um")``).
    Public layer API only (``scale``, ``metadata``, ``units``); the data are not touched.
    """
    mpp = float(mpp)
    if not (np.isfinite(mpp) and mpp > 0):
        msg = f"mpp={mpp!r} is not a slide's µm/px: pass a finite number > 0"
        raise ValueError(msg)
    scale = [float(v) for v in layer.scale]
    scale[-2:] = [mpp, mpp]
    layer.scale = scale
    meta = dict(layer.metadata)
    meta["stmap"] = {**(meta.get("stmap") or {}), "mpp": mpp}
    layer.metadata = meta
    if units is not None:
        layer.units = units


def spots_layer(
    spots: Spots,
    *,
    values: np.ndarray | None = None,
    label: str = "total counts",
    name: str | None = None,
    as_raster: bool | None = None,
    opened: str | Path | None = None,
) -> LayerData:
    """Measured spots/bins aligned with the slide, coloured by ``values`` (default: total counts).

    ``opened``: the path the user opened (e.g. a Visium HD ``outs/`` holding every bin size),
    recorded so that the docks read the same data; default ``spots.source``.

    Visium HD bins (squares on a regular array grid) become an image raster with an affine that
    maps (array_row, array_col) to world µm, so millions of 2 µm bins stay cheap; disks (Visium,
    legacy ST) become a Points layer whose point size is the spot diameter in µm.
    ``as_raster=None`` picks the raster for square bins from ``RASTER_MIN_SPOTS`` bins on.
    """
    if values is None:
        values = np.asarray(spots.counts.sum(axis=1)).ravel().astype(np.float32)
    mpp = spots.mpp or 1.0
    base = name or f"{spots.library_id} {spots.bin_um:g} µm"
    meta = {
        "stmap": {
            "kind": "spots",
            "source": str(opened if opened is not None else spots.source),
            "bin_um": spots.bin_um,
            "mpp": mpp,
            "label": label,
        }
    }
    gridded = spots.footprint == "square" and spots.array_rc is not None
    if as_raster is None:
        as_raster = gridded and spots.n_spots >= RASTER_MIN_SPOTS
    if as_raster and gridded:
        return _bin_raster(spots, values, mpp, f"{base} bins ({label})", meta)
    return _spot_points(spots, values, mpp, f"{base} spots ({label})", meta)


def _spot_points(spots: Spots, values: np.ndarray, mpp: float, name: str, meta: dict) -> LayerData:
    finite = values[np.isfinite(values)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    kwargs = {
        "name": name,
        "size": spots.size_px * mpp,
        "symbol": "disc" if spots.footprint == "disk" else "square",
        "features": {"value": values, "barcode": spots.barcodes, "in_tissue": spots.in_tissue},
        "face_color": "value",
        "face_colormap": "viridis",
        "face_contrast_limits": (float(lo), float(max(hi, lo + 1e-6))),
        "border_width": 0,
        "opacity": 0.8,
        "units": _units(bool(spots.mpp)),
        "metadata": meta,
    }
    return spots.centers_yx * mpp, kwargs, "points"


def _bin_raster(spots: Spots, values: np.ndarray, mpp: float, name: str, meta: dict) -> LayerData:
    rc = spots.array_rc.astype(np.int64)
    r0, c0 = rc.min(axis=0)
    shape = tuple(int(v) + 1 for v in rc.max(axis=0) - (r0, c0))
    raster = np.full(shape, np.nan, dtype=np.float32)
    raster[rc[:, 0] - r0, rc[:, 1] - c0] = values
    affine = grid_affine(rc - (r0, c0), spots.centers_yx) * mpp  # level-0 px -> µm
    finite = values[np.isfinite(values)]
    hi = float(np.percentile(finite, 99)) if finite.size else 1.0
    kwargs = {
        "name": name,
        "affine": np.vstack([affine, [0.0, 0.0, 1.0]]),
        "colormap": "magma",
        "contrast_limits": (0.0, max(hi, 1e-6)),
        "opacity": 0.7,
        "units": _units(bool(spots.mpp)),
        "metadata": meta,
    }
    return raster, kwargs, "image"


def grid_affine(rc: np.ndarray, centers_yx: np.ndarray) -> np.ndarray:
    """Least-squares affine (2, 3) mapping array (row, col) to level-0 px (y, x).

    Visium HD bins sit on a regular grid that may be rotated relative to the image; the fit
    recovers that rotation, so the raster lines up with the slide.
    """
    design = np.column_stack([rc.astype(np.float64), np.ones(len(rc))])
    coef, *_ = np.linalg.lstsq(design, centers_yx.astype(np.float64), rcond=None)
    return coef.T


def spaceranger_image_layer(spots: Spots, kind: str) -> LayerData:
    """The hires/lowres image of a Space Ranger folder, scaled into full-resolution coordinates.

    Image px ``u`` relates to full-res px ``f`` by ``u = scalef · f`` (continuous coordinates),
    so pixel centres map with ``scale = 1/scalef`` and ``translate = 0.5/scalef − 0.5`` (px),
    both multiplied by µm/px for a world in µm.
    """
    image = spots.load_image(kind)
    inv = 1.0 / spots.image_scale(kind)
    mpp = spots.mpp or 1.0
    kwargs = {
        "name": f"{spots.library_id} ({kind} image)",
        "rgb": image.ndim == 3,
        "scale": (inv * mpp, inv * mpp),
        "translate": ((0.5 * inv - 0.5) * mpp,) * 2,
        "units": _units(bool(spots.mpp)),
        "metadata": {"stmap": {"kind": "spaceranger_image", "image": kind, "mpp": mpp}},
    }
    return image, kwargs, "image"


def _units(known_mpp: bool) -> tuple[str, str]:
    """World units of a layer: µm when µm/px is known, else level-0 pixels."""
    return ("um", "um") if known_mpp else ("pixel", "pixel")


def show_scale_bar(viewer) -> None:
    """Show napari's scale bar (its units come from the layers' ``units``, µm here)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    bar = getattr(overlays, "scale_bar", None) or viewer.scale_bar
    bar.visible = True


def _stem(path) -> str:
    """File name without extension; generic short names (``he.ome.tif``) get their folder's name."""
    from pathlib import Path

    path = Path(path)
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)] + ".x"
    stem = name.rsplit(".", 1)[0]
    return f"{path.parent.name} {stem}" if len(stem) <= 3 and path.parent.name else stem
