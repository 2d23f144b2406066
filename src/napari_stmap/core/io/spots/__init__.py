"""Readers for measured spots and bins: Space Ranger Visium, Visium HD and ``.h5ad``.

The public face of the package: :func:`read_spots` (any layout, see
:func:`detect_spots_layout`), :func:`read_visium`, :func:`read_visium_hd`,
:func:`read_spots_h5ad`, :func:`available_bin_sizes` and the :class:`Spots` they return. The
private modules hold the container (``_container``), the Space Ranger files and Visium
(``_spaceranger``), Visium HD (``_visium_hd``), AnnData (``_h5ad``) and the checks (``_checks``).

Every reader returns a :class:`Spots`: spot centres in level-0 pixels of the full-resolution
slide in **(y, x)** order, the spot footprint (disk or square) in px and µm, raw counts
(spots × genes) and the Space Ranger scale factors and images.

Coordinate conventions of the sources, swapped to (y, x) exactly once, here:

- Space Ranger ``tissue_positions*.csv|parquet``: ``pxl_row_in_fullres`` is y,
  ``pxl_col_in_fullres`` is x.
- AnnData (scanpy / squidpy): ``obsm['spatial']`` is (x, y).

µm per full-resolution pixel (``mpp``) is taken, in order, from:

1. ``microns_per_pixel`` in the scale factors (Visium HD, our HER2ST files);
2. Visium: ``65 / spot_diameter_fullres`` (Space Ranger sizes ``spot_diameter_fullres`` for a
   65 µm disk; the physical spot is 55 µm across, at 100 µm pitch);
3. other known bin sizes (Visium HD bins, legacy ST 100 µm spots, any ``bin_size_um``):
   ``bin_size_um / spot_diameter_fullres`` (those writers size the diameter for the bin itself);
4. otherwise unknown (``None``, with a :class:`StmapInputWarning`).
"""

from __future__ import annotations

import math
from pathlib import Path

from ...errors import StmapInputError
from ._checks import EXPECTED_LAYOUTS, require_exists
from ._container import Spots
from ._h5ad import h5ad_has_spatial, read_spots_h5ad
from ._spaceranger import (
    POSITION_FILES,
    ST_PITCH_UM,
    ST_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SCALED_DIAMETER_UM,
    VISIUM_SPOT_UM,
    find,
    read_visium,
    visium_root,
)
from ._visium_hd import DEFAULT_HD_BIN_UM, available_bin_sizes, read_visium_hd, square_dirs

__all__ = [
    "DEFAULT_HD_BIN_UM",
    "ST_PITCH_UM",
    "ST_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SCALED_DIAMETER_UM",
    "VISIUM_SPOT_UM",
    "Spots",
    "available_bin_sizes",
    "detect_spots_layout",
    "read_spots",
    "read_spots_h5ad",
    "read_visium",
    "read_visium_hd",
]


def detect_spots_layout(path: str | Path) -> str | None:
    """Layout of ``path``: ``"visium"``, ``"visium_hd"``, ``"h5ad"`` or None.

    ``"h5ad"`` only for an ``.h5ad`` with ``obsm['spatial']``. Never raises: the napari reader
    uses it to decide whether a path is ours.
    """
    try:
        p = Path(path).expanduser()
        if p.is_file():
            return "h5ad" if p.suffix.lower() == ".h5ad" and h5ad_has_spatial(p) else None
        if not p.is_dir():
            return None
        if square_dirs(p):
            return "visium_hd"
        if find([visium_root(p)], POSITION_FILES) is not None:
            return "visium"
    except Exception:  # never raise: the napari reader only asks
        return None
    return None


def read_spots(path: str | Path, *, bin_um: float | None = None) -> Spots:
    """Read measured spots from any supported layout (see :func:`detect_spots_layout`).

    Parameters
    ----------
    path : str or Path
        Visium ``outs/``, Visium HD ``outs/`` / ``binned_outputs/`` / ``square_NNNum/``, or
        ``.h5ad``.
    bin_um : float, optional
        Visium HD bin size in µm; for other layouts it must match their spot size if given.
    """
    p = require_exists(path)
    layout = "h5ad" if p.is_file() and p.suffix.lower() == ".h5ad" else detect_spots_layout(p)
    if layout == "visium_hd":
        return read_visium_hd(p, bin_um=bin_um)
    if layout is None:
        msg = f"{p}: not Space Ranger output or .h5ad; expected {EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    spots = read_visium(p) if layout == "visium" else read_spots_h5ad(p)
    if bin_um is not None and not math.isclose(float(bin_um), spots.bin_um):
        msg = (
            f"{p}: holds {spots.bin_um:g} µm spots, not {float(bin_um):g} µm; bin_um selects "
            "Visium HD bin sizes only"
        )
        raise StmapInputError(msg)
    return spots
