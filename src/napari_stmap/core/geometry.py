"""Footprints in level-0 slide pixels and the fraction of each map pixel they cover.

A dense prediction map is a regular grid of *map pixels* (:class:`MapGrid`). A footprint (a
spot, a bin or a drawn shape: :class:`Disk`, :class:`Square`, :class:`Rectangle`,
:class:`Ellipse`, :class:`Polygon`) covers each map pixel by a fraction in [0, 1]: the area of
footprint ∩ pixel divided by the pixel's area. The value of a region is the sum over map pixels
of fraction × map value (the additive rule of ``DESIGN.md``), so one sparse matrix
(:func:`weight_matrix`, ``n_footprints × H·W``) turns a map into spot values, in numpy and in
torch alike (:mod:`napari_stmap.core.aggregate`). A :class:`Region` is a named, signed sum of
footprints (outer shapes +1, holes −1), so its value is the same signed sum of its parts' values.
:func:`turn_points` / :func:`turn_image` are the 8 turns and flips of a square image and of
positions on it (augmentation and test-time augmentation).

Conventions
-----------
- All positions and sizes are level-0 slide pixels, axis order (y, x).
- Map pixel ``(i, j)`` spans ``[oy + i·p, oy + (i+1)·p) × [ox + j·p, ox + (j+1)·p)`` in level-0
  px, where ``(oy, ox) = grid.origin_yx`` is the top-left *corner* of pixel (0, 0) and
  ``p = grid.pixel_px``. Map coordinates (:meth:`MapGrid.to_map`) put pixel ``(i, j)`` on
  ``[i, i+1) × [j, j+1)``, so its centre is at ``(i + 0.5, j + 0.5)``.
- Footprints partly outside the grid only count the part inside: their weights are the
  fractions of the map pixels that exist. ``W.sum(axis=1) · pixel_px² / area_px()`` is the
  fraction of each footprint that lies inside the grid.

Accuracy
--------
- :class:`Square` and :class:`Rectangle`: exact (products of 1-D interval overlaps).
- :class:`Disk` (and circular :class:`Ellipse`): exact, from the closed-form area of a disk cut
  by two half-planes (inclusion–exclusion over pixel corners).
- :class:`Polygon`: exact (each edge is cut at the pixel lines and its signed area is
  accumulated along rows, as exact-area font rasterisers do), so a polygon cut in two parts
  sums to the whole to round-off.
- :class:`Ellipse`: an equal-area polygon of up to 8192 vertices within ~1e-3 map px of the
  curve: total area exact, each pixel's fraction within ~1e-3.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from .errors import StmapInputError

__all__ = [
    "Disk",
    "Ellipse",
    "Footprint",
    "MapGrid",
    "Polygon",
    "Rectangle",
    "Region",
    "Square",
    "coverage",
    "disks",
    "rectangle_from_corners",
    "spot_grid",
    "squares",
    "turn_image",
    "turn_points",
    "weight_matrix",
]

logger = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]
_TINY = 1e-12  # fractions at or below this are dropped (round-off of exact formulas)
_CHUNK = 2_000_000  # elements per vectorised batch (bounds temporary memory)


def _finite(name: str, value: float, *, positive: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        msg = f"{name}={value!r} is not valid: pass {need}."
        raise StmapInputError(msg)
    return value


def _pair(name: str, value: Sequence[float], *, positive: bool = False) -> tuple[float, float]:
    try:
        y, x = value
        pair = (float(y), float(x))
    except (TypeError, ValueError):
        msg = f"{name}={value!r} is not a (y, x) pair: pass two numbers."
        raise StmapInputError(msg) from None
    ok = math.isfinite(pair[0]) and math.isfinite(pair[1])
    if not ok or (positive and min(pair) <= 0):
        need = "finite numbers > 0" if positive else "finite numbers"
        msg = f"{name}={value!r} is not valid: pass two {need}."
        raise StmapInputError(msg)
    return pair


# --------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class MapGrid:
    """Where a dense map's pixels lie on the slide.

    Parameters
    ----------
    origin_yx
        Level-0 px position (y, x) of the top-left *corner* of map pixel (0, 0).
    pixel_px
        Side of one (square) map pixel in level-0 px, e.g. ``2 µm / mpp``.
    shape_hw
        Map size (H, W) in map pixels.
    """

    origin_yx: tuple[float, float]
    pixel_px: float
    shape_hw: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin_yx", _pair("origin_yx", self.origin_yx))
        object.__setattr__(self, "pixel_px", _finite("pixel_px", self.pixel_px, positive=True))
        hw = tuple(int(v) for v in np.asarray(self.shape_hw).ravel())
        if len(hw) != 2 or min(hw) < 0:
            msg = f"shape_hw={self.shape_hw!r} is not a map size: pass (H, W) with H, W >= 0."
            raise StmapInputError(msg)
        object.__setattr__(self, "shape_hw", hw)

    @property
    def bbox_yx(self) -> BBox:
        """Level-0 px extent ``(y0, x0, y1, x1)`` of the whole grid (outer pixel edges)."""
        (oy, ox), p, (h, w) = self.origin_yx, self.pixel_px, self.shape_hw
        return (oy, ox, oy + h * p, ox + w * p)

    @property
    def translate_yx(self) -> tuple[float, float]:
        """Level-0 px centre of map pixel (0, 0): the napari ``translate`` (÷ mpp for µm)."""
        half = self.pixel_px / 2
        return (self.origin_yx[0] + half, self.origin_yx[1] + half)

    def pixel_centers(self) -> np.ndarray:
        """Level-0 px centres (y, x) of all map pixels, shape (H·W, 2), row-major.

        Row ``i·W + j`` is pixel ``(i, j)``: the column order of :func:`weight_matrix`.
        """
        h, w = self.shape_hw
        ys = self.origin_yx[0] + (np.arange(h) + 0.5) * self.pixel_px
        xs = self.origin_yx[1] + (np.arange(w) + 0.5) * self.pixel_px
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)

    def to_map(self, yx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Level-0 px (..., 2) (y, x) -> fractional map coords; pixel (i, j) is [i, i+1)×[j, j+1)."""
        return (np.asarray(yx, dtype=float) - np.asarray(self.origin_yx)) / self.pixel_px

    def from_map(self, ij: np.ndarray | Sequence[float]) -> np.ndarray:
        """Fractional map coords (..., 2) -> level-0 px (y, x); inverse of :meth:`to_map`."""
        return np.asarray(ij, dtype=float) * self.pixel_px + np.asarray(self.origin_yx)

    def crop_slices(self, bbox_yx: BBox) -> tuple[slice, slice]:
        """Row and column slices of the map pixels that overlap a level-0 px bbox (clipped)."""
        y0, x0, y1, x1 = (float(v) for v in bbox_yx)
        (i0, j0), (i1, j1) = self.to_map((y0, x0)), self.to_map((y1, x1))
        h, w = self.shape_hw
        ri = (int(np.clip(np.floor(i0), 0, h)), int(np.clip(np.ceil(i1), 0, h)))
        rj = (int(np.clip(np.floor(j0), 0, w)), int(np.clip(np.ceil(j1), 0, w)))
        return slice(ri[0], max(ri)), slice(rj[0], max(rj))

    def crop(self, bbox_yx: BBox) -> MapGrid:
        """Sub-grid of the whole map pixels overlapping ``bbox_yx`` (level-0 px), clipped.

        ``map[:, *grid.crop_slices(bbox)]`` is the matching part of a (C, H, W) map.
        """
        rows, cols = self.crop_slices(bbox_yx)
        origin = self.from_map((rows.start, cols.start))
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        return MapGrid((float(origin[0]), float(origin[1])), self.pixel_px, shape)


# --------------------------------------------------------------------------------- footprints
@dataclass(frozen=True)
class Footprint:
    """Base class of a region in level-0 px; subclasses are frozen dataclasses."""

    def bbox_yx(self) -> BBox:
        """Level-0 px bounding box ``(y0, x0, y1, x1)``."""
        raise NotImplementedError

    def area_px(self) -> float:
        """Exact analytic area in level-0 px²."""
        raise NotImplementedError

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        """Boundary as polygon vertices (n, 2), level-0 px (y, x); curves use ``n_vertices``.

        Curved outlines are inscribed polygons (vertices on the curve).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Disk(Footprint):
    """Disk of diameter ``diameter_px`` centred on ``center_yx`` (level-0 px)."""

    center_yx: tuple[float, float]
    diameter_px: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_yx", _pair("center_yx", self.center_yx))
        object.__setattr__(
            self, "diameter_px", _finite("diameter_px", self.diameter_px, positive=True)
        )

    @property
    def radius_px(self) -> float:
        return self.diameter_px / 2

    def bbox_yx(self) -> BBox:
        (cy, cx), r = self.center_yx, self.radius_px
        return (cy - r, cx - r, cy + r, cx + r)

    def area_px(self) -> float:
        return math.pi * self.radius_px**2

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        return _ellipse_outline(self.center_yx, (self.radius_px,) * 2, 0.0, n_vertices)


@dataclass(frozen=True)
class Square(Footprint):
    """Axis-aligned square of side ``side_px`` centred on ``center_yx`` (level-0 px)."""

    center_yx: tuple[float, float]
    side_px: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_yx", _pair("center_yx", self.center_yx))
        object.__setattr__(self, "side_px", _finite("side_px", self.side_px, positive=True))

    def bbox_yx(self) -> BBox:
        (cy, cx), h = self.center_yx, self.side_px / 2
        return (cy - h, cx - h, cy + h, cx + h)

    def area_px(self) -> float:
        return self.side_px**2

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        return _box_outline(self.bbox_yx())


@dataclass(frozen=True)
class Rectangle(Footprint):
    """Axis-aligned rectangle ``[y0, y1) × [x0, x1)`` in level-0 px."""

    y0: float
    x0: float
    y1: float
    x1: float

    def __post_init__(self) -> None:
        for name in ("y0", "x0", "y1", "x1"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not (self.y1 > self.y0 and self.x1 > self.x0):
            msg = f"Rectangle{self.bbox_yx()} is empty: pass y0 < y1 and x0 < x1."
            raise StmapInputError(msg)

    def bbox_yx(self) -> BBox:
        return (self.y0, self.x0, self.y1, self.x1)

    def area_px(self) -> float:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        return _box_outline(self.bbox_yx())


@dataclass(frozen=True)
class Ellipse(Footprint):
    """Ellipse centred on ``center_yx`` with semi-axes ``radii_yx`` (level-0 px).

    ``angle_rad`` turns the first semi-axis (``radii_yx[0]``, along +y when 0) towards +x.
    """

    center_yx: tuple[float, float]
    radii_yx: tuple[float, float]
    angle_rad: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "center_yx", _pair("center_yx", self.center_yx))
        object.__setattr__(self, "radii_yx", _pair("radii_yx", self.radii_yx, positive=True))
        object.__setattr__(self, "angle_rad", _finite("angle_rad", self.angle_rad))

    def half_extent_yx(self) -> tuple[float, float]:
        """Half height and half width of the bounding box (level-0 px)."""
        (ry, rx), c, s = self.radii_yx, math.cos(self.angle_rad), math.sin(self.angle_rad)
        return (math.hypot(ry * c, rx * s), math.hypot(ry * s, rx * c))

    def bbox_yx(self) -> BBox:
        (cy, cx), (hy, hx) = self.center_yx, self.half_extent_yx()
        return (cy - hy, cx - hx, cy + hy, cx + hx)

    def area_px(self) -> float:
        return math.pi * self.radii_yx[0] * self.radii_yx[1]

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        return _ellipse_outline(self.center_yx, self.radii_yx, self.angle_rad, n_vertices)


@dataclass(frozen=True)
class Polygon(Footprint):
    """Simple (non-self-intersecting) polygon, vertices (n, 2) in level-0 px (y, x).

    Stored as a tuple of ``(y, x)`` tuples (hashable); ``np.asarray(p.vertices_yx)`` gives the
    (n, 2) array. Either orientation; the closing edge is implicit. A self-intersecting outline
    is not supported: lobes wound the other way cancel (coverage counts winding, clipped to
    [0, 1]), as they do in :meth:`area_px` (shoelace).
    """

    vertices_yx: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        v = np.asarray(self.vertices_yx, dtype=float)
        if v.ndim != 2 or v.shape[1] != 2 or v.shape[0] < 3 or not np.isfinite(v).all():
            msg = f"Polygon vertices of shape {v.shape} are not valid: pass (n >= 3, 2) finite (y, x)."
            raise StmapInputError(msg)
        object.__setattr__(self, "vertices_yx", tuple(map(tuple, v.tolist())))

    def bbox_yx(self) -> BBox:
        v = np.asarray(self.vertices_yx)
        (y0, x0), (y1, x1) = v.min(axis=0), v.max(axis=0)
        return (float(y0), float(x0), float(y1), float(x1))

    def area_px(self) -> float:
        v = np.asarray(self.vertices_yx)
        y, x = v[:, 0], v[:, 1]
        return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)

    def outline_yx(self, n_vertices: int = 256) -> np.ndarray:
        return np.asarray(self.vertices_yx, dtype=float)


def _box_outline(bbox: BBox) -> np.ndarray:
    y0, x0, y1, x1 = bbox
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=float)


def _ellipse_outline(center, radii, angle, n: int) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, max(int(n), 3), endpoint=False)
    u, v = radii[0] * np.cos(t), radii[1] * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([center[0] + u * c - v * s, center[1] + u * s + v * c], axis=1)


def disks(centers_yx: np.ndarray, diameter_px: float | np.ndarray) -> list[Disk]:
    """One :class:`Disk` per centre; ``centers_yx`` (n, 2) level-0 px, diameter scalar or (n,)."""
    centers, diam = _centers_and_sizes(centers_yx, diameter_px, "diameter_px")
    return [Disk((y, x), d) for (y, x), d in zip(centers.tolist(), diam.tolist(), strict=True)]


def squares(centers_yx: np.ndarray, side_px: float | np.ndarray) -> list[Square]:
    """One :class:`Square` per centre; ``centers_yx`` (n, 2) level-0 px, side scalar or (n,)."""
    centers, side = _centers_and_sizes(centers_yx, side_px, "side_px")
    return [Square((y, x), s) for (y, x), s in zip(centers.tolist(), side.tolist(), strict=True)]


def _centers_and_sizes(centers_yx, size, name: str) -> tuple[np.ndarray, np.ndarray]:
    centers = np.asarray(centers_yx, dtype=float).reshape(-1, 2)
    sizes = np.broadcast_to(np.asarray(size, dtype=float), (len(centers),))
    if not np.isfinite(centers).all():
        msg = "centers_yx contains NaN or inf: pass finite (n, 2) level-0 px (y, x) centres."
        raise StmapInputError(msg)
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        msg = f"{name} has values <= 0 or not finite (min {sizes.min(initial=np.inf)}): pass sizes > 0."
        raise StmapInputError(msg)
    return centers, sizes


# ------------------------------------------------------------------------------------ regions
class Region:
    """One named region: signed parts (outer rings +1, holes −1) whose weighted sum is the region.

    Attributes
    ----------
    name : str
        Its name (unique among the regions of a table).
    parts : list of (Footprint, float)
        Footprints in level-0 px with their sign: a region's value is the sum of each part's
        value times its sign (holes subtract, parts of a MultiPolygon add).
    """

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


def rectangle_from_corners(yx: np.ndarray) -> Rectangle | None:
    """A :class:`Rectangle` when ``yx`` ((n, 2) level-0 px, (y, x)) are 4 corners joined by
    axis-aligned edges (in either direction); else None."""
    if len(yx) != 4:
        return None
    edges = np.roll(yx, -1, axis=0) - yx
    flat = np.abs(edges) <= max(1e-6, 1e-9 * float(np.abs(yx).max()))
    if not ((flat.sum(axis=1) == 1).all() and (flat[:, 0] != np.roll(flat[:, 0], -1)).all()):
        return None
    (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
    return Rectangle(float(y0), float(x0), float(y1), float(x1))


# ------------------------------------------------------------------------ exact batch coverage
def _assemble(
    frac: np.ndarray, i0: np.ndarray, j0: np.ndarray, grid: MapGrid
) -> tuple[np.ndarray, ...]:
    """Sparse entries of per-footprint windows ``frac`` (n, Ky, Kx) starting at map (i0, j0).

    Keeps pixels inside the grid with fraction > _TINY and clips round-off above 1. Entries come
    out sorted by footprint, then row, then column.
    """
    h, w = grid.shape_hw
    n, ky, kx = frac.shape
    rows = i0[:, None] + np.arange(ky)
    cols = j0[:, None] + np.arange(kx)
    keep = frac > _TINY
    keep &= ((rows >= 0) & (rows < h))[:, :, None]
    keep &= ((cols >= 0) & (cols < w))[:, None, :]
    idx, a, b = np.nonzero(keep)
    return idx, i0[idx] + a, j0[idx] + b, np.minimum(frac[keep], 1.0)


def _window(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, int]:
    """First map index and a common count K of pixels spanning [lo, hi] (map coords)."""
    start = np.floor(lo).astype(np.int64)
    count = int(max(1, (np.ceil(hi).astype(np.int64) - start).max(initial=1)))
    return start, count


def _box_batch(box: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact coverage of axis-aligned boxes (n, 4) level-0 px: 1-D overlap products."""
    b = np.concatenate([grid.to_map(box[:, :2]), grid.to_map(box[:, 2:])], axis=1)
    i0, ky = _window(b[:, 0], b[:, 2])
    j0, kx = _window(b[:, 1], b[:, 3])
    ii = i0[:, None] + np.arange(ky)
    jj = j0[:, None] + np.arange(kx)
    fy = np.clip(np.minimum(b[:, 2:3], ii + 1) - np.maximum(b[:, 0:1], ii), 0.0, 1.0)
    fx = np.clip(np.minimum(b[:, 3:4], jj + 1) - np.maximum(b[:, 1:2], jj), 0.0, 1.0)
    return _assemble(fy[:, :, None] * fx[:, None, :], i0, j0, grid)


def _quadrant_area(y: np.ndarray, x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed area of disk(0, r) ∩ [0, y] × [0, x] (odd in y and in x).

    Inclusion–exclusion of this over a pixel's four corners gives the exact pixel ∩ disk area.
    """
    sy, sx = np.sign(y), np.sign(x)
    ay, ax = np.minimum(np.abs(y), r), np.minimum(np.abs(x), r)

    def chord_integral(t):  # ∫_0^t sqrt(r² - s²) ds
        return 0.5 * (
            t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(np.clip(t / r, -1, 1))
        )

    w = np.sqrt(np.maximum(r * r - ay * ay, 0.0))  # half chord at height ay
    inside = ay * ax  # the corner (ay, ax) lies inside the disk: a plain rectangle
    cut = ay * w + chord_integral(ax) - chord_integral(w)
    return sy * sx * np.where(ax <= w, inside, cut)


def _disk_batch(centers: np.ndarray, diam: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact coverage of disks (level-0 px centres (n, 2), diameters (n,))."""
    c = grid.to_map(centers)
    r = diam / (2 * grid.pixel_px)
    i0, ky = _window(c[:, 0] - r, c[:, 0] + r)
    j0, kx = _window(c[:, 1] - r, c[:, 1] + r)
    ey = (i0[:, None] + np.arange(ky + 1)) - c[:, 0:1]  # pixel edges relative to centre
    ex = (j0[:, None] + np.arange(kx + 1)) - c[:, 1:2]
    q = _quadrant_area(ey[:, :, None], ex[:, None, :], r[:, None, None])
    frac = q[:, 1:, 1:] - q[:, :-1, 1:] - q[:, 1:, :-1] + q[:, :-1, :-1]
    return _assemble(frac, i0, j0, grid)


# ---------------------------------------------------------------- exact polygon coverage
def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    z = np.zeros(0, dtype=np.int64)
    return z, z.copy(), z.copy(), np.zeros(0, dtype=float)


def _split_points(a: np.ndarray, b: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """(edge, t): where segments a -> b cross an integer in [lo, hi] strictly inside, t in (0, 1)."""
    k0 = np.maximum(np.floor(np.minimum(a, b)) + 1, lo)
    k1 = np.minimum(np.ceil(np.maximum(a, b)) - 1, hi)
    count = np.maximum(k1 - k0 + 1, 0).astype(np.int64)
    edge = np.repeat(np.arange(a.size), count)
    k = k0[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(count) - count, count))
    return edge, (k - a[edge]) / (b[edge] - a[edge])


def _polygon_pieces(v: np.ndarray, h: int, w: int) -> tuple[np.ndarray, ...]:
    """Cut every edge (map coords) at the grid's row and column lines.

    Returns the midpoint (y, x) and signed height dy of each piece; a piece inside the grid lies
    within one pixel, so its mean x is its midpoint x.
    """
    ya, xa = v[:, 0], v[:, 1]
    yb, xb = np.roll(ya, -1), np.roll(xa, -1)
    ends = np.arange(len(v))
    ey, ty = _split_points(ya, yb, 0, h)
    ex, tx = _split_points(xa, xb, 0, w)
    edge = np.concatenate([ends, ends, ey, ex])
    t = np.concatenate([np.zeros(len(v)), np.ones(len(v)), ty, tx])
    order = np.lexsort((t, edge))
    edge, t = edge[order], t[order]
    same = edge[1:] == edge[:-1]
    e, t0, t1 = edge[:-1][same], t[:-1][same], t[1:][same]
    dy, dx = (yb - ya)[e], (xb - xa)[e]
    y0, y1 = ya[e] + t0 * dy, ya[e] + t1 * dy
    return 0.5 * (y0 + y1), xa[e] + 0.5 * (t0 + t1) * dx, y1 - y0


def _polygon_coverage(v: np.ndarray, grid: MapGrid) -> tuple[np.ndarray, ...]:
    """Exact polygon ∩ pixel areas (vertices (n, 2) in map coords), by signed-area accumulation.

    Each edge piece adds its signed height × (width to the right of it) to its pixel and the
    rest of its height to the next column; a cumulative sum along x then gives every pixel's
    covered area (as exact-area font rasterisers do). Cost O(edge pieces + window pixels).
    """
    h, w = grid.shape_hw
    ymid, xmid, dy = _polygon_pieces(v, h, w)
    row = np.floor(ymid).astype(np.int64)
    keep = (dy != 0) & (row >= 0) & (row < h) & (xmid < w)
    orient = np.sign(-np.sum((np.roll(v[:, 0], -1) - v[:, 0]) * (np.roll(v[:, 1], -1) + v[:, 1])))
    if not keep.any() or orient == 0:
        return _empty()[1:]
    row, xmid, dy = row[keep], xmid[keep], dy[keep] * orient
    j0 = max(0, math.floor(v[:, 1].min()))
    width = min(w, math.ceil(v[:, 1].max())) - j0 + 1
    col = np.floor(xmid).astype(np.int64)
    right = np.where(col < j0, 0.0, xmid - col)  # pieces left of the window fill it whole
    col = np.maximum(col, j0) - j0
    order = np.argsort(row, kind="stable")
    row, col, right, dy = row[order], col[order], right[order], dy[order]
    step = max(1, (4 * _CHUNK) // width)
    parts = []
    for r0 in range(int(row[0]), int(row[-1]) + 1, step):
        lo, hi = np.searchsorted(row, [r0, r0 + step])
        if hi > lo:
            sl = slice(lo, hi)
            parts.append(_accumulate(row[sl] - r0, col[sl], right[sl], dy[sl], width, r0, j0))
    if not parts:
        return _empty()[1:]
    return tuple(np.concatenate(c) for c in zip(*parts, strict=True))


def _accumulate(r, col, right, dy, width, r0, j0):
    nrows = int(r.max()) + 1
    flat, n = r * width + col, nrows * width
    acc = np.bincount(flat, dy * (1.0 - right), n) + np.bincount(flat + 1, dy * right, n + 1)[:n]
    cov = np.cumsum(acc.reshape(nrows, width), axis=1)[:, :-1]
    rr, cc = np.nonzero(cov > _TINY)
    return rr + r0, cc + j0, np.minimum(cov[rr, cc], 1.0)


def _ellipse_vertices(e: Ellipse, grid: MapGrid) -> np.ndarray:
    """Equal-area polygon of an ellipse in map coords, within ~1e-3 map px of the curve."""
    r_max = max(e.radii_yx) / grid.pixel_px
    n = int(np.clip(math.ceil(math.pi * math.sqrt(r_max / 2e-3)), 64, 8192))
    gain = math.sqrt((2 * math.pi / n) / math.sin(2 * math.pi / n))  # polygon area = ellipse area
    radii = (e.radii_yx[0] * gain, e.radii_yx[1] * gain)
    return grid.to_map(_ellipse_outline(e.center_yx, radii, e.angle_rad, n))


# ------------------------------------------------------------------------------ public API
def coverage(footprint: Footprint, grid: MapGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of each map pixel covered by one footprint.

    Parameters
    ----------
    footprint
        Region in level-0 px.
    grid
        The map's pixel grid.

    Returns
    -------
    rows, cols, frac
        Map pixel indices (int64) and covered fraction of each pixel's area in (0, 1]; only
        pixels inside the grid with a nonzero fraction. ``frac.sum() · pixel_px²`` equals
        ``footprint.area_px()`` when the footprint lies inside the grid.
    """
    if isinstance(footprint, Disk):
        part = _disk_batch(np.array([footprint.center_yx]), np.array([footprint.diameter_px]), grid)
    elif isinstance(footprint, (Square, Rectangle)):
        part = _box_batch(np.array([footprint.bbox_yx()]), grid)
    elif isinstance(footprint, Ellipse) and footprint.radii_yx[0] == footprint.radii_yx[1]:
        circle = Disk(footprint.center_yx, 2 * footprint.radii_yx[0])
        return coverage(circle, grid)
    elif isinstance(footprint, Ellipse):
        return _polygon_coverage(_ellipse_vertices(footprint, grid), grid)
    elif isinstance(footprint, Polygon):
        return _polygon_coverage(grid.to_map(np.asarray(footprint.vertices_yx)), grid)
    else:
        msg = f"footprint of type {type(footprint).__name__} is not supported: pass a Disk, Square, Rectangle, Ellipse or Polygon."
        raise StmapInputError(msg)
    return part[1], part[2], part[3]


def _chunked(
    kernel, params: np.ndarray, cells: np.ndarray, grid: MapGrid
) -> tuple[np.ndarray, ...]:
    """Run a batch kernel over footprints grouped by window size, in memory-bounded chunks."""
    parts = []
    groups = np.unique(cells)
    for size in groups:
        members = np.flatnonzero(cells == size)
        step = max(1, _CHUNK // int(size))
        for start in range(0, members.size, step):
            sel = members[start : start + step]
            idx, rows, cols, frac = kernel(*(p[sel] for p in params), grid)
            parts.append((sel[idx], rows, cols, frac))
    return _concat(parts)


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Concatenate (idx, rows, cols, frac) parts; no copy for a single part."""
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate(c) for c in zip(*parts, strict=True)) if parts else _empty()


def weight_matrix(footprints: Sequence[Footprint] | Footprint, grid: MapGrid) -> sp.csr_matrix:
    """Sparse aggregation weights of many footprints on a map grid.

    Parameters
    ----------
    footprints
        n footprints in level-0 px (a single one is treated as a list of one).
    grid
        The map's pixel grid, shape (H, W).

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape (n, H·W), float64; entry ``[k, i·W + j]`` is the fraction of map pixel (i, j)
        covered by footprint k. ``W @ map.reshape(C, H·W).T`` gives the (n, C) region sums.
        Disks, squares and rectangles are vectorised; ellipses and polygons run one by one.
    """
    fps = [footprints] if isinstance(footprints, Footprint) else list(footprints)
    p, (h, w) = grid.pixel_px, grid.shape_hw
    kinds = np.array([_KIND.get(type(f), 3) for f in fps], dtype=np.int8)
    parts = []
    disk_ix = np.flatnonzero(kinds == 0)
    if disk_ix.size:
        c = np.array([fps[i].center_yx for i in disk_ix], dtype=float).reshape(-1, 2)
        d = np.array([fps[i].diameter_px for i in disk_ix], dtype=float)
        cells = (np.ceil(d / p).astype(np.int64) + 2) ** 2
        idx, rows, cols, frac = _chunked(_disk_batch, (c, d), cells, grid)
        parts.append((disk_ix[idx], rows, cols, frac))
    box_ix = np.flatnonzero(kinds == 1)
    if box_ix.size:
        b = np.array([fps[i].bbox_yx() for i in box_ix], dtype=float).reshape(-1, 4)
        cells = (np.ceil((b[:, 2] - b[:, 0]) / p) + 1) * (np.ceil((b[:, 3] - b[:, 1]) / p) + 1)
        idx, rows, cols, frac = _chunked(_box_batch, (b,), cells.astype(np.int64), grid)
        parts.append((box_ix[idx], rows, cols, frac))
    for i in np.flatnonzero(kinds == 3):
        rows, cols, frac = coverage(fps[i], grid)
        parts.append((np.full(rows.size, i, dtype=np.int64), rows, cols, frac))
    idx, rows, cols, frac = _concat(parts)
    return _to_csr(idx, rows * w + cols, frac, (len(fps), h * w))


def _to_csr(idx: np.ndarray, flat: np.ndarray, frac: np.ndarray, shape: tuple[int, int]):
    """CSR from entries sorted by column within each footprint (as every kernel emits them)."""
    if idx.size and np.any(np.diff(idx) < 0):
        order = np.argsort(idx, kind="stable")
        idx, flat, frac = idx[order], flat[order], frac[order]
    small = max(shape[1], idx.size) < 2**31 - 1
    itype = np.int32 if small else np.int64
    indptr = np.zeros(shape[0] + 1, dtype=itype)
    np.cumsum(np.bincount(idx, minlength=shape[0]), out=indptr[1:])
    mat = sp.csr_matrix((frac, flat.astype(itype, copy=False), indptr), shape=shape)
    mat.has_sorted_indices = True
    return mat


_KIND = {Disk: 0, Square: 1, Rectangle: 1}


# ------------------------------------------------------------------------------ spot grids
def spot_grid(
    region: BBox | Footprint,
    *,
    size_px: float,
    pitch_px: float,
    footprint: Literal["disk", "square"] = "disk",
    hexagonal: bool = False,
) -> tuple[np.ndarray, list[Footprint]]:
    """Spots of one size on a regular lattice that lie entirely inside a region.

    Parameters
    ----------
    region
        Level-0 px bbox ``(y0, x0, y1, x1)`` or any :class:`Footprint`.
    size_px
        Spot diameter (disk) or side (square), level-0 px.
    pitch_px
        Centre-to-centre distance, level-0 px.
    footprint
        ``"disk"`` or ``"square"`` spots.
    hexagonal
        Visium-like lattice: rows ``pitch·√3/2`` apart, every other row shifted by ``pitch/2``.

    Returns
    -------
    centers_yx, footprints
        (n, 2) level-0 px centres (row-major lattice order) and the matching footprints.

    Notes
    -----
    A spot is kept when its **whole footprint** lies inside the region (touching the boundary
    counts as inside): its centre is inside and its distance to the region's outline is at
    least the spot's half size (Euclidean for disks, Chebyshev for squares). This is exact for
    bbox, rectangle, square and polygon regions; disk and ellipse regions use their inscribed
    256-gon, so spots within ~1e-4 radius of the curve may be left out. The lattice is centred
    in the region's bounding box.
    """
    if footprint not in ("disk", "square"):
        msg = f"footprint={footprint!r} is not a spot shape: pass 'disk' or 'square'."
        raise StmapInputError(msg)
    size = _finite("size_px", size_px, positive=True)
    pitch = _finite("pitch_px", pitch_px, positive=True)
    if isinstance(region, Footprint):
        bbox, outline = region.bbox_yx(), region.outline_yx(256)
    else:
        bbox = tuple(_finite("bbox_yx", v) for v in np.asarray(region, dtype=float).ravel())
        if len(bbox) != 4 or bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            msg = f"region={region!r} is not a bbox: pass (y0, x0, y1, x1) with y0 < y1, x0 < x1."
            raise StmapInputError(msg)
        outline = _box_outline(bbox)
    centers = _lattice(bbox, size, pitch, hexagonal)
    centers = centers[_fits_inside(centers, outline, size / 2, chebyshev=footprint == "square")]
    build = disks if footprint == "disk" else squares
    logger.debug(
        "spot_grid: %d %s spots of %.3g px at pitch %.3g px", len(centers), footprint, size, pitch
    )
    return centers, build(centers, size)


def _lattice(bbox: BBox, size: float, pitch: float, hexagonal: bool) -> np.ndarray:
    """Candidate centres (n, 2) covering ``bbox`` (level-0 px), centred in it."""
    y0, x0, y1, x1 = bbox
    dy = pitch * math.sqrt(3) / 2 if hexagonal else pitch
    ny = int(max(0.0, (y1 - y0 - size)) // dy) + 1
    nx = int(max(0.0, (x1 - x0 - size)) // pitch) + 1
    ys = y0 + size / 2 + (y1 - y0 - size - (ny - 1) * dy) / 2 + dy * np.arange(ny)
    xs = x0 + size / 2 + (x1 - x0 - size - (nx - 1) * pitch) / 2 + pitch * np.arange(nx)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if hexagonal:
        xx = xx + (np.arange(ny)[:, None] % 2) * (pitch / 2)
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _fits_inside(
    points: np.ndarray, outline: np.ndarray, reach: float, *, chebyshev: bool
) -> np.ndarray:
    """Boolean (n,): point inside the closed outline and at least ``reach`` from its edges."""
    a, b = outline, np.roll(outline, -1, axis=0)
    keep = np.zeros(len(points), dtype=bool)
    step = max(1, _CHUNK // len(a))
    tol = 1e-9 * max(reach, 1.0)
    for s0 in range(0, len(points), step):
        pts = points[s0 : s0 + step, None, :]
        inside = _even_odd(pts, a, b)
        dist = _segment_distance(a - pts, b - a, chebyshev=chebyshev).min(axis=1)
        keep[s0 : s0 + step] = inside & (dist >= reach - tol)
    return keep


def _even_odd(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Point-in-polygon (even-odd rule): pts (n, 1, 2), edges a -> b (m, 2) -> (n,) bool."""
    y, x = pts[..., 0], pts[..., 1]
    crosses = (a[:, 0] <= y) != (b[:, 0] <= y)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (y - a[:, 0]) / (b[:, 0] - a[:, 0])
    xc = a[:, 1] + t * (b[:, 1] - a[:, 1])
    return (np.count_nonzero(crosses & (x < xc), axis=1) % 2) == 1


def _segment_distance(d: np.ndarray, e: np.ndarray, *, chebyshev: bool) -> np.ndarray:
    """Distance from the origin to segments ``d + t·e``, t in [0, 1]; d (n, m, 2), e (m, 2).

    Euclidean, or Chebyshev (max-norm) where the minimum lies at an end, a zero of one
    coordinate, or where both coordinates have equal magnitude.
    """
    dy, dx, ey, ex = d[..., 0], d[..., 1], e[:, 0], e[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if not chebyshev:
            t = np.clip(-(dy * ey + dx * ex) / (ey * ey + ex * ex), 0, 1)
            return np.hypot(dy + t * ey, dx + t * ex)
        cands = [np.zeros_like(dy), np.ones_like(dy), -dy / ey, -dx / ex]
        cands += [-(dy - dx) / (ey - ex), -(dy + dx) / (ey + ex)]
    best = np.full(dy.shape, np.inf)
    for t in cands:
        t = np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0, 1)
        best = np.minimum(best, np.maximum(np.abs(dy + t * ey), np.abs(dx + t * ex)))
    return best


# ------------------------------------------------------------------------------ dihedral turns
def turn_points(centers: np.ndarray, size: int, k: int, flip: bool) -> np.ndarray:
    """Where points of a ``size`` × ``size`` image go under ``np.rot90(img, k)`` then a flip.

    Parameters
    ----------
    centers : numpy.ndarray
        (n, 2) points, continuous px (y, x) of the image, pixel (i, j) spanning
        ``[i, i+1) × [j, j+1)``.
    size : int
        Side of the (square) image, px.
    k : int
        Quarter turns, as ``np.rot90(img, k)`` (counter-clockwise on screen).
    flip : bool
        Mirror x (``img[:, ::-1]``) after the turn.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 positions (y, x) in the turned image (:func:`turn_image`).
    """
    c = np.asarray(centers, dtype=float).reshape(-1, 2).copy()
    for _ in range(k % 4):
        c = np.stack([size - c[:, 1], c[:, 0]], axis=1)  # rot90: (y, x) -> (W - x, y)
    if flip:
        c[:, 1] = size - c[:, 1]
    return c


def turn_image(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``np.rot90(image, k)`` of a (y, x, ...) image, then mirrored in x if ``flip``.

    C-contiguous (the input itself when nothing turns); :func:`turn_points` moves positions on
    the image the same way.
    """
    out = np.rot90(image, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)
