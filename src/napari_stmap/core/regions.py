"""Regions to aggregate: GeoJSON shapes (QuPath), napari shapes, spot grids, per-region sums.

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

An annotation becomes a :class:`Region` (signed parts: outer rings +1, holes −1) whose name is
the feature's ``name``, else its class and a count (``"Tumor 2"``), else ``"region k"``.
napari shapes (a Shapes layer has no holes) map onto annotations through two per-shape
properties: ``feature`` (shapes with the same value >= 0 are parts of one annotation; < 0 or
missing: a region of its own) and ``hole`` (True: subtracted from the outer shape that holds it).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import StmapInputError
from .geometry import Disk, Ellipse, Footprint, Polygon, Rectangle, Square, weight_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "Annotation",
    "Region",
    "aggregate_store",
    "annotations_from_shapes",
    "combine_parts",
    "footprint_shape",
    "is_geojson",
    "read_annotations",
    "read_geojson",
    "region_names",
    "region_parts",
    "regions_from_annotations",
    "regions_from_shapes",
    "shape_footprint",
    "unique_names",
    "write_geojson",
]

#: Vertices of the polygon that stands for an ellipse or a disk in a GeoJSON file.
ELLIPSE_VERTICES = 64
#: Files up to this size are parsed whole to tell GeoJSON from other JSON; larger ones sniffed.
SNIFF_PARSE_BYTES = 64 * 2**20
_GEOMETRIES = ("Polygon", "MultiPolygon", "Point", "GeometryCollection")


class Region:
    """One region: signed parts (outer rings +1, holes −1) whose weighted sum is the region."""

    def __init__(self, name: str, parts: Sequence[tuple[Footprint, float]]) -> None:
        self.name, self.parts = name, list(parts)

    @property
    def area_px(self) -> float:
        """Area in level-0 px²."""
        return float(sum(sign * fp.area_px() for fp, sign in self.parts))

    @property
    def center_yx(self) -> tuple[float, float]:
        """Area-weighted centre of the positive parts (level-0 px, (y, x))."""
        pos = [(fp, fp.area_px()) for fp, s in self.parts if s > 0]
        w = np.array([a for _, a in pos])
        c = np.array([_bbox_center(fp) for fp, _ in pos])
        if w.sum() <= 0:  # degenerate (zero-area) parts: their plain mean
            return tuple(c.mean(0))
        return tuple((c * w[:, None]).sum(0) / w.sum())

    def bbox_yx(self) -> tuple[float, float, float, float]:
        """Level-0 px box (y0, x0, y1, x1) of all parts."""
        boxes = np.array([fp.bbox_yx() for fp, _ in self.parts])
        return (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))

    @property
    def kind(self) -> str:
        """``disk``, ``square``, ``polygon``, ... of the first part."""
        return type(self.parts[0][0]).__name__.lower()


def _bbox_center(fp: Footprint) -> tuple[float, float]:
    y0, x0, y1, x1 = fp.bbox_yx()
    return ((y0 + y1) / 2, (x0 + x1) / 2)


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
        """The annotation as a :class:`Region` called ``name`` (holes subtract)."""
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
    return _as_rectangle(yx) or Polygon(yx)


def _as_rectangle(yx: np.ndarray) -> Rectangle | None:
    """A Rectangle when ``yx`` (level-0 px) is 4 corners joined by axis-aligned edges."""
    if len(yx) != 4:
        return None
    edges = np.roll(yx, -1, axis=0) - yx
    flat = np.abs(edges) <= max(1e-6, 1e-9 * float(np.abs(yx).max()))
    if not ((flat.sum(axis=1) == 1).all() and (flat[:, 0] != np.roll(flat[:, 0], -1)).all()):
        return None
    (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
    return Rectangle(float(y0), float(x0), float(y1), float(x1))


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
    cls, color = props.get("classification"), _rgb(props.get("color"))
    if isinstance(cls, str):
        return cls, color
    if not isinstance(cls, dict):
        return "", color
    names = cls.get("names")  # QuPath's derived classes ("Tumor: Positive")
    name = cls.get("name") or (": ".join(map(str, names)) if isinstance(names, list) else "")
    return str(name or ""), _rgb(cls.get("color", cls.get("colorRGB"))) or color


def _rgb(value) -> tuple[int, int, int] | None:
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
        return Annotation(_nest(outers, holes), name=item.name)
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


# ------------------------------------------------------------------------- napari shapes
def shape_footprint(kind: str, vertices_yx: np.ndarray) -> Footprint | None:
    """Footprint (level-0 px) of one napari shape, or None for lines and paths.

    ``vertices_yx`` are napari's vertices (n, 2) (y, x) (extra leading axes are dropped): a
    rectangle's 4 corners (an axis-aligned one becomes a :class:`Rectangle`, a turned one a
    :class:`Polygon`), an ellipse's 4 corners of its (possibly turned) bounding box.
    """
    v = np.asarray(vertices_yx, dtype=float)[:, -2:]
    if kind == "rectangle":
        return _as_rectangle(v) or Polygon(v)
    if kind == "ellipse":
        center = v.mean(axis=0)
        a, b = v[1] - v[0], v[3] - v[0]
        ry, rx = np.linalg.norm(b) / 2, np.linalg.norm(a) / 2
        angle = float(np.arctan2(b[1], b[0]))  # first semi-axis along b (y when unturned)
        return Ellipse(tuple(center), (ry, rx), angle)
    if kind == "polygon":
        return Polygon(v)
    return None


def footprint_shape(fp: Footprint) -> tuple[str, np.ndarray]:
    """napari shape ``(shape_type, vertices (n, 2) level-0 px (y, x))`` of a footprint.

    The inverse of :func:`shape_footprint`: rectangles and squares give ``"rectangle"``,
    disks and ellipses ``"ellipse"`` (corners of the turned bounding box), others ``"polygon"``.
    """
    if isinstance(fp, Rectangle | Square):
        return "rectangle", np.asarray(fp.outline_yx(), dtype=float)
    if isinstance(fp, Disk | Ellipse):
        ry, rx = (fp.radius_px,) * 2 if isinstance(fp, Disk) else fp.radii_yx
        t = 0.0 if isinstance(fp, Disk) else fp.angle_rad
        b = 2 * ry * np.array([math.cos(t), math.sin(t)])
        a = 2 * rx * np.array([-math.sin(t), math.cos(t)])
        v0 = np.asarray(fp.center_yx) - a / 2 - b / 2
        return "ellipse", np.stack([v0, v0 + a, v0 + a + b, v0 + b])
    return "polygon", np.asarray(fp.outline_yx(), dtype=float)


def annotations_from_shapes(
    shape_types: Sequence[str],
    vertices_yx: Sequence[np.ndarray],
    properties: Mapping[str, Sequence] | None = None,
    colors: np.ndarray | None = None,
) -> list[Annotation]:
    """Group napari shapes (level-0 px, (y, x)) into annotations.

    Parameters
    ----------
    shape_types, vertices_yx
        napari's ``shape_type`` and ``data`` of a Shapes layer whose data are level-0 px.
    properties
        Per-shape columns (napari ``features``, a DataFrame or a dict): ``feature`` (same value
        >= 0: one annotation; < 0, NaN or missing: a shape of its own), ``hole`` (subtracted from
        the outer shape of its feature that holds it), ``name``, ``classification``.
    colors
        (n, 3 or 4) RGB(A) in [0, 1] (napari's ``edge_color``): the colour of each annotation
        (of its first outer shape).

    Lines and paths are left out; a hole whose feature has no outer shape is left out (logged).
    """
    cols = _shape_columns(properties, len(shape_types))
    out = []
    for idx in _feature_groups(cols["feature"]):
        ann = _shapes_annotation(idx, shape_types, vertices_yx, cols, colors)
        if ann is not None:
            out.append(ann)
    return out


def _shape_columns(properties, n: int) -> dict[str, list]:
    clean = {
        "name": lambda v: "" if _missing(v) else str(v),
        "classification": lambda v: "" if _missing(v) else str(v),
        "feature": lambda v: -1 if _missing(v) else int(v),
        "hole": lambda v: False if _missing(v) else bool(v),
    }
    cols = {}
    for key, fix in clean.items():
        values = None if properties is None else properties.get(key)
        values = [None] * n if values is None else list(values)
        if len(values) != n:
            msg = f"property {key!r} has {len(values)} values for {n} shapes: pass one per shape"
            raise StmapInputError(msg)
        cols[key] = [fix(v) for v in values]
    return cols


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return False


def _feature_groups(features: Sequence[int]) -> list[list[int]]:
    """Shape indices per annotation, in order of first appearance."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(("feature", f) if f >= 0 else ("shape", i), []).append(i)
    return list(groups.values())


def _shapes_annotation(idx, shape_types, vertices_yx, cols, colors) -> Annotation | None:
    outers, holes = [], []
    for i in idx:
        try:
            fp = shape_footprint(shape_types[i], vertices_yx[i])
        except StmapInputError as exc:  # a degenerate shape (e.g. a click without a drag)
            logger.warning("skipping shape %d: %s", i, exc)
            continue
        if fp is not None:
            (holes if cols["hole"][i] else outers).append((i, fp))
    if not outers:
        if holes:
            logger.warning("skipping holes %s: their feature has no outer shape", idx)
        return None
    first = outers[0][0]
    color = None if colors is None else _rgb([255 * c for c in np.asarray(colors)[first][:3]])
    return Annotation(
        _nest([fp for _, fp in outers], [fp for _, fp in holes]),
        name=_first_set(cols["name"], idx),
        classification=_first_set(cols["classification"], idx),
        color=color,
    )


def _first_set(values: list[str], idx: list[int]) -> str:
    return next((values[i] for i in idx if values[i]), "")


def _nest(outers: list[Footprint], holes: list[Footprint]) -> list[list[Footprint]]:
    """Polygons ``[outer, *holes]``: each hole goes to the first outer holding its centre."""
    polys = [[fp] for fp in outers]
    for hole in holes:
        point = np.asarray(hole.outline_yx(ELLIPSE_VERTICES)).mean(axis=0)
        inside = [_inside(point, o.outline_yx(ELLIPSE_VERTICES)) for o in outers]
        polys[inside.index(True) if any(inside) else 0].append(hole)
    return polys


def _inside(point_yx: np.ndarray, ring_yx: np.ndarray) -> bool:
    """Even-odd test of one point (y, x) against a ring (n, 2) (y, x)."""
    y, x = point_yx
    ys, xs = ring_yx[:, 0], ring_yx[:, 1]
    ys2, xs2 = np.roll(ys, -1), np.roll(xs, -1)
    crosses = (ys > y) != (ys2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cut = xs + (y - ys) * (xs2 - xs) / (ys2 - ys)
    return bool(np.count_nonzero(crosses & (x < x_cut)) % 2)


def regions_from_shapes(
    shape_types: Sequence[str],
    vertices_yx: Sequence[np.ndarray],
    properties: Mapping[str, Sequence] | None = None,
) -> list[Region]:
    """Regions of napari shapes (level-0 px, (y, x)), parts of one ``feature`` grouped.

    See :func:`annotations_from_shapes` for the properties; names follow :func:`region_names`.
    """
    return regions_from_annotations(annotations_from_shapes(shape_types, vertices_yx, properties))


def regions_from_annotations(annotations: Sequence[Annotation]) -> list[Region]:
    """One :class:`Region` per annotation (holes subtract), named by :func:`region_names`."""
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


# ---------------------------------------------------------------------------- aggregation
def region_parts(regions: Sequence[Region]) -> tuple[list[Footprint], np.ndarray, np.ndarray]:
    """All parts of ``regions`` as ``(footprints, signs (n,), groups (n,))``.

    ``groups[i]`` is the index of the region part ``i`` belongs to; see :func:`combine_parts`.
    """
    fps = [fp for r in regions for fp, _ in r.parts]
    signs = np.array([s for r in regions for _, s in r.parts], dtype=np.float64)
    groups = np.array([k for k, r in enumerate(regions) for _ in r.parts], dtype=np.int64)
    return fps, signs, groups


def combine_parts(
    values: np.ndarray, signs: np.ndarray, groups: np.ndarray, n_groups: int
) -> np.ndarray:
    """Per-region sums ``(n_groups, C)`` of per-part sums ``values`` (n_parts, C).

    Each part adds ``sign · value`` to its group (holes subtract); NaN parts make NaN regions.
    """
    values = np.asarray(values, dtype=np.float64).reshape(len(signs), -1)
    out = np.zeros((n_groups, values.shape[1]), dtype=np.float64)
    np.add.at(out, np.asarray(groups), values * np.asarray(signs, dtype=np.float64)[:, None])
    return out


def aggregate_store(
    store,
    footprints: Sequence[Footprint],
    *,
    signs: Sequence[float] | None = None,
    groups: Sequence[int] | None = None,
    n_groups: int | None = None,
    model=None,
    device: str = "cpu",
    block_px: float = 4096.0,
    progress=None,
) -> np.ndarray:
    """Per-region sums ``(n, G + 1)`` of the dense map of a store (additive rule).

    Footprints are processed in spatial blocks of ``block_px`` level-0 px, so memory is
    bounded by one block's map; tiles a block needs are predicted on demand
    (:func:`~napari_stmap.core.engine.ensure_region`). Off-tissue tiles count as 0 counts.
    ``signs``/``groups`` combine parts into regions (holes subtract; ``n_groups`` rows; see
    :func:`region_parts`).
    """
    from .engine import ensure_region

    fps = list(footprints)
    signs = np.ones(len(fps)) if signs is None else np.asarray(signs, float)
    groups = np.arange(len(fps)) if groups is None else np.asarray(groups)
    out = np.zeros((n_groups or len(fps), len(store.output_names)), dtype=np.float64)
    blocks = _blocks(fps, block_px)
    for k, idx in enumerate(blocks):
        box = _union_bbox([fps[i] for i in idx])
        dense, grid = ensure_region(store, box, background=0.0, model=model, device=device)
        w = weight_matrix([fps[i] for i in idx], grid)
        sums = np.asarray(w @ dense.reshape(dense.shape[0], -1).T.astype(np.float64))
        out += combine_parts(sums, signs[idx], groups[idx], len(out))
        if progress is not None:
            progress(k + 1, len(blocks))
    return out


def _blocks(fps: Sequence[Footprint], block_px: float) -> list[np.ndarray]:
    centers = np.array([_bbox_center(fp) for fp in fps]).reshape(-1, 2)
    keys = np.floor(centers / block_px).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    _, starts = np.unique(keys[order], axis=0, return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def _union_bbox(fps: Sequence[Footprint]) -> tuple[float, float, float, float]:
    boxes = np.array([fp.bbox_yx() for fp in fps])
    return (
        float(boxes[:, 0].min()),
        float(boxes[:, 1].min()),
        float(boxes[:, 2].max()),
        float(boxes[:, 3].max()),
    )
