"""Regions to aggregate: napari shapes <-> annotations and regions, per-region sums of a map.

Everything here is level-0 px, axis order (y, x). A region is a
:class:`~napari_stmap.core.geometry.Region` (signed parts: outer shapes +1, holes −1); GeoJSON
files are read and written by :mod:`napari_stmap.core.io.regions`, whose
:class:`~napari_stmap.core.io.regions.Annotation` (one QuPath object) is also what napari
shapes group into.

napari shapes (a Shapes layer has no holes) map onto annotations through two per-shape
properties: ``feature`` (shapes with the same value >= 0 are parts of one annotation; < 0 or
missing: a region of its own) and ``hole`` (True: subtracted from the outer shape that holds it).
Region values follow the additive rule: a prediction is summed over every part
(:func:`~napari_stmap.core.predict.region_parts`) and
:func:`~napari_stmap.core.predict.combine_parts` adds them up with their signs.
A :class:`RegionTable` is what the Regions dock shows and exports: regions × genes of a
prediction (:func:`compute_regions`, any :class:`~napari_stmap.core.predict.PredictionSource`),
as AnnData by :func:`build_export`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import StmapInputError
from .export import build_anndata
from .geometry import (
    Disk,
    Ellipse,
    Footprint,
    Polygon,
    Rectangle,
    Region,
    Square,
    disks,
    rectangle_from_corners,
    squares,
)
from .io.regions import Annotation, as_rgb, nest_holes, regions_from_annotations, unique_names
from .metrics import normalize_expression
from .predict import combine_parts, region_parts

logger = logging.getLogger(__name__)

__all__ = [
    "REGION_TIMEOUT_S",
    "RegionTable",
    "annotations_from_shapes",
    "build_export",
    "compute_regions",
    "footprint_shape",
    "make_names_unique",
    "regions_from_shapes",
    "shape_footprint",
    "spot_regions",
]

#: Longest wait (s) for the tiles the regions of a table need.
REGION_TIMEOUT_S = 600.0


# ------------------------------------------------------------------------- napari shapes
def shape_footprint(kind: str, vertices_yx: np.ndarray) -> Footprint | None:
    """Footprint (level-0 px) of one napari shape, or None for lines and paths.

    ``vertices_yx`` are napari's vertices (n, 2) (y, x) (extra leading axes are dropped): a
    rectangle's 4 corners (an axis-aligned one becomes a :class:`Rectangle`, a turned one a
    :class:`Polygon`), an ellipse's 4 corners of its (possibly turned) bounding box.
    """
    v = np.asarray(vertices_yx, dtype=float)[:, -2:]
    if kind == "rectangle":
        return rectangle_from_corners(v) or Polygon(v)
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
    color = None if colors is None else as_rgb([255 * c for c in np.asarray(colors)[first][:3]])
    return Annotation(
        nest_holes([fp for _, fp in outers], [fp for _, fp in holes]),
        name=_first_set(cols["name"], idx),
        classification=_first_set(cols["classification"], idx),
        color=color,
    )


def _first_set(values: list[str], idx: list[int]) -> str:
    return next((values[i] for i in idx if values[i]), "")


def regions_from_shapes(
    shape_types: Sequence[str],
    vertices_yx: Sequence[np.ndarray],
    properties: Mapping[str, Sequence] | None = None,
) -> list[Region]:
    """Regions of napari shapes (level-0 px, (y, x)), parts of one ``feature`` grouped.

    See :func:`annotations_from_shapes` for the properties; names follow
    :func:`~napari_stmap.core.io.regions.region_names`.
    """
    return regions_from_annotations(annotations_from_shapes(shape_types, vertices_yx, properties))


# --------------------------------------------------------------------------- region tables
@dataclass
class RegionTable:
    """Predicted values of regions (what the Regions dock shows and exports).

    Attributes
    ----------
    names, kinds
        Region names and footprint kinds (``"disk"``, ``"polygon"``, …), one per region.
    centers_yx
        (n, 2) region centres, level-0 px (y, x).
    counts
        (n, G + 1) predicted counts summed over each region (genes, then the total).
    area_um2
        (n,) region areas in µm² (holes subtracted).
    genes
        The G gene names.
    """

    names: list[str]
    kinds: list[str]
    centers_yx: np.ndarray
    counts: np.ndarray
    area_um2: np.ndarray
    genes: list[str]

    @property
    def total(self) -> np.ndarray:
        """(n,) predicted all-transcript totals."""
        return self.counts[:, -1]

    def normalised(self) -> np.ndarray:
        """(n, G) ``log1p(1e4 · gene / total)`` after summing."""
        return normalize_expression(self.counts[:, :-1], self.total)


def compute_regions(source, regions: Sequence[Region], mpp: float) -> RegionTable:
    """Sum a prediction over each region (holes subtract); blocking.

    ``source``: a :class:`~napari_stmap.core.predict.PredictionSource` (its ``genes`` and
    ``region_sums`` of footprints): a dense store predicts the tiles the regions need first, a
    bin prediction adds the fraction of each bin inside a part (NaN where a region reaches bins
    not predicted yet). ``regions`` in level-0 px; ``mpp``: µm per level-0 px (for the areas).
    """
    fps, signs, groups = region_parts(regions)
    counts = combine_parts(source.region_sums(fps), signs, groups, len(regions))
    return _region_table(regions, counts, list(source.genes), mpp)


def _region_table(
    regions: Sequence[Region], counts: np.ndarray, genes: list[str], mpp: float
) -> RegionTable:
    """The table of ``regions`` (:class:`~napari_stmap.core.geometry.Region`, level-0 px)."""
    centers = np.array([r.center_yx for r in regions], dtype=float).reshape(-1, 2)
    area = np.array([r.area_px for r in regions], dtype=float) * mpp**2
    names, kinds = [r.name for r in regions], [r.kind for r in regions]
    return RegionTable(names, kinds, centers, counts, area, genes)


def build_export(table: RegionTable, mpp: float, slide_path: str):
    """AnnData of a region table (:func:`~napari_stmap.core.export.build_anndata` conventions)."""
    return build_anndata(
        table.counts[:, :-1],
        table.total,
        table.genes,
        table.centers_yx,
        mpp=mpp,
        area_um2=table.area_um2,
        footprint=table.kinds,
        names=table.names,
        uns_meta={"slide": slide_path},
    )


def spot_regions(centers_yx: np.ndarray, size_px: float, footprint: str) -> list[Region]:
    """Regions ``spot 1``, ``spot 2``, … of a spot grid (``"disk"`` or ``"square"``, level-0 px).

    ``centers_yx``: (n, 2) or more columns (the last two are y, x); ``size_px``: diameter or side.
    """
    build = disks if footprint == "disk" else squares
    spots = build(np.asarray(centers_yx)[:, -2:], size_px)
    return [Region(f"spot {k + 1}", [(fp, 1.0)]) for k, fp in enumerate(spots)]


def make_names_unique(regions: Sequence[Region]) -> list[Region]:
    """Rename ``regions`` in place so no two share a name (see ``unique_names``); returns them."""
    for region, name in zip(regions, unique_names([r.name for r in regions]), strict=True):
        region.name = name
    return list(regions)
