"""Visium HD: square bins of one size from ``binned_outputs/square_NNNum/`` folders."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...errors import StmapInputError
from ._checks import require_exists, warn_input
from ._container import Spots
from ._spaceranger import sample_name, spots_from_spaceranger

DEFAULT_HD_BIN_UM = 8.0
"""Visium HD bin size read when none is asked for (if present), µm."""

_SQUARE_RE = re.compile(r"^square_(\d+(?:\.\d+)?)um$")


def square_dirs(path: Path) -> dict[float, Path]:
    """``{bin_um: square_NNNum/}`` found at or under ``path`` (outs/ or binned_outputs/)."""
    match = _SQUARE_RE.match(path.name)
    if match and path.is_dir():
        return {float(match.group(1)): path}
    for parent in (path, path / "binned_outputs", path / "outs" / "binned_outputs"):
        if not parent.is_dir():
            continue
        found = {
            float(m.group(1)): child
            for child in sorted(parent.iterdir())
            if child.is_dir() and (m := _SQUARE_RE.match(child.name))
        }
        if found:
            return found
    return {}


def available_bin_sizes(path: str | Path) -> list[float]:
    """Visium HD bin sizes present at ``path`` (outs/, binned_outputs/ or square_NNNum/), µm.

    Returns ``[]`` for anything that is not a Visium HD folder.
    """
    try:
        return sorted(square_dirs(Path(path).expanduser()))
    except OSError:
        return []


def _pick_bin(dirs: dict[float, Path], bin_um: float | None, path: Path) -> float:
    """The requested bin size (default 8 µm if present, else the smallest); error lists sizes."""
    if bin_um is None:
        return DEFAULT_HD_BIN_UM if DEFAULT_HD_BIN_UM in dirs else min(dirs)
    for size in dirs:
        if math.isclose(size, float(bin_um)):
            return size
    sizes = ", ".join(f"{s:g}" for s in sorted(dirs))
    msg = (
        f"{path}: no {float(bin_um):g} µm bins; sizes present: {sizes} µm; pass bin_um= one of them"
    )
    raise StmapInputError(msg)


def read_visium_hd(
    path: str | Path, *, bin_um: float | None = None, drop_unpositioned: bool = False
) -> Spots:
    """Read Space Ranger Visium HD bins of one size.

    Parameters
    ----------
    path : str or Path
        ``outs/`` (or its parent), ``binned_outputs/`` or one ``square_NNNum/`` folder holding
        ``spatial/tissue_positions.parquet`` and ``filtered_feature_bc_matrix.h5`` (or mtx).
    bin_um : float, optional
        Bin size in µm among those present (:func:`available_bin_sizes`); default 8 if
        present, else the smallest.
    drop_unpositioned : bool
        Drop matrix barcodes missing from the positions (with a warning) instead of raising.

    Returns
    -------
    Spots
        Squares of ``bin_size_um`` µm (= pitch); ``size_px = bin_um / microns_per_pixel``.
    """
    p = require_exists(path)
    dirs = square_dirs(p)
    if not dirs:
        msg = (
            f"{p}: no binned_outputs/square_NNNum/ folders; expected a Visium HD outs/, "
            "binned_outputs/ or square_008um/ folder"
        )
        raise StmapInputError(msg)
    size = _pick_bin(dirs, bin_um, p)
    square = dirs[size]
    outs = square.parent.parent if square.parent.name == "binned_outputs" else square
    roots = [square] if outs == square else [square, outs]
    spots = spots_from_spaceranger(
        roots,
        kind="hd",
        library_id=sample_name(outs),
        drop_unpositioned=drop_unpositioned,
        bin_hint=size,
    )
    if not math.isclose(spots.bin_um, size):
        msg = (
            f"{square}: folder name says {size:g} µm but scalefactors_json.json says "
            f"bin_size_um {spots.bin_um:g} µm; using the latter"
        )
        warn_input(msg)
    return spots
