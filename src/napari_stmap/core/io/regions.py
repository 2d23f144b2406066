"""GeoJSON shapes in and out (QuPath's layout): :class:`Annotation` objects and regions.

GeoJSON convention (as QuPath and most slide tools export): coordinates are ``[x, y]`` in
level-0 px of the slide (x to the right, y down), not geographic coordinates; everything here
works in level-0 px, axis order (y, x), and swaps exactly once, on reading and on writing.

One GeoJSON feature is one :class:`Annotation`: ``Polygon`` (outer ring; the holes are
subtracted), ``MultiPolygon`` (the sum of its parts, each with its own holes),
``GeometryCollection`` of those, and ``Point`` features with a ``radius_px`` or ``diameter_px``
property (a disk). Its properties keep QuPath's layout: ``name``, ``objectType``
(``"annotation"``, ``"detection"``) and ``classification`` ``{"name": ..., "color": [r, g, b]}``
(QuPath before 0.4: ``{"name": ..., "colorRGB": int}``). A ring that is an axis-aligned
rectangle (4 corners) reads as a :class:`~napari_stmap.core.geometry.Rectangle`, any other
ring as a :class:`~napari_stmap.core.geometry.Polygon` (QuPath writes ellipses as polygons).

An annotation becomes a :class:`~napari_stmap.core.geometry.Region` (signed parts: outer rings
+1, holes −1) whose name is the feature's ``name``, else its class and a count (``"Tumor 2"``),
else ``"region k"`` (:func:`region_names`). napari shapes map onto annotations in
:mod:`napari_stmap.core.regions`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import StmapInputError
from ..geometry import Disk, Footprint, Polygon, Region, point_in_ring, rectangle_from_corners

logger = logging.getLogger(__name__)

__all__ = [
    "ELLIPSE_VERTICES",
    "Annotation",
    "as_rgb",
    "is_geojson",
    "nest_holes",
    "read_annotations",
    "read_geojson",
    "region_names",
    "regions_from_annotations",
    "unique_names",
    "write_geojson",
]

#: Vertices of the polygon that stands for an ellipse or a disk in a GeoJSON file.
ELLIPSE_VERTICES = 64
#: Files up to this size are parsed whole to tell GeoJSON from other JSON; larger ones sniffed.
SNIFF_PARSE_BYTES = 64 * 2**20
_GEOMETRIES = ("Polygon", "MultiPolygon", "Point", "GeometryCollection")


@dataclass
class Annotation:
    """One GeoJSON feature (a QuPath object), in level-0 px.

    Attributes
    ----------
    polygons
        Its parts, each ``[outer, *holes]``: footprints in level-0 px, (y, x).
    name, classification
        QuPath's ``name`` and class name (``""`` when absent).
    color
        ``(r, g, b)`` in 0–255 of the class (else of the object), or None.
    object_type
        QuPath's ``objectType``: ``"annotation"`` or ``"detection"``.
    id
        The feature's ``id`` (QuPath: a UUID), or None.
    """

    polygons: list[list[Footprint]]
    name: str = ""
    classification: str = ""
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"
    id: str | None = field(default=None, repr=False)

    def region(self, name: str) -> Region:
        """The annotation as a :class:`~napari_stmap.core.geometry.Region` called ``name``.

        Outer rings are parts with sign +1, holes −1 (they subtract).
        """
        parts = [
            (fp, 1.0 if k == 0 else -1.0) for poly in self.polygons for k, fp in enumerate(poly)
        ]
        return Region(name, parts)


# ------------------------------------------------------------------------------- reading
def read_geojson(path: str | Path) -> list[Region]:
    """Read regions from a GeoJSON file (coordinates ``[x, y]`` in level-0 px).

    Names follow :func:`region_names`. Raises :class:`StmapInputError` on a file that is not
    GeoJSON, on a point without ``radius_px``, and when no region is found.
    """
    annotations = read_annotations(path)
    if not annotations:
        msg = f"{path}: no Polygon, MultiPolygon or Point (with radius_px) features found"
        raise StmapInputError(msg)
    return regions_from_annotations(annotations)


def read_annotations(
    path: str | Path, *, points: Literal["error", "skip"] = "error"
) -> list[Annotation]:
    """Read the features of a GeoJSON file (QuPath export) with their properties.

    Parameters
    ----------
    path
        GeoJSON: a FeatureCollection, a bare list of Features (QuPath), a Feature or a geometry;
        coordinates ``[x, y]`` in level-0 px.
    points
        What a ``Point`` without ``radius_px``/``diameter_px`` does: ``"error"`` raises,
        ``"skip"`` leaves it out (logged). Lines are always left out (logged).
    """
    path = Path(path)
    doc = _load_json(path)
    out = []
    for index, feature in enumerate(_features(doc, path)):
        ann = _annotation(feature, index, path, points)
        if ann is not None:
            out.append(ann)
    return out


def is_geojson(path: str | Path) -> bool:
    """Whether ``path`` is a GeoJSON file (never raises: False for any other file or JSON)."""
    try:
        path = Path(path)
        if not path.is_file():
            return False
        if path.stat().st_size > SNIFF_PARSE_BYTES:
            with path.open("rb") as fh:
                head = fh.read(1 << 16).decode("utf-8", errors="replace")
            return re.search(r'"type"\s*:\s*"(FeatureCollection|Feature)"', head) is not None
        doc = json.loads(path.read_bytes())
        return bool(_features(doc, path)) or isinstance(doc, dict)
    except Exception:  # a sniffer must never raise on foreign input
        return False


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        msg = f"{path}: no such file; check the path of the GeoJSON shapes"
        raise StmapInputError(msg) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path}: not valid GeoJSON ({exc}); export shapes as GeoJSON (e.g. from QuPath)"
        raise StmapInputError(msg) from None


def _features(doc, path: Path) -> list[dict]:
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "FeatureCollection" and isinstance(doc.get("features") or [], list):
        return list(doc.get("features") or [])
    if kind == "Feature":
        return [doc]
    if kind in _GEOMETRIES:
        return [{"type": "Feature", "geometry": doc, "properties": {}}]
    if isinstance(doc, list) and all(_is_feature(f) for f in doc):
        return doc  # QuPath writes a bare list of features
    what = f"type {kind!r}" if kind is not None else f"a JSON {type(doc).__name__}"
    msg = f"{path}: {what} is not GeoJSON; expected a FeatureCollection (e.g. a QuPath export)"
    raise StmapInputError(msg)


def _is_feature(item) -> bool:
    return isinstance(item, dict) and (item.get("type") == "Feature" or "geometry" in item)


def _annotation(feature: dict, index: int, path: Path, points: str) -> Annotation | None:
    if not _is_feature(feature):
        msg = f"{path}: feature {index} is not a GeoJSON Feature object; fix or remove it"
        raise StmapInputError(msg)
    props = feature.get("properties") or {}
    label = str(props.get("name") or feature.get("id") or index)
    where = f"{path}: region {label!r}"
    polygons = _geometry_polygons(feature.get("geometry") or {}, props, where, points)
    if not polygons:
        return None
    classification, color = _classification(props)
    fid = feature.get("id")
    return Annotation(
        polygons,
        name=str(props.get("name") or ""),
        classification=classification,
        color=color,
        object_type=str(props.get("objectType") or "annotation"),
        id=None if fid is None else str(fid),
    )


def _geometry_polygons(geom: dict, props: dict, where: str, points: str) -> list[list[Footprint]]:
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Polygon":
        return [_rings(coords, where)]
    if kind == "MultiPolygon":
        return [_rings(poly, where) for poly in coords or []]
    if kind == "GeometryCollection":
        members = geom.get("geometries") or []
        return [p for g in members for p in _geometry_polygons(g, props, where, points)]
    if kind == "Point":
        disk = _disk(coords, props, where, points)
        return [] if disk is None else [[disk]]
    logger.warning("%s: skipping a geometry of type %s (not an area)", where, kind)
    return []


def _rings(rings, where: str) -> list[Footprint]:
    if not isinstance(rings, list) or not rings:
        msg = f"{where} has a polygon without rings; export it again as GeoJSON"
        raise StmapInputError(msg)
    return [_ring_footprint(ring, where) for ring in rings]


def _ring_footprint(ring, where: str) -> Footprint:
    """A ring ``[[x, y], ...]`` (closed or not) as a Rectangle when axis-aligned, else Polygon."""
    try:
        xy = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        xy = np.empty((0, 0))
    if xy.ndim == 2 and len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]  # GeoJSON repeats the first vertex at the end
    if xy.ndim != 2 or xy.shape[0] < 3 or xy.shape[1] < 2 or not np.isfinite(xy).all():
        msg = f"{where} has a ring with fewer than 3 finite [x, y] points; fix or remove it"
        raise StmapInputError(msg)
    yx = np.ascontiguousarray(xy[:, 1::-1])
    return rectangle_from_corners(yx) or Polygon(yx)


def _disk(coords, props: dict, where: str, points: str) -> Disk | None:
    radius = props.get("radius_px", (props.get("diameter_px") or 0) / 2)
    if not radius or radius <= 0:
        if points == "skip":
            logger.warning("%s: skipping a point without radius_px/diameter_px", where)
            return None
        msg = f"{where}: a point has no radius_px/diameter_px property; add one (level-0 px)"
        raise StmapInputError(msg)
    x, y = coords[:2]
    return Disk((float(y), float(x)), 2.0 * float(radius))


def _classification(props: dict) -> tuple[str, tuple[int, int, int] | None]:
    """(class name, rgb) from QuPath's properties; colour of the class, else of the object."""
    cls, color = props.get("classification"), as_rgb(props.get("color"))
    if isinstance(cls, str):
        return cls, color
    if not isinstance(cls, dict):
        return "", color
    names = cls.get("names")  # QuPath's derived classes ("Tumor: Positive")
    name = cls.get("name") or (": ".join(map(str, names)) if isinstance(names, list) else "")
    return str(name or ""), as_rgb(cls.get("color", cls.get("colorRGB"))) or color


def as_rgb(value) -> tuple[int, int, int] | None:
    """``[r, g, b]`` (0–255) or QuPath's packed ``colorRGB`` int as ``(r, g, b)``; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    if isinstance(value, list | tuple) and len(value) >= 3:
        try:
            return tuple(int(np.clip(round(float(v)), 0, 255)) for v in value[:3])
        except (TypeError, ValueError):
            return None
    return None


# ------------------------------------------------------------------------------- writing
def write_geojson(path: str | Path, items: Sequence[Annotation | Region]) -> Path:
    """Write annotations or regions as a GeoJSON FeatureCollection that QuPath imports.

    Coordinates are ``[x, y]`` in level-0 px; each ring is closed. Rectangles keep their 4
    corners, ellipses and disks become :data:`ELLIPSE_VERTICES`-vertex polygons. One feature per
    item: a ``Polygon``, or a ``MultiPolygon`` when it has several parts (each with its holes),
    with ``properties`` ``{"objectType", "name", "classification": {"name", "color"}}``
    (``"color"`` of the object when it has no class). The file is replaced if it exists.
    """
    features = [_feature_json(_as_annotation(item)) for item in items]
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _as_annotation(item: Annotation | Region) -> Annotation:
    if isinstance(item, Annotation):
        return item
    if isinstance(item, Region):
        outers = [fp for fp, sign in item.parts if sign > 0]
        holes = [fp for fp, sign in item.parts if sign < 0]
        return Annotation(nest_holes(outers, holes), name=item.name)
    msg = f"cannot write {type(item).__name__} as GeoJSON: pass Annotation or Region objects"
    raise StmapInputError(msg)


def _feature_json(ann: Annotation) -> dict[str, Any]:
    polys = [[_ring_xy(fp) for fp in poly] for poly in ann.polygons]
    if len(polys) == 1:
        geometry = {"type": "Polygon", "coordinates": polys[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polys}
    props: dict[str, Any] = {"objectType": ann.object_type}
    if ann.name:
        props["name"] = ann.name
    if ann.classification:
        props["classification"] = {"name": ann.classification}
        if ann.color is not None:
            props["classification"]["color"] = list(ann.color)
    elif ann.color is not None:
        props["color"] = list(ann.color)
    feature = {"type": "Feature", "geometry": geometry, "properties": props}
    if ann.id:
        feature["id"] = ann.id
    return feature


def _ring_xy(fp: Footprint) -> list[list[float]]:
    xy = np.asarray(fp.outline_yx(ELLIPSE_VERTICES), dtype=np.float64)[:, ::-1]
    return np.vstack([xy, xy[:1]]).tolist()


def nest_holes(outers: list[Footprint], holes: list[Footprint]) -> list[list[Footprint]]:
    """Polygons ``[outer, *holes]``: each hole goes to the first outer holding its centre.

    Footprints are level-0 px; curves are tested as :data:`ELLIPSE_VERTICES`-vertex polygons
    (the centre of a hole is the mean of its outline). A hole inside no outer goes to the first.
    """
    polys = [[fp] for fp in outers]
    for hole in holes:
        point = np.asarray(hole.outline_yx(ELLIPSE_VERTICES)).mean(axis=0)
        inside = [point_in_ring(point, o.outline_yx(ELLIPSE_VERTICES)) for o in outers]
        polys[inside.index(True) if any(inside) else 0].append(hole)
    return polys


# --------------------------------------------------------------------------------- names
def regions_from_annotations(annotations: Sequence[Annotation]) -> list[Region]:
    """One :class:`~napari_stmap.core.geometry.Region` per annotation (holes subtract).

    Named by :func:`region_names`.
    """
    names = region_names(annotations)
    return [a.region(name) for a, name in zip(annotations, names, strict=True)]


def region_names(annotations: Sequence[Annotation]) -> list[str]:
    """Unique names: ``name``, else class and its count (``"Tumor 2"``), else ``"region k"``.

    ``k`` is the 1-based position in ``annotations``; a repeated name gets `` (2)``, ...
    """
    per_class: dict[str, int] = {}
    names = []
    for k, ann in enumerate(annotations, start=1):
        if ann.name:
            names.append(ann.name)
        elif ann.classification:
            per_class[ann.classification] = per_class.get(ann.classification, 0) + 1
            names.append(f"{ann.classification} {per_class[ann.classification]}")
        else:
            names.append(f"region {k}")
    return unique_names(names)


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered: ``["a", "a"] -> ["a", "a (2)"]``."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out
