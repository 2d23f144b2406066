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

Modules
-------
``_mapgrid`` (:class:`MapGrid`), ``_footprints`` (the shapes, :func:`disks`, :func:`squares`),
``_region`` (:class:`Region`, :func:`rectangle_from_corners`), ``_coverage`` (exact kernels),
``_weights`` (:func:`coverage`, :func:`weight_matrix`, :func:`box_weights`), ``_grids`` (:func:`spot_grid`),
``_turns`` (:func:`turn_points`, :func:`turn_image`), ``_common`` (checks, constants,
:func:`point_in_ring`).
This module is the public face: import from ``napari_stmap.core.geometry``.
"""

from __future__ import annotations

from ._common import point_in_ring
from ._footprints import Disk, Ellipse, Footprint, Polygon, Rectangle, Square, disks, squares
from ._grids import spot_grid
from ._mapgrid import MapGrid
from ._region import Region, rectangle_from_corners
from ._turns import turn_image, turn_points
from ._weights import box_weights, coverage, weight_matrix

__all__ = [
    "Disk",
    "Ellipse",
    "Footprint",
    "MapGrid",
    "Polygon",
    "Rectangle",
    "Region",
    "Square",
    "box_weights",
    "coverage",
    "disks",
    "point_in_ring",
    "rectangle_from_corners",
    "spot_grid",
    "squares",
    "turn_image",
    "turn_points",
    "weight_matrix",
]
