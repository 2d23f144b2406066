"""Spot grids: spots of one size (µm given as level-0 px) on a square or hexagonal lattice.

:func:`spot_grid` keeps the spots whose whole footprint lies inside a region (bbox or
footprint, level-0 px, axis order (y, x)).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np

from ..errors import StmapInputError
from ._common import _CHUNK, BBox, _finite
from ._footprints import Footprint, _box_outline, disks, squares

logger = logging.getLogger(__name__)


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
