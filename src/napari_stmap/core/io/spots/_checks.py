"""Sanity checks shared by the spot readers: positions on the image, files present, warnings.

Positions are level-0 px (y, x) of the full-resolution image. A reader refuses what cannot be
right (most spots off the image, positions that fit only with x and y swapped, NaN positions)
with :class:`~napari_stmap.core.errors.StmapInputError`, and warns
(:class:`~napari_stmap.core.errors.StmapInputWarning`, attributed to the caller outside this
package) about what may be legitimate (some off-tissue bins off the image, hires and lowres
images that disagree).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import StmapInputError, StmapInputWarning

#: The package whose frames :func:`warn_input` skips to find the caller.
_PACKAGE = __name__.rpartition(".")[0]

EXPECTED_LAYOUTS = (
    "a Space Ranger Visium outs/ (spatial/tissue_positions.csv + filtered_feature_bc_matrix.h5"
    " or filtered_feature_bc_matrix/), a Visium HD outs/, binned_outputs/ or square_NNNum/"
    " folder, an .h5ad with obsm['spatial'], or a SpatialData .zarr store"
)


def warn_input(msg: str) -> None:
    """Warn with :class:`StmapInputWarning`, attributed to the first caller outside this package."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _in_package(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, StmapInputWarning, stacklevel=level)


def _in_package(name: str) -> bool:
    return name == _PACKAGE or name.startswith(_PACKAGE + ".")


def require_exists(path: str | Path) -> Path:
    """``Path(path)``, raising a one-line error when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p}: no such file or folder; expected {EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    return p


def check_finite(centers_yx: np.ndarray, path: Path) -> None:
    """Raise when spot coordinates are missing (NaN) or infinite."""
    bad = ~np.isfinite(centers_yx).all(axis=1)
    if bad.any():
        msg = (
            f"{path}: {int(bad.sum())} of {len(bad)} spots have no valid pixel position (NaN/inf); "
            "re-export the positions"
        )
        raise StmapInputError(msg)


def points_outside(
    centers_yx: np.ndarray, shape_yx: tuple[float, float], margin: float = 0.0
) -> np.ndarray:
    """Bool mask of centres outside ``[-margin, h + margin) × [-margin, w + margin)``."""
    h, w = shape_yx
    y, x = centers_yx[:, 0], centers_yx[:, 1]
    return (y < -margin) | (x < -margin) | (y >= h + margin) | (x >= w + margin)


def swap_fits(
    centers_yx: np.ndarray, shape_yx: tuple[float, float], n_out: int, margin: float = 0.0
) -> bool:
    """True when at most 10 % of the centres fall outside after an (x, y) swap (and fewer)."""
    n_swapped = int(points_outside(centers_yx[:, ::-1], shape_yx, margin).sum())
    return n_swapped * 10 <= len(centers_yx) and n_swapped < n_out


def swap_fix(source: Path) -> str:
    """The fix to suggest for swapped coordinates in ``source``."""
    if source.suffix == ".h5ad":
        return "obsm['spatial'] must hold (x, y) = (column, row) full-resolution px"
    return "pxl_row_in_fullres must be y (row) and pxl_col_in_fullres x (column)"


def bbox_text(centers_yx: np.ndarray) -> str:
    """``'y a..b, x c..d'`` px for messages."""
    if len(centers_yx) == 0:
        return "nothing"
    lo, hi = centers_yx.min(axis=0), centers_yx.max(axis=0)
    return f"y {lo[0]:.0f}..{hi[0]:.0f}, x {lo[1]:.0f}..{hi[1]:.0f} px"


def check_scalefactor_images(spots: Any) -> None:
    """Read-time check: each hires/lowres image, divided by its scalef, must hold the spots.

    ``spots`` is a :class:`~napari_stmap.core.io.spots.Spots` (not imported here: the container
    itself uses these checks).

    An image whose size / scalef is too small for the in-tissue positions warns (wrong image
    or wrong scale factors); positions that fit only when (x, y) are swapped raise.
    """
    basis = spots.in_tissue if spots.in_tissue.any() else np.ones(spots.n_spots, bool)
    centers = spots.centers_yx[basis]
    estimates = {}
    for kind in ("hires", "lowres"):
        shape = spots.image_shape_yx(kind)
        scale = spots.scalefactors.get(f"tissue_{kind}_scalef")
        if shape is None or not scale or len(centers) == 0:
            continue
        est = (shape[0] / float(scale), shape[1] / float(scale))
        estimates[kind] = est
        pad = spots.size_px if math.isfinite(spots.size_px) else 0.0
        margin = 0.02 * max(est) + pad
        n_out = int(points_outside(centers, est, margin).sum())
        if n_out == 0:
            continue
        text = f"{kind} image {shape[0]}×{shape[1]} px / tissue_{kind}_scalef {float(scale):.6g}"
        if 2 * n_out > len(centers) and swap_fits(centers, est, n_out, margin):
            msg = (
                f"{spots.source}: {n_out} of {len(centers)} in-tissue spots fall outside the "
                f"{text} = {est[0]:.0f}×{est[1]:.0f} px but fit with x and y swapped; "
                f"{swap_fix(spots.source)}"
            )
            raise StmapInputError(msg)
        msg = (
            f"{spots.source}: {n_out} of {len(centers)} in-tissue spots (span "
            f"{bbox_text(centers)}) fall outside the {text} = {est[0]:.0f}×{est[1]:.0f} px "
            f"full-res: the image or the scale factors belong to another run"
        )
        warn_input(msg)
    _check_estimates_agree(spots.source, estimates)


def _check_estimates_agree(source: Path, estimates: dict[str, tuple[float, float]]) -> None:
    """Warn when hires and lowres imply full-resolution sizes more than 3 % apart."""
    if len(estimates) < 2:
        return
    hi, lo = np.asarray(estimates["hires"]), np.asarray(estimates["lowres"])
    if np.any(np.abs(hi - lo) > 0.03 * np.maximum(hi, lo)):
        msg = (
            f"{source}: hires and lowres images imply different full-resolution sizes "
            f"({hi[0]:.0f}×{hi[1]:.0f} vs {lo[0]:.0f}×{lo[1]:.0f} px): one image or scale "
            f"factor is from another run; re-copy outs/spatial/ from one Space Ranger run"
        )
        warn_input(msg)
