"""Readers for measured spots and bins: Space Ranger Visium, Visium HD and ``.h5ad``.

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

import gzip
import io
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from napari_stmap.core.errors import StmapInputError, StmapInputWarning

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Spots",
    "available_bin_sizes",
    "detect_spots_layout",
    "read_spots",
    "read_spots_h5ad",
    "read_visium",
    "read_visium_hd",
]

logger = logging.getLogger(__name__)

VISIUM_SPOT_UM = 55.0
"""Physical diameter of a Visium spot, µm."""
VISIUM_PITCH_UM = 100.0
"""Centre-to-centre distance of Visium spots, µm."""
VISIUM_SCALED_DIAMETER_UM = 65.0
"""Diameter Space Ranger uses for ``spot_diameter_fullres`` on Visium, µm."""
ST_SPOT_UM = 100.0
"""Diameter of a legacy Spatial Transcriptomics spot, µm."""
ST_PITCH_UM = 200.0
"""Centre-to-centre distance of legacy ST spots, µm."""
DEFAULT_HD_BIN_UM = 8.0
"""Visium HD bin size read when none is asked for (if present), µm."""

_POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_POS_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_SQUARE_RE = re.compile(r"^square_(\d+(?:\.\d+)?)um$")
_IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
_GENE_EXPRESSION = "Gene Expression"
_EXPECTED_LAYOUTS = (
    "a Space Ranger Visium outs/ (spatial/tissue_positions.csv + filtered_feature_bc_matrix.h5"
    " or filtered_feature_bc_matrix/), a Visium HD outs/, binned_outputs/ or square_NNNum/"
    " folder, or an .h5ad with obsm['spatial']"
)


def _warn(msg: str) -> None:
    """Warn with :class:`StmapInputWarning`, attributed to the first caller outside this module."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, StmapInputWarning, stacklevel=level)


# --------------------------------------------------------------------------------------------
# The Spots container
# --------------------------------------------------------------------------------------------
@dataclass
class Spots:
    """Measured spots or bins of one section, in level-0 pixels of the full-resolution slide.

    Attributes
    ----------
    centers_yx : np.ndarray
        ``(n_spots, 2)`` float64 spot centres, level-0 px of the full-resolution image, (y, x).
    footprint : str
        ``"disk"`` (Visium, legacy ST) or ``"square"`` (Visium HD bins).
    size_px : float
        Disk diameter or square side in level-0 px (NaN when µm/px is unknown).
    size_um : float
        Disk diameter or square side in µm.
    mpp : float or None
        µm per full-resolution px, derived from the scale factors; None if unknowable.
    counts : scipy.sparse.csr_matrix
        ``(n_spots, n_genes)`` raw counts; row i is ``barcodes[i]``, column j is ``genes[j]``.
    genes, gene_ids : np.ndarray
        ``(n_genes,)`` gene symbols and ids (Ensembl ids when available, else the symbols).
    barcodes : np.ndarray
        ``(n_spots,)`` spot barcodes.
    bin_um : float
        Nominal spot size, µm: HD bin size, 55 (Visium), 100 (legacy ST).
    pitch_um : float or None
        Centre-to-centre step of the grid in µm, when known.
    in_tissue : np.ndarray
        ``(n_spots,)`` bool, Space Ranger's tissue call (all True when the source has none).
    array_rc : np.ndarray or None
        ``(n_spots, 2)`` int grid (array_row, array_col), when known.
    library_id : str
        Sample / library name.
    scalefactors : dict
        Content of ``scalefactors_json.json`` (or ``uns['spatial'][lib]['scalefactors']``).
    image_paths : dict of str to Path
        ``{"hires": ..., "lowres": ...}`` Space Ranger PNGs that are present.
    images : dict of str to np.ndarray
        Loaded images, (y, x, 3) RGB uint8; filled by :meth:`load_image` (h5ad: at read time).
    source : Path
        File or folder the spots were read from.
    """

    centers_yx: np.ndarray
    footprint: str
    size_px: float
    size_um: float
    mpp: float | None
    counts: sp.csr_matrix
    genes: np.ndarray
    gene_ids: np.ndarray
    barcodes: np.ndarray
    bin_um: float
    pitch_um: float | None
    in_tissue: np.ndarray
    array_rc: np.ndarray | None
    library_id: str
    scalefactors: dict = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        self.centers_yx = np.asarray(self.centers_yx, dtype=np.float64).reshape(-1, 2)
        self.counts = sp.csr_matrix(self.counts)
        self.genes = np.asarray(self.genes, dtype=str)
        self.gene_ids = np.asarray(self.gene_ids, dtype=str)
        self.barcodes = np.asarray(self.barcodes, dtype=str)
        self.in_tissue = np.asarray(self.in_tissue, dtype=bool)
        if self.array_rc is not None:
            self.array_rc = np.asarray(self.array_rc, dtype=np.int64).reshape(-1, 2)
        self.source = Path(self.source)
        if self.footprint not in ("disk", "square"):
            msg = f"footprint must be 'disk' or 'square', got {self.footprint!r}"
            raise ValueError(msg)
        n, g = self.counts.shape
        lengths = {
            "centers_yx": len(self.centers_yx),
            "barcodes": len(self.barcodes),
            "in_tissue": len(self.in_tissue),
        }
        if self.array_rc is not None:
            lengths["array_rc"] = len(self.array_rc)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad or len(self.genes) != g or len(self.gene_ids) != g:
            msg = f"Spots: counts is {n}×{g} but lengths are {lengths}, genes {len(self.genes)}"
            raise ValueError(msg)

    @property
    def n_spots(self) -> int:
        """Number of spots (rows of ``counts``)."""
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of genes (columns of ``counts``)."""
        return int(self.counts.shape[1])

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g}"
        return (
            f"Spots({self.library_id!r}: {self.n_spots} spots × {self.n_genes} genes, "
            f"{self.footprint} {self.size_um:g} µm = {self.size_px:.4g} px, mpp {mpp}, "
            f"images {sorted(set(self.images) | set(self.image_paths))})"
        )

    def image_scale(self, kind: str) -> float:
        """Scale factor ``tissue_{kind}_scalef``: image px per full-resolution px.

        Parameters
        ----------
        kind : str
            ``"hires"`` or ``"lowres"``.
        """
        key = f"tissue_{kind}_scalef"
        value = self.scalefactors.get(key)
        if value is None:
            have = sorted(k for k in self.scalefactors if k.endswith("_scalef"))
            msg = (
                f"{self.source}: no {key} in the scale factors (have {have}); use one of those "
                "images"
            )
            raise StmapInputError(msg)
        return float(value)

    def load_image(self, kind: str) -> np.ndarray:
        """Return the ``kind`` image (``"hires"``/``"lowres"``) as (y, x, 3) RGB uint8.

        Space Ranger PNGs are read on first use and cached in :attr:`images`.
        """
        if kind in self.images:
            return self.images[kind]
        path = self.image_paths.get(kind)
        if path is None:
            have = sorted(set(self.images) | set(self.image_paths))
            msg = f"{self.source}: no {kind} image (have {have}); pick one of those"
            raise StmapInputError(msg)
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as err:
            msg = (
                f"{path}: cannot read the {kind} image ({err}); re-copy it from Space Ranger "
                "outs/spatial/"
            )
            raise StmapInputError(msg) from err
        self.images[kind] = arr
        return arr

    def image_shape_yx(self, kind: str) -> tuple[int, int] | None:
        """(height, width) px of the ``kind`` image without decoding it; None when absent."""
        if kind in self.images:
            return tuple(int(v) for v in self.images[kind].shape[:2])  # type: ignore[return-value]
        path = self.image_paths.get(kind)
        if path is None:
            return None
        from PIL import Image

        try:
            with Image.open(path) as im:
                width, height = im.size
        except OSError:
            return None
        return int(height), int(width)

    def fullres_shape_yx_estimate(self) -> tuple[int, int] | None:
        """Full-resolution image size (height, width) px from the hires/lowres image and scalef.

        Prefers the hires image (more precise). None when no image with a scale factor exists.
        """
        for kind in ("hires", "lowres"):
            shape = self.image_shape_yx(kind)
            scale = self.scalefactors.get(f"tissue_{kind}_scalef")
            if shape is not None and scale:
                return round(shape[0] / float(scale)), round(shape[1] / float(scale))
        return None

    def subset(self, mask_or_index: Any) -> Spots:
        """Return the spots selected by a boolean mask or an integer index (order kept)."""
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            if idx.shape != (self.n_spots,):
                msg = f"subset: boolean mask has shape {idx.shape}, expected ({self.n_spots},)"
                raise ValueError(msg)
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).ravel()
        return replace(
            self,
            centers_yx=self.centers_yx[idx],
            counts=self.counts[idx],
            barcodes=self.barcodes[idx],
            in_tissue=self.in_tissue[idx],
            array_rc=None if self.array_rc is None else self.array_rc[idx],
            scalefactors=dict(self.scalefactors),
            image_paths=dict(self.image_paths),
            images=dict(self.images),
        )

    def check_against_image(
        self, shape_yx: tuple[int, ...], *, name: str = "slide", mpp: float | None = None
    ) -> None:
        """Check that the spots lie on an image of ``shape_yx`` (level-0 px, (y, x, ...)).

        Raises :class:`StmapInputError` when more than half of the in-tissue spots (all spots
        when none is flagged) fall outside the image, suggesting an (x, y) swap when the
        swapped positions fit. Warns (:class:`StmapInputWarning`) when some spots, including
        off-tissue ones, fall outside, and when ``mpp`` (the image's µm/px) disagrees with
        the spots' by more than 10 %.
        """
        self._check_mpp(mpp, name)
        if self.n_spots == 0:
            return
        shape = (int(shape_yx[0]), int(shape_yx[1]))
        basis = self.in_tissue if self.in_tissue.any() else np.ones(self.n_spots, bool)
        outside = _outside(self.centers_yx, shape)
        n_out, n = int(outside[basis].sum()), int(basis.sum())
        where = f"the {name} ({shape[0]}×{shape[1]} px, y×x)"
        span = _bbox_text(self.centers_yx[basis])
        if 2 * n_out > n:
            if _swap_fits(self.centers_yx[basis], shape, n_out):
                msg = (
                    f"{self.source}: {n_out} of {n} spots fall outside {where} (spots span {span}) "
                    f"but fit with x and y swapped: the positions' x and y are exchanged; "
                    f"{_swap_fix(self.source)}"
                )
                raise StmapInputError(msg)
            msg = (
                f"{self.source}: {n_out} of {n} spots fall outside {where} (spots span {span}): "
                f"wrong image, a lower-resolution level, or (x, y) swapped; use the "
                f"full-resolution image these spots were registered to"
            )
            raise StmapInputError(msg)
        if outside.any():
            msg = (
                f"{self.source}: {int(outside.sum())} of {self.n_spots} spots ({n_out} in tissue) "
                f"lie outside {where}; spots span {span}. Off-tissue Visium HD bins may do so "
                f"legitimately; otherwise check that this is the image Space Ranger was run on"
            )
            _warn(msg)

    def _check_mpp(self, mpp: float | None, name: str) -> None:
        """Warn when the image's µm/px and the spots' µm/px disagree by more than 10 %."""
        if mpp is None or self.mpp is None or not mpp > 0:
            return
        ratio = float(mpp) / self.mpp
        if abs(ratio - 1.0) > 0.10:
            msg = (
                f"{self.source}: the {name} is at {mpp:.4g} µm/px but the spots' scale factors "
                f"give {self.mpp:.4g} µm/px (ratio {ratio:.3g}): spot positions are in px of the "
                f"full-resolution image Space Ranger saw; use that image (or level) instead"
            )
            _warn(msg)


# --------------------------------------------------------------------------------------------
# Geometry checks
# --------------------------------------------------------------------------------------------
def _outside(
    centers_yx: np.ndarray, shape_yx: tuple[float, float], margin: float = 0.0
) -> np.ndarray:
    """Bool mask of centres outside ``[-margin, h + margin) × [-margin, w + margin)``."""
    h, w = shape_yx
    y, x = centers_yx[:, 0], centers_yx[:, 1]
    return (y < -margin) | (x < -margin) | (y >= h + margin) | (x >= w + margin)


def _swap_fits(
    centers_yx: np.ndarray, shape_yx: tuple[float, float], n_out: int, margin: float = 0.0
) -> bool:
    """True when at most 10 % of the centres fall outside after an (x, y) swap (and fewer)."""
    n_swapped = int(_outside(centers_yx[:, ::-1], shape_yx, margin).sum())
    return n_swapped * 10 <= len(centers_yx) and n_swapped < n_out


def _swap_fix(source: Path) -> str:
    """The fix to suggest for swapped coordinates in ``source``."""
    if source.suffix == ".h5ad":
        return "obsm['spatial'] must hold (x, y) = (column, row) full-resolution px"
    return "pxl_row_in_fullres must be y (row) and pxl_col_in_fullres x (column)"


def _bbox_text(centers_yx: np.ndarray) -> str:
    """``'y a..b, x c..d'`` px for messages."""
    if len(centers_yx) == 0:
        return "nothing"
    lo, hi = centers_yx.min(axis=0), centers_yx.max(axis=0)
    return f"y {lo[0]:.0f}..{hi[0]:.0f}, x {lo[1]:.0f}..{hi[1]:.0f} px"


def _check_scalefactor_images(spots: Spots) -> None:
    """Read-time check: each hires/lowres image, divided by its scalef, must hold the spots.

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
        n_out = int(_outside(centers, est, margin).sum())
        if n_out == 0:
            continue
        text = f"{kind} image {shape[0]}×{shape[1]} px / tissue_{kind}_scalef {float(scale):.6g}"
        if 2 * n_out > len(centers) and _swap_fits(centers, est, n_out, margin):
            msg = (
                f"{spots.source}: {n_out} of {len(centers)} in-tissue spots fall outside the "
                f"{text} = {est[0]:.0f}×{est[1]:.0f} px but fit with x and y swapped; "
                f"{_swap_fix(spots.source)}"
            )
            raise StmapInputError(msg)
        msg = (
            f"{spots.source}: {n_out} of {len(centers)} in-tissue spots (span "
            f"{_bbox_text(centers)}) fall outside the {text} = {est[0]:.0f}×{est[1]:.0f} px "
            f"full-res: the image or the scale factors belong to another run"
        )
        _warn(msg)
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
        _warn(msg)


# --------------------------------------------------------------------------------------------
# Physical scale
# --------------------------------------------------------------------------------------------
def _physical_scale(
    sf: dict, *, kind: str, source: Path, bin_hint: float | None = None
) -> dict[str, Any]:
    """Footprint, sizes (µm and px), µm/px and pitch from the scale factors.

    ``kind`` ``"hd"`` gives squares of ``bin_size_um`` (else ``bin_hint``); ``"auto"`` gives
    squares when ``bin_size_um`` < 55 µm (HD bins), else disks: 55 µm Visium spots when
    ``bin_size_um`` is absent or 55, 100 µm legacy ST spots (200 µm pitch) when it is 100.
    """
    bin_sf = sf.get("bin_size_um")
    bin_um = float(bin_sf) if bin_sf is not None else bin_hint
    if kind == "hd" or (bin_um is not None and bin_um < VISIUM_SPOT_UM):
        if bin_um is None:
            msg = f"{source}: no bin_size_um in the scale factors; pass the square_NNNum/ folder"
            raise StmapInputError(msg)
        footprint, pitch, diameter_um = "square", bin_um, bin_um
    elif bin_um is None or math.isclose(bin_um, VISIUM_SPOT_UM):
        footprint, bin_um, pitch, diameter_um = (
            "disk",
            VISIUM_SPOT_UM,
            VISIUM_PITCH_UM,
            VISIUM_SCALED_DIAMETER_UM,
        )
    else:
        pitch = ST_PITCH_UM if math.isclose(bin_um, ST_SPOT_UM) else None
        footprint, diameter_um = "disk", bin_um
    mpp = _mpp_from_scalefactors(sf, diameter_um, source)
    size_px = bin_um / mpp if mpp else float("nan")
    return {
        "footprint": footprint,
        "bin_um": float(bin_um),
        "size_um": float(bin_um),
        "size_px": float(size_px),
        "mpp": mpp,
        "pitch_um": None if pitch is None else float(pitch),
    }


def _mpp_from_scalefactors(sf: dict, diameter_um: float, source: Path) -> float | None:
    """µm/px: ``microns_per_pixel``, else ``diameter_um / spot_diameter_fullres``, else None."""
    mpp = sf.get("microns_per_pixel")
    if mpp is not None and float(mpp) > 0:
        return float(mpp)
    diameter_px = sf.get("spot_diameter_fullres")
    if diameter_px is not None and float(diameter_px) > 0:
        return diameter_um / float(diameter_px)
    msg = (
        f"{source}: no microns_per_pixel or spot_diameter_fullres in the scale factors: µm/px "
        f"is unknown, so physical spot sizes cannot be placed; add scalefactors_json.json"
    )
    _warn(msg)
    return None


# --------------------------------------------------------------------------------------------
# Space Ranger files
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it is gzip (whatever its name says)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return raw


def _find(roots: list[Path], names: tuple[str, ...]) -> Path | None:
    """First ``root/spatial/name`` or ``root/name`` that exists, names in order of preference."""
    for name in names:
        for root in roots:
            for candidate in (root / "spatial" / name, root / name):
                if candidate.exists():
                    return candidate
    return None


def _read_scalefactors(roots: list[Path]) -> tuple[dict, Path | None]:
    """``scalefactors_json.json`` content (``{}`` when absent) and its path."""
    path = _find(roots, ("scalefactors_json.json",))
    if path is None:
        logger.warning("no scalefactors_json.json under %s", roots[0])
        return {}, None
    try:
        sf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        msg = (
            f"{path}: not valid JSON ({err}); re-copy scalefactors_json.json from Space Ranger "
            "outs/spatial/"
        )
        raise StmapInputError(msg) from err
    if not isinstance(sf, dict):
        msg = f"{path}: expected a JSON object of scale factors, got {type(sf).__name__}"
        raise StmapInputError(msg)
    return sf, path


def _read_positions(path: Path) -> pd.DataFrame:
    """Space Ranger positions (v1 headerless csv, v2 csv with header, HD parquet), by barcode."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            with path.open("rb") as fh:
                first = fh.read(200).decode("utf-8", "replace").lstrip('"')
            header = 0 if first.startswith("barcode") else None
            names = None if header == 0 else list(_POS_COLUMNS)
            df = pd.read_csv(path, header=header, names=names)
    except Exception as err:  # pandas/pyarrow raise many types
        msg = (
            f"{path}: cannot read spot positions ({err}); re-copy it from Space Ranger "
            "outs/spatial/"
        )
        raise StmapInputError(msg) from err
    missing = [c for c in _POS_COLUMNS if c not in df.columns]
    if missing:
        msg = (
            f"{path}: missing columns {missing} (have {list(df.columns)}); expected Space Ranger's "
            f"{list(_POS_COLUMNS)}"
        )
        raise StmapInputError(msg)
    df["barcode"] = df["barcode"].astype(str)
    dup = int(df["barcode"].duplicated().sum())
    if dup:
        msg = f"{path}: {dup} duplicated barcodes; positions from several runs were concatenated"
        raise StmapInputError(msg)
    return df.set_index("barcode")


@dataclass
class _Matrix:
    """A feature-barcode matrix as read: counts (barcodes × features) and labels."""

    counts: sp.csr_matrix
    barcodes: np.ndarray
    genes: np.ndarray
    gene_ids: np.ndarray
    feature_types: np.ndarray | None
    source: Path

    def gene_expression_only(self) -> _Matrix:
        """Keep only ``Gene Expression`` features (when feature types are given)."""
        if self.feature_types is None:
            return self
        keep = self.feature_types == _GENE_EXPRESSION
        if not keep.any():
            kinds = sorted(set(self.feature_types.tolist()))
            msg = (
                f"{self.source}: no 'Gene Expression' features (types: {kinds}); expected a "
                "gene-expression matrix"
            )
            raise StmapInputError(msg)
        if keep.all():
            return self
        logger.info(
            "%s: keeping %d Gene Expression features of %d", self.source, keep.sum(), keep.size
        )
        return replace(
            self,
            counts=self.counts[:, np.flatnonzero(keep)].tocsr(),
            genes=self.genes[keep],
            gene_ids=self.gene_ids[keep],
            feature_types=self.feature_types[keep],
        )


def _str_array(values: Any) -> np.ndarray:
    """Decode an HDF5 string/bytes array to ``str``."""
    arr = np.asarray(values)
    if arr.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in arr], dtype=str)
    return arr.astype(str)


def _counts_dtype(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Store float64 counts as float32 and int64 as int32 when they fit; canonical CSR."""
    if counts.dtype == np.float64:
        counts = counts.astype(np.float32)
    elif counts.dtype == np.int64 and (counts.nnz == 0 or abs(counts.data).max() < 2**31):
        counts = counts.astype(np.int32)
    counts.sum_duplicates()
    return counts


def _read_10x_h5(path: Path) -> _Matrix:
    """Read a 10x HDF5 feature-barcode matrix (CSC by barcode: shape = (features, barcodes))."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                genes, ids = _str_array(feats["name"][:]), _str_array(feats["id"][:])
                types = _str_array(feats["feature_type"][:]) if "feature_type" in feats else None
            else:  # Cell Ranger 2 layout: one group per genome
                g = f[next(iter(f.keys()))]
                genes, ids, types = _str_array(g["gene_names"][:]), _str_array(g["genes"][:]), None
            n_feat, n_bc = (int(v) for v in g["shape"][:2])
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            barcodes = _str_array(g["barcodes"][:])
    except (OSError, KeyError, StopIteration) as err:
        msg = (
            f"{path}: not a 10x feature-barcode HDF5 matrix ({err!r}); use Space Ranger's "
            "filtered_feature_bc_matrix.h5"
        )
        raise StmapInputError(msg) from err
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or len(genes) != n_feat:
        msg = (
            f"{path}: inconsistent matrix (shape {n_feat}×{n_bc}, indptr {len(indptr)}, "
            f"{len(barcodes)} barcodes, {len(genes)} features); the file is truncated or corrupt"
        )
        raise StmapInputError(msg)
    counts = sp.csr_matrix(
        (data, indices.astype(np.int64), indptr.astype(np.int64)), shape=(n_bc, n_feat)
    )
    return _Matrix(_counts_dtype(counts), barcodes, genes, ids, types, path)


def _read_tsv(path: Path) -> pd.DataFrame:
    """A headerless (maybe gzipped, maybe quoted) tab-separated file as strings."""
    import pandas as pd

    return pd.read_csv(io.BytesIO(_read_bytes(path)), sep="\t", header=None, dtype=str)


def _read_10x_mtx(folder: Path) -> _Matrix:
    """Read a 10x mtx folder (matrix.mtx[.gz] is features × barcodes)."""
    import scipy.io

    def pick(*names: str) -> Path:
        for name in names:
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.exists():
                    return candidate
        msg = (
            f"{folder}: no {' or '.join(names)}[.gz]; expected a 10x matrix folder (matrix.mtx.gz, "
            "features.tsv.gz, barcodes.tsv.gz)"
        )
        raise StmapInputError(msg)

    mtx, feat_path, bc_path = (
        pick("matrix.mtx"),
        pick("features.tsv", "genes.tsv"),
        pick("barcodes.tsv"),
    )
    try:
        coo = scipy.io.mmread(io.BytesIO(_read_bytes(mtx)))
        feats, bcs = _read_tsv(feat_path), _read_tsv(bc_path)
    except Exception as err:  # scipy / pandas parse errors
        msg = (
            f"{folder}: cannot parse the 10x matrix folder ({err}); re-copy it from Space Ranger "
            "outs/"
        )
        raise StmapInputError(msg) from err
    counts = sp.csr_matrix(sp.coo_matrix(coo).T)
    ids = feats[0].to_numpy(str)
    genes = feats[1].to_numpy(str) if feats.shape[1] > 1 else ids
    types = feats[2].to_numpy(str) if feats.shape[1] > 2 else None
    barcodes = bcs[0].to_numpy(str)
    if counts.shape != (len(barcodes), len(ids)):
        msg = (
            f"{mtx}: matrix is {coo.shape[0]}×{coo.shape[1]} (features × barcodes) but there are "
            f"{len(ids)} features and {len(barcodes)} barcodes; files from different runs"
        )
        raise StmapInputError(msg)
    return _Matrix(_counts_dtype(counts), barcodes, genes, ids, types, folder)


def _read_matrix(root: Path) -> _Matrix:
    """Filtered (else raw) matrix in ``root``: the h5 preferred over the mtx folder."""
    for prefix in ("filtered", "raw"):
        h5, folder = root / f"{prefix}_feature_bc_matrix.h5", root / f"{prefix}_feature_bc_matrix"
        if h5.is_file():
            return _read_10x_h5(h5).gene_expression_only()
        if folder.is_dir():
            return _read_10x_mtx(folder).gene_expression_only()
    msg = (
        f"{root}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ found; "
        f"expected {_EXPECTED_LAYOUTS}"
    )
    raise StmapInputError(msg)


def _join_positions(
    matrix: _Matrix, positions: pd.DataFrame, pos_path: Path, *, drop_unpositioned: bool
) -> tuple[_Matrix, pd.DataFrame]:
    """Positions row per matrix barcode (matrix order wins); unpositioned barcodes raise."""
    idx = positions.index.get_indexer(matrix.barcodes)
    missing = idx < 0
    if missing.any():
        n_miss, n = int(missing.sum()), len(idx)
        text = (
            f"{n_miss} of {n} barcodes of {matrix.source.name} are not in {pos_path}"
            f" (e.g. {matrix.barcodes[missing][0]})"
        )
        if not drop_unpositioned:
            msg = (
                f"{text}: matrix and positions come from different runs or bin sizes; use the "
                f"files of one run, or drop_unpositioned=True to keep the {n - n_miss} that match"
            )
            raise StmapInputError(msg)
        _warn(f"{text}: dropped them")
        keep = np.flatnonzero(~missing)
        matrix = replace(matrix, counts=matrix.counts[keep], barcodes=matrix.barcodes[keep])
        idx = idx[keep]
    return matrix, positions.iloc[idx]


def _spots_from_spaceranger(
    roots: list[Path],
    *,
    kind: str,
    library_id: str,
    drop_unpositioned: bool,
    bin_hint: float | None = None,
) -> Spots:
    """Assemble :class:`Spots` from a Space Ranger folder (``roots[0]``, fallbacks after)."""
    pos_path = _find(roots[:1], _POSITION_FILES)
    if pos_path is None:
        msg = (
            f"{roots[0]}: no spatial/tissue_positions.parquet, tissue_positions.csv or "
            f"tissue_positions_list.csv; expected {_EXPECTED_LAYOUTS}"
        )
        raise StmapInputError(msg)
    matrix = _read_matrix(roots[0])
    sf, _ = _read_scalefactors(roots)
    matrix, pos = _join_positions(
        matrix, _read_positions(pos_path), pos_path, drop_unpositioned=drop_unpositioned
    )
    yx = pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(np.float64)  # row = y, col = x
    _check_finite(yx, pos_path)
    images = {k: p for k, v in _IMAGE_FILES.items() if (p := _find(roots, (v,))) is not None}
    spots = Spots(
        centers_yx=yx,
        counts=matrix.counts,
        genes=matrix.genes,
        gene_ids=matrix.gene_ids,
        barcodes=matrix.barcodes,
        in_tissue=pos["in_tissue"].to_numpy().astype(bool),
        array_rc=pos[["array_row", "array_col"]].to_numpy(np.int64),
        library_id=library_id,
        scalefactors=sf,
        image_paths=images,
        source=roots[0],
        **_physical_scale(sf, kind=kind, source=roots[0], bin_hint=bin_hint),
    )
    _check_scalefactor_images(spots)
    logger.info("read %r from %s", spots, roots[0])
    return spots


def _check_finite(centers_yx: np.ndarray, path: Path) -> None:
    """Raise when spot coordinates are missing (NaN) or infinite."""
    bad = ~np.isfinite(centers_yx).all(axis=1)
    if bad.any():
        msg = (
            f"{path}: {int(bad.sum())} of {len(bad)} spots have no valid pixel position (NaN/inf); "
            "re-export the positions"
        )
        raise StmapInputError(msg)


# --------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------
def _require_exists(path: str | Path) -> Path:
    """``Path(path)``, raising a one-line error when it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p}: no such file or folder; expected {_EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    return p


def _visium_root(path: Path) -> Path:
    """Folder of a Visium run's files: ``path``, ``path/outs`` or the parent of ``spatial/``."""
    if (path / "outs").is_dir():
        return path / "outs"
    if path.name == "spatial" and _find([path.parent], _POSITION_FILES) is not None:
        return path.parent
    return path


def _sample_name(root: Path) -> str:
    """Sample name: the folder holding ``outs/`` (else the folder itself)."""
    return root.parent.name if root.name == "outs" else root.name


def read_visium(
    path: str | Path, *, library_id: str | None = None, drop_unpositioned: bool = False
) -> Spots:
    """Read Space Ranger Visium output (55 µm spots) or a legacy-ST folder in that layout.

    Parameters
    ----------
    path : str or Path
        Space Ranger ``outs/``, a folder containing ``outs/``, or any folder with
        ``spatial/tissue_positions.csv`` (v2+, header) or ``tissue_positions_list.csv`` (v1,
        headerless) — in ``spatial/`` or at its root — plus ``filtered_feature_bc_matrix.h5``
        or ``filtered_feature_bc_matrix/`` (mtx; h5 preferred; raw_* as a fallback).
    library_id : str, optional
        Name for the section; default: the sample folder name.
    drop_unpositioned : bool
        Drop matrix barcodes missing from the positions (with a warning) instead of raising.

    Returns
    -------
    Spots
        Disks of 55 µm at 100 µm pitch (legacy ST: ``bin_size_um`` 100 → 100 µm at 200 µm);
        ``mpp`` from ``microns_per_pixel`` or ``65 / spot_diameter_fullres``.
    """
    root = _visium_root(_require_exists(path))
    if not root.is_dir():
        msg = f"{root}: not a folder; expected {_EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    return _spots_from_spaceranger(
        [root],
        kind="auto",
        library_id=library_id or _sample_name(root),
        drop_unpositioned=drop_unpositioned,
    )


# --------------------------------------------------------------------------------------------
# Visium HD
# --------------------------------------------------------------------------------------------
def _square_dirs(path: Path) -> dict[float, Path]:
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
        return sorted(_square_dirs(Path(path).expanduser()))
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
    p = _require_exists(path)
    dirs = _square_dirs(p)
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
    spots = _spots_from_spaceranger(
        roots,
        kind="hd",
        library_id=_sample_name(outs),
        drop_unpositioned=drop_unpositioned,
        bin_hint=size,
    )
    if not math.isclose(spots.bin_um, size):
        msg = (
            f"{square}: folder name says {size:g} µm but scalefactors_json.json says "
            f"bin_size_um {spots.bin_um:g} µm; using the latter"
        )
        _warn(msg)
    return spots


# --------------------------------------------------------------------------------------------
# AnnData
# --------------------------------------------------------------------------------------------
def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(y, x[, c]) image of any dtype → (y, x, 3) RGB uint8 (floats assumed in [0, 1])."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _h5ad_library(adata: Any, path: Path, library_id: str | None) -> tuple[str, dict]:
    """The library (id, ``uns['spatial'][id]``) to read; ``(stem, {})`` when absent."""
    libs = adata.uns.get("spatial", {}) if hasattr(adata.uns, "get") else {}
    if library_id is not None:
        if library_id not in libs:
            msg = (
                f"{path}: no library {library_id!r} in uns['spatial'] (have {sorted(libs)}); pass "
                "one of them"
            )
            raise StmapInputError(msg)
        return library_id, dict(libs[library_id])
    if len(libs) > 1:
        msg = (
            f"{path}: {len(libs)} libraries in uns['spatial'] ({sorted(libs)}); pass library_id= "
            "one of them"
        )
        raise StmapInputError(msg)
    if not libs:
        logger.warning("%s: no uns['spatial'] (scale factors, images)", path)
        return path.stem, {}
    lib = next(iter(libs))
    return str(lib), dict(libs[lib])


def _h5ad_counts(adata: Any, path: Path) -> sp.csr_matrix:
    """Raw counts: ``layers['counts']`` when present, else ``X``; warns when not integer."""
    source = "layers['counts']" if "counts" in adata.layers else "X"
    matrix = adata.layers["counts"] if source != "X" else adata.X
    if matrix is None:
        msg = f"{path}: no X and no layers['counts']; the file holds no expression"
        raise StmapInputError(msg)
    counts = _counts_dtype(sp.csr_matrix(matrix))
    data = counts.data
    if data.size and (data.min() < 0 or not np.allclose(data, np.round(data))):
        msg = (
            f"{path}: {source} holds non-integer or negative values (normalised?); put raw counts "
            "in layers['counts']"
        )
        _warn(msg)
    return counts


def _h5ad_genes(adata: Any) -> tuple[np.ndarray, np.ndarray]:
    """(symbols, ids) from var_names and ``var['gene_ids']`` (or a symbol column)."""
    names = np.asarray(adata.var_names, dtype=str)
    var = adata.var
    ids = var["gene_ids"].to_numpy(str) if "gene_ids" in var else names
    for column in ("gene_symbols", "gene_symbol", "feature_name", "SYMBOL"):
        if column in var and "gene_ids" not in var:
            return var[column].to_numpy(str), names
    return names, ids


def _h5ad_obs_arrays(adata: Any, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``in_tissue`` (all True when absent) and ``array_rc`` (None when absent) from obs."""
    obs = adata.obs
    in_tissue = obs["in_tissue"].to_numpy().astype(bool) if "in_tissue" in obs else np.ones(n, bool)
    array_rc = None
    if "array_row" in obs and "array_col" in obs:
        array_rc = obs[["array_row", "array_col"]].to_numpy(np.int64)
    return in_tissue, array_rc


def read_spots_h5ad(path: str | Path, *, library_id: str | None = None) -> Spots:
    """Read spots from an ``.h5ad`` in the scanpy / squidpy spatial convention.

    Parameters
    ----------
    path : str or Path
        ``.h5ad`` with ``obsm['spatial']`` = (x, y) full-resolution px per spot and, ideally,
        ``uns['spatial'][library]['scalefactors']`` (+ ``['images']``). Counts come from
        ``layers['counts']`` if present, else ``X``.
    library_id : str, optional
        Library in ``uns['spatial']`` (needed when there are several).

    Returns
    -------
    Spots
        Squares when ``bin_size_um`` < 55 (HD bins), else disks (55 µm Visium when no
        ``bin_size_um``; 100 µm at 200 µm pitch for legacy ST). ``mpp`` from
        ``microns_per_pixel``, else ``65 / spot_diameter_fullres`` (Visium) or
        ``bin_size_um / spot_diameter_fullres``; None (with a warning) if neither is given.
    """
    p = _require_exists(path)
    import anndata

    try:
        adata = anndata.read_h5ad(p)
    except Exception as err:  # h5py / anndata raise many types
        msg = f"{p}: cannot read as .h5ad ({err}); expected an AnnData file"
        raise StmapInputError(msg) from err
    if "spatial" not in adata.obsm:
        msg = (
            f"{p}: no obsm['spatial'] (have {list(adata.obsm)}); expected (x, y) full-resolution "
            "px per spot as scanpy/squidpy write it"
        )
        raise StmapInputError(msg)
    lib, entry = _h5ad_library(adata, p, library_id)
    if "library_id" in adata.obs and library_id is not None:
        adata = adata[adata.obs["library_id"].astype(str) == lib]
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    yx = xy[:, ::-1].copy()  # obsm['spatial'] is (x, y): the one swap
    _check_finite(yx, p)
    sf = dict(entry.get("scalefactors", {}))
    genes, gene_ids = _h5ad_genes(adata)
    in_tissue, array_rc = _h5ad_obs_arrays(adata, len(yx))
    images = {str(k): _to_rgb_uint8(v) for k, v in dict(entry.get("images", {})).items()}
    spots = Spots(
        centers_yx=yx,
        counts=_h5ad_counts(adata, p),
        genes=genes,
        gene_ids=gene_ids,
        barcodes=np.asarray(adata.obs_names, dtype=str),
        in_tissue=in_tissue,
        array_rc=array_rc,
        library_id=lib,
        scalefactors=sf,
        images=images,
        source=p,
        **_physical_scale(sf, kind="auto", source=p),
    )
    _check_scalefactor_images(spots)
    logger.info("read %r from %s", spots, p)
    return spots


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def _h5ad_has_spatial(path: Path) -> bool:
    """True when the HDF5 file has ``obsm/spatial`` (read without loading anything)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "obsm" in f and "spatial" in f["obsm"]


def detect_spots_layout(path: str | Path) -> str | None:
    """Layout of ``path``: ``"visium"``, ``"visium_hd"``, ``"h5ad"`` or None.

    ``"h5ad"`` only for an ``.h5ad`` with ``obsm['spatial']``. Never raises: the napari reader
    uses it to decide whether a path is ours.
    """
    try:
        p = Path(path).expanduser()
        if p.is_file():
            return "h5ad" if p.suffix.lower() == ".h5ad" and _h5ad_has_spatial(p) else None
        if not p.is_dir():
            return None
        if _square_dirs(p):
            return "visium_hd"
        if _find([_visium_root(p)], _POSITION_FILES) is not None:
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
    p = _require_exists(path)
    layout = "h5ad" if p.is_file() and p.suffix.lower() == ".h5ad" else detect_spots_layout(p)
    if layout == "visium_hd":
        return read_visium_hd(p, bin_um=bin_um)
    if layout is None:
        msg = f"{p}: not Space Ranger output or .h5ad; expected {_EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    spots = read_visium(p) if layout == "visium" else read_spots_h5ad(p)
    if bin_um is not None and not math.isclose(float(bin_um), spots.bin_um):
        msg = (
            f"{p}: holds {spots.bin_um:g} µm spots, not {float(bin_um):g} µm; bin_um selects "
            "Visium HD bin sizes only"
        )
        raise StmapInputError(msg)
    return spots
