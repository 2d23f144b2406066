"""Space Ranger files: positions, feature-barcode matrices, scale factors; Visium spots.

Space Ranger writes positions as ``pxl_row_in_fullres`` (y) and ``pxl_col_in_fullres`` (x) in
full-resolution px; :func:`spots_from_spaceranger` swaps them to (y, x) once. The µm per px and
the spot footprint come from the scale factors (:func:`physical_scale`, also used for ``.h5ad``).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ...errors import StmapInputError
from ._checks import (
    EXPECTED_LAYOUTS,
    check_finite,
    check_scalefactor_images,
    require_exists,
    warn_input,
)
from ._container import Spots

if TYPE_CHECKING:
    import pandas as pd

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

POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_POS_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
_GENE_EXPRESSION = "Gene Expression"


# --------------------------------------------------------------------------------------------
# Physical scale
# --------------------------------------------------------------------------------------------
def physical_scale(
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
    warn_input(msg)
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


def find(roots: list[Path], names: tuple[str, ...]) -> Path | None:
    """First ``root/spatial/name`` or ``root/name`` that exists, names in order of preference."""
    for name in names:
        for root in roots:
            for candidate in (root / "spatial" / name, root / name):
                if candidate.exists():
                    return candidate
    return None


def _read_scalefactors(roots: list[Path]) -> tuple[dict, Path | None]:
    """``scalefactors_json.json`` content (``{}`` when absent) and its path."""
    path = find(roots, ("scalefactors_json.json",))
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


def counts_dtype(counts: sp.csr_matrix) -> sp.csr_matrix:
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
    return _Matrix(counts_dtype(counts), barcodes, genes, ids, types, path)


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
    return _Matrix(counts_dtype(counts), barcodes, genes, ids, types, folder)


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
        f"expected {EXPECTED_LAYOUTS}"
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
        warn_input(f"{text}: dropped them")
        keep = np.flatnonzero(~missing)
        matrix = replace(matrix, counts=matrix.counts[keep], barcodes=matrix.barcodes[keep])
        idx = idx[keep]
    return matrix, positions.iloc[idx]


def spots_from_spaceranger(
    roots: list[Path],
    *,
    kind: str,
    library_id: str,
    drop_unpositioned: bool,
    bin_hint: float | None = None,
) -> Spots:
    """Assemble :class:`Spots` from a Space Ranger folder (``roots[0]``, fallbacks after)."""
    pos_path = find(roots[:1], POSITION_FILES)
    if pos_path is None:
        msg = (
            f"{roots[0]}: no spatial/tissue_positions.parquet, tissue_positions.csv or "
            f"tissue_positions_list.csv; expected {EXPECTED_LAYOUTS}"
        )
        raise StmapInputError(msg)
    matrix = _read_matrix(roots[0])
    sf, _ = _read_scalefactors(roots)
    matrix, pos = _join_positions(
        matrix, _read_positions(pos_path), pos_path, drop_unpositioned=drop_unpositioned
    )
    yx = pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(np.float64)  # row = y, col = x
    check_finite(yx, pos_path)
    images = {k: p for k, v in _IMAGE_FILES.items() if (p := find(roots, (v,))) is not None}
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
        **physical_scale(sf, kind=kind, source=roots[0], bin_hint=bin_hint),
    )
    check_scalefactor_images(spots)
    logger.info("read %r from %s", spots, roots[0])
    return spots


# --------------------------------------------------------------------------------------------
# Visium
# --------------------------------------------------------------------------------------------
def visium_root(path: Path) -> Path:
    """Folder of a Visium run's files: ``path``, ``path/outs`` or the parent of ``spatial/``."""
    if (path / "outs").is_dir():
        return path / "outs"
    if path.name == "spatial" and find([path.parent], POSITION_FILES) is not None:
        return path.parent
    return path


def sample_name(root: Path) -> str:
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
    root = visium_root(require_exists(path))
    if not root.is_dir():
        msg = f"{root}: not a folder; expected {EXPECTED_LAYOUTS}"
        raise StmapInputError(msg)
    return spots_from_spaceranger(
        [root],
        kind="auto",
        library_id=library_id or sample_name(root),
        drop_unpositioned=drop_unpositioned,
    )
