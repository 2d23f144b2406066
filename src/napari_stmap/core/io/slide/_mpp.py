"""µm per pixel of a slide: from OME, SVS, the TIFF resolution tags, the user or a fallback.

First found wins: the user's ``mpp=``; OME ``PhysicalSizeX`` (with its unit); the SVS
``MPP = …`` field; ``XResolution`` / ``ResolutionUnit`` (print defaults ignored). Slides read
through OpenSlide: its ``openslide.mpp-x`` (which it takes from each vendor's metadata), else
its ``tiff.XResolution`` / ``tiff.ResolutionUnit`` properties, with the same rules. Values outside
:data:`PLAUSIBLE_MPP_UM` are ignored; with nothing known :data:`UNKNOWN_MPP_FALLBACK` is used
and a :class:`~napari_stmap.core.errors.StmapInputWarning` says so.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import tifffile

from ...errors import StmapInputWarning

log = logging.getLogger(__name__)

#: µm/px used when the file declares none (a :class:`StmapInputWarning` says so).
UNKNOWN_MPP_FALLBACK: float = 1.0
#: µm/px a file's metadata may plausibly declare for microscopy (others are ignored).
PLAUSIBLE_MPP_UM: tuple[float, float] = (0.05, 50.0)

_UNIT_UM = {  # OME length units -> µm
    **dict.fromkeys(("µm", "μm", "um", "micron"), 1.0),
    **{"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6},
}
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit: inch, cm, mm, µm
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([-+0-9.eE]+)")


def _choose_mpp(
    path: Path, user: float | None, found: tuple[float, str] | None, notes: list[str]
) -> tuple[float, str]:
    """(mpp, source): the user's value, else the file's, else the fallback with a warning."""
    if user is not None:
        if found is not None and not math.isclose(user, found[0], rel_tol=1e-3):
            log.info("%s: mpp=%g overrides the file's %g µm/px (%s)", path, user, *found)
        return user, "user"
    if found is not None:
        return found
    ignored = f"; ignored: {', '.join(notes)}" if notes else ""
    msg = (
        f"{path.name}: µm per pixel unknown (no OME PhysicalSizeX, SVS MPP, TIFF resolution or "
        f"openslide.mpp-x{ignored}); using UNKNOWN_MPP_FALLBACK = {UNKNOWN_MPP_FALLBACK:g} µm/px, so µm "
        "values are really pixels: pass the true value with --mpp (CLI) or "
        "open_slide(..., mpp=...)"
    )
    warnings.warn(msg, StmapInputWarning, stacklevel=3)
    return UNKNOWN_MPP_FALLBACK, "fallback"


def _tiff_mpp(
    tf: tifffile.TiffFile, index: int, series: tifffile.TiffPageSeries, notes: list[str]
) -> tuple[float, str] | None:
    """First plausible µm/px among OME, SVS and the resolution tags; others go to ``notes``."""
    page = series.keyframe
    candidates = (
        ("ome", lambda: _ome_mpp(tf.ome_metadata, index) if tf.is_ome else None),
        ("svs", lambda: _svs_mpp(page.description)),
        ("tiff-resolution", lambda: _resolution_mpp(tf, page, notes)),
    )
    lo, hi = PLAUSIBLE_MPP_UM
    for source, read in candidates:
        value = read()
        if value is None:
            continue
        if lo <= value <= hi:
            return value, source
        notes.append(f"{source} {value:g} µm/px (implausible)")
        log.warning("%s: ignoring implausible %s µm/px %g", tf.filehandle.path, source, value)
    return None


def _ome_mpp(xml: str | None, index: int) -> float | None:
    """``PhysicalSizeX`` of OME Image ``index`` in µm (unit default µm), or None."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("OME-XML does not parse; ignoring it")
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None
    image = images[index] if index < len(images) else images[0]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm").strip()
    if unit not in _UNIT_UM:
        log.warning("OME PhysicalSizeXUnit %r is not a length unit; ignoring it", unit)
        return None
    try:
        return float(pixels.get("PhysicalSizeX")) * _UNIT_UM[unit]
    except ValueError:
        return None


def _svs_mpp(description: str | None) -> float | None:
    """The ``MPP = 0.4990`` field of an Aperio ImageDescription, in µm, or None."""
    match = _SVS_MPP.search(description or "")
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def _resolution_mpp(
    tf: tifffile.TiffFile, page: tifffile.TiffPage, notes: list[str]
) -> float | None:
    """µm/px from XResolution + ResolutionUnit; None for missing tags and print defaults."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    per_unit = float(num) / float(den) if den else 0.0
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if unit == 1 and (tf.imagej_metadata or {}).get("unit") in ("micron", "µm", "um", "\\u00B5m"):
        unit = 5  # ImageJ: unit "none" in the tag, micron in its description
    if per_unit <= 0 or unit not in _RESUNIT_UM:
        return None
    if unit == 2 and per_unit <= 1200 and per_unit == int(per_unit):
        notes.append(f"TIFF resolution {per_unit:g} dpi (a screen/print default)")
        return None
    return _RESUNIT_UM[unit] / per_unit


_OPENSLIDE_RESUNIT = {"inch": 2, "centimeter": 3}  # OpenSlide's tiff.ResolutionUnit values


def _openslide_mpp(props: dict[str, str], path: Path, notes: list[str]) -> tuple[float, str] | None:
    """(µm/px, source) from OpenSlide properties: ``openslide.mpp-x``, else the TIFF tags.

    ``openslide.mpp-y`` is only compared (stmap assumes square pixels; a difference > 1 % is
    logged). Implausible values go to ``notes``.
    """
    lo, hi = PLAUSIBLE_MPP_UM
    candidates: list[tuple[str, float | None]] = [
        ("openslide", _float(props.get("openslide.mpp-x"))),
        ("tiff-resolution", _openslide_resolution_mpp(props, notes)),
    ]
    for source, value in candidates:
        if value is None:
            continue
        if not lo <= value <= hi:
            notes.append(f"{source} {value:g} µm/px (implausible)")
            log.warning("%s: ignoring implausible %s µm/px %g", path, source, value)
            continue
        mpp_y = _float(props.get("openslide.mpp-y")) if source == "openslide" else None
        if mpp_y is not None and not math.isclose(value, mpp_y, rel_tol=1e-2):
            log.warning(
                "%s: pixels are not square (%g x %g µm, x by y); using the x size",
                path,
                value,
                mpp_y,
            )
        return value, source
    return None


def _openslide_resolution_mpp(props: dict[str, str], notes: list[str]) -> float | None:
    """µm/px from OpenSlide's ``tiff.XResolution`` / ``tiff.ResolutionUnit`` properties."""
    per_unit = _float(props.get("tiff.XResolution"))
    unit = _OPENSLIDE_RESUNIT.get((props.get("tiff.ResolutionUnit") or "inch").strip().lower())
    if per_unit is None or per_unit <= 0 or unit is None:
        return None
    if unit == 2 and per_unit <= 1200 and per_unit == int(per_unit):
        notes.append(f"TIFF resolution {per_unit:g} dpi (a screen/print default)")
        return None
    return _RESUNIT_UM[unit] / per_unit


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
