"""Boxes and shapes against the slide's extent: refuse what misses it, warn about what is clipped.

Every box is level-0 px ``(y0, x0, y1, x1)``; a slide of ``shape_yx = (H, W)`` covers
``[0, H) × [0, W)``. A box that only touches the slide's edge (zero overlap) lies outside.
Messages print GeoJSON shapes as ``x …, y …`` (the order GeoJSON and QuPath use) and command
line boxes in the order they were typed (``--region Y0 X0 Y1 X1``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .errors import StmapInputError, StmapInputWarning

__all__ = ["box_text", "check_box_on_slide", "check_regions_on_slide", "overlap_kind"]

#: How many shapes a message names before it says "and N more".
_MAX_NAMED = 3


def box_text(bbox_yx: Sequence[float], order: str = "xy") -> str:
    """``"x 12000–13000, y 5–100 px"`` (``order="xy"``) or ``"y …, x … px"`` (``"yx"``)."""
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    xs, ys = f"x {_num(x0)}–{_num(x1)}", f"y {_num(y0)}–{_num(y1)}"
    return f"{xs}, {ys} px" if order == "xy" else f"{ys}, {xs} px"


def _num(value: float) -> str:
    """``12000.0 -> "12000"``, ``5.25 -> "5.2"``: px to 0.1, never in exponent notation."""
    return f"{value:.1f}".removesuffix(".0")


def _slide_box(shape_yx: Sequence[int]) -> tuple[float, float, float, float]:
    return 0.0, 0.0, float(shape_yx[0]), float(shape_yx[1])


def overlap_kind(bbox_yx: Sequence[float], shape_yx: Sequence[int]) -> str:
    """Where a level-0 px box lies on a slide of ``shape_yx`` (H, W).

    Returns
    -------
    str
        ``"inside"`` (within ``[0, H] × [0, W]``), ``"partly"`` (overlaps and reaches past an
        edge) or ``"outside"`` (no overlap of positive area).
    """
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    h, w = float(shape_yx[0]), float(shape_yx[1])
    if y0 >= h or x0 >= w or y1 <= 0 or x1 <= 0:
        return "outside"
    if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
        return "partly"
    return "inside"


def _clip(bbox_yx: Sequence[float], shape_yx: Sequence[int]) -> tuple[float, float, float, float]:
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    h, w = float(shape_yx[0]), float(shape_yx[1])
    return max(y0, 0.0), max(x0, 0.0), min(y1, h), min(x1, w)


def check_box_on_slide(
    bbox_yx: Sequence[float], shape_yx: Sequence[int], *, what: str, slide: str
) -> tuple[float, float, float, float]:
    """The part of a box on the slide; refuse a box off it, warn once when clipping.

    Parameters
    ----------
    bbox_yx : (y0, x0, y1, x1)
        Level-0 px box, e.g. ``stmap predict --region``.
    shape_yx : (H, W)
        Level-0 size of the slide, px.
    what : str
        How the message names the box, e.g. ``"--region 0 0 100 100"``.
    slide : str
        How the message names the slide (its file name).

    Returns
    -------
    (y0, x0, y1, x1)
        The box clipped to ``[0, H] × [0, W]`` level-0 px.

    Raises
    ------
    StmapInputError
        The box is empty (``y1 <= y0`` or ``x1 <= x0``) or lies outside the slide.
    """
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    named = f"{what} ({box_text(bbox_yx, 'yx')})"
    extent = f"the slide {slide} ({box_text(_slide_box(shape_yx), 'yx')})"
    kind = overlap_kind(bbox_yx, shape_yx) if y1 > y0 and x1 > x0 else "empty"
    refusals = {
        "empty": "is empty: give Y0 X0 Y1 X1 in level-0 px with Y1 > Y0 and X1 > X0",
        "outside": f"lies outside {extent}; give Y0 X0 Y1 X1 in level-0 px of this slide "
        f"(`stmap info {slide}` shows its size)",
    }
    if kind in refusals:
        msg = f"{named} {refusals[kind]}"
        raise StmapInputError(msg)
    clipped = _clip(bbox_yx, shape_yx)
    if kind == "partly":
        on_slide = box_text(clipped, "yx")
        msg = f"{named} reaches past {extent}; using its part on the slide ({on_slide})"
        warnings.warn(msg, StmapInputWarning, stacklevel=2)
    return clipped


def _named(names: Sequence[str], boxes: Sequence[Sequence[float]]) -> str:
    """``"region 'a' (x …, y … px)"`` for the first few, then ``"and N more"``."""
    items = [f"'{n}' ({box_text(b)})" for n, b in zip(names, boxes, strict=True)]
    head = ", ".join(items[:_MAX_NAMED])
    more = f" and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else ""
    return f"{'region' if len(items) == 1 else 'regions'} {head}{more}"


def check_regions_on_slide(regions: Sequence, shape_yx: Sequence[int], *, source: str) -> list[int]:
    """Refuse shapes that lie off the slide; warn (one line) about shapes reaching past it.

    Parameters
    ----------
    regions : sequence of Region
        Shapes with ``name`` and ``bbox_yx()`` (level-0 px, (y0, x0, y1, x1)), e.g. from
        :func:`~napari_stmap.core.io.regions.read_geojson`.
    shape_yx : (H, W)
        Level-0 size of the slide, px.
    source : str
        Where the shapes came from (the GeoJSON file), first word of the messages.

    Returns
    -------
    list of int
        Indices of the regions that reach past the slide: their sums cover only their part
        on the slide (the prediction map is empty outside it).

    Raises
    ------
    StmapInputError
        One line naming the first regions that lie entirely outside, and the slide's extent.
    """
    boxes = [r.bbox_yx() for r in regions]
    kinds = [overlap_kind(b, shape_yx) for b in boxes]
    extent = f"the slide ({box_text(_slide_box(shape_yx))})"
    out = [k for k, kind in enumerate(kinds) if kind == "outside"]
    if out:
        named = _named([regions[k].name for k in out], [boxes[k] for k in out])
        msg = (
            f"{source}: {named} {'lies' if len(out) == 1 else 'lie'} outside {extent}; "
            "GeoJSON coordinates must be [x, y] in level-0 px of this slide (as QuPath "
            "exports), not of another slide or a downsampled image"
        )
        raise StmapInputError(msg)
    part = [k for k, kind in enumerate(kinds) if kind == "partly"]
    if part:
        named = _named([regions[k].name for k in part], [boxes[k] for k in part])
        msg = (
            f"{source}: {len(part)} of {len(regions)} regions reach past {extent}, clipped to "
            f"it (sums cover only the part on the slide): {named}"
        )
        warnings.warn(msg, StmapInputWarning, stacklevel=2)
    return part
