"""Readers for measured spots and bins: Space Ranger Visium, Visium HD, ``.h5ad``, SpatialData.

The public face of the package: :func:`read_spots` (any layout, see
:func:`detect_spots_layout`), :func:`read_visium`, :func:`read_visium_hd`,
:func:`read_spots_h5ad`, :func:`read_spots_spatialdata`, :func:`available_bin_sizes` and the
:class:`Spots` they return. The private modules hold the container (``_container``), the Space
Ranger files and Visium (``_spaceranger``), Visium HD (``_visium_hd``), AnnData (``_h5ad``),
SpatialData zarr stores (``_spatialdata``, optional extra ``[spatialdata]``) and the checks
(``_checks``).

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
from ._spatialdata import (
    DEFAULT_PSEUDO_SPOT_UM,
    read_spots_spatialdata,
    spatialdata_bin_sizes,
    spatialdata_location,
    table_names,
    table_path,
)
from ._visium_hd import DEFAULT_HD_BIN_UM, read_visium_hd, square_dirs
from ._visium_hd import available_bin_sizes as _hd_bin_sizes

__all__ = [
    "DEFAULT_HD_BIN_UM",
    "DEFAULT_PSEUDO_SPOT_UM",
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
    "read_spots_spatialdata",
    "read_visium",
    "read_visium_hd",
    "spatialdata_location",
    "table_names",
    "table_path",
]

#: Layouts whose bin size is chosen among several (:func:`available_bin_sizes`).
BINNED_LAYOUTS = ("visium_hd", "spatialdata")


def available_bin_sizes(path: str | Path) -> list[float]:
    """Bin sizes present at ``path``, µm: Visium HD ``square_NNNum/`` folders, or the
    ``square_NNNum`` tables of a SpatialData store (spatialdata-io's Visium HD naming).

    Returns ``[]`` for anything else.
    """
    return spatialdata_bin_sizes(path) or _hd_bin_sizes(path)


def detect_spots_layout(path: str | Path) -> str | None:
    """Layout of ``path``: ``"visium"``, ``"visium_hd"``, ``"h5ad"``, ``"spatialdata"`` or None.

    ``"h5ad"`` only for an ``.h5ad`` with ``obsm['spatial']``; ``"spatialdata"`` for a
    SpatialData zarr store or one of its tables (``data.zarr/tables/NAME``). Never raises: the
    napari reader uses it to decide whether a path is ours.
    """
    try:
        p = Path(path).expanduser()
        if spatialdata_location(p) is not None:
            return "spatialdata"
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


def read_spots(path: str | Path, *, bin_um: float | None = None, mpp: float | None = None) -> Spots:
    """Read measured spots from any supported layout (see :func:`detect_spots_layout`).

    Parameters
    ----------
    path : str or Path
        Visium ``outs/``, Visium HD ``outs/`` / ``binned_outputs/`` / ``square_NNNum/``,
        ``.h5ad``, or a SpatialData store (``data.zarr``, or one table: ``data.zarr/tables/NAME``).
    bin_um : float, optional
        Visium HD bin size in µm; for other layouts it must match their spot size if given.
        SpatialData: picks the ``square_NNNum`` table, sets the pseudo-spot side of a cells
        table, and is refused when finer than other tables' spots
        (:func:`read_spots_spatialdata`).
    mpp : float, optional
        µm per level-0 px of the slide, for SpatialData tables that do not record their scale.
    """
    p = require_exists(path)
    if spatialdata_location(p) is not None:
        return read_spots_spatialdata(p, bin_um=bin_um, mpp=mpp)
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
