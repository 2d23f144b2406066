"""Footprints: regions in level-0 slide px, axis order (y, x), with exact areas and outlines.

:class:`Disk`, :class:`Square`, :class:`Rectangle`, :class:`Ellipse` and :class:`Polygon` are
frozen dataclasses under :class:`Footprint`; :func:`disks` / :func:`squares` build many at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import StmapInputError
from ._common import BBox, _finite, _pair


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
