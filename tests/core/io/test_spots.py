"""Readers of measured spots: Visium (v1/v2 csv), Visium HD (parquet), 10x h5/mtx, h5ad.

Every layout is written here in ``tmp_path`` with known coordinates and counts; the real
layouts under ``../shared/data`` are read in the ``realdata`` tests (skipped when absent).
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from PIL import Image

from napari_stmap.core.errors import StmapInputError, StmapInputWarning
from napari_stmap.core.io.spots import (
    Spots,
    available_bin_sizes,
    detect_spots_layout,
    read_spots,
    read_spots_h5ad,
    read_visium,
    read_visium_hd,
)

# ------------------------------------------------------------------------------------------
# Known synthetic content
# ------------------------------------------------------------------------------------------
BARCODES = np.array(["AAAC-1", "AAAG-1", "AAAT-1", "AACA-1", "AACC-1"])
GENES = np.array(["GeneA", "GeneB", "GeneC"])
GENE_IDS = np.array(["ENSG01", "ENSG02", "ENSG03"])
COUNTS = np.array([[0, 1, 2], [10, 0, 12], [20, 21, 0], [30, 31, 32], [0, 0, 7]])  # spot × gene
ROWS_Y = np.array([100.5, 200.0, 300.0, 400.0, 500.0])  # pxl_row_in_fullres
COLS_X = np.array([1000.0, 1100.0, 1200.25, 1300.0, 1400.0])  # pxl_col_in_fullres
IN_TISSUE = np.array([1, 1, 0, 1, 1])
SPOT_DIAMETER_FULLRES = 130.0  # 65 µm / 130 px -> 0.5 µm/px
VISIUM_SF = {
    "spot_diameter_fullres": SPOT_DIAMETER_FULLRES,
    "tissue_hires_scalef": 0.1,
    "tissue_lowres_scalef": 0.05,
    "fiducial_diameter_fullres": 200.0,
}


def write_10x_h5(path: Path, counts, barcodes, genes, ids, types=None) -> None:
    """10x HDF5 matrix: CSC of features × barcodes (columns are barcodes)."""
    csc = sp.csc_matrix(np.asarray(counts).T)
    types = ["Gene Expression"] * len(genes) if types is None else types
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        feats = g.create_group("features")
        feats["name"], feats["id"] = np.array(genes, dtype="S"), np.array(ids, dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")


def write_10x_mtx(folder: Path, counts, barcodes, genes, ids, types=None) -> None:
    """10x mtx folder: matrix.mtx.gz (features × barcodes), features.tsv.gz, barcodes.tsv.gz."""
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(np.asarray(counts).T))
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(buf.getvalue()))
    types = ["Gene Expression"] * len(genes) if types is None else types
    feats = "".join(f"{i}\t{g}\t{t}\n" for i, g, t in zip(ids, genes, types, strict=True))
    (folder / "features.tsv.gz").write_bytes(gzip.compress(feats.encode()))
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress("\n".join(barcodes).encode() + b"\n"))


def positions_frame(rows=ROWS_Y, cols=COLS_X, barcodes=BARCODES, in_tissue=IN_TISSUE):
    """Positions as Space Ranger writes them, shuffled, plus one spot not in the matrix."""
    df = pd.DataFrame(
        {
            "barcode": list(barcodes) + ["TTTT-1"],
            "in_tissue": list(in_tissue) + [0],
            "array_row": list(range(len(barcodes))) + [77],
            "array_col": [2 * i for i in range(len(barcodes))] + [78],
            "pxl_row_in_fullres": list(rows) + [5.0],
            "pxl_col_in_fullres": list(cols) + [6.0],
        }
    )
    order = np.random.default_rng(0).permutation(len(df))
    return df.iloc[order].reset_index(drop=True)


def write_png(path: Path, shape_yx: tuple[int, int], mode: str = "RGB") -> None:
    """A blank PNG of ``shape_yx`` (height, width) px."""
    Image.new(mode, (shape_yx[1], shape_yx[0]), color=(200, 100, 50, 255)[: len(mode)]).save(path)


def make_visium(
    root: Path,
    *,
    v1: bool = True,
    matrix: str = "h5",
    sf: dict | None = None,
    positions: pd.DataFrame | None = None,
    hires_shape: tuple[int, int] = (200, 200),
) -> Path:
    """A Space Ranger Visium outs/ folder in ``root``; returns it."""
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    df = positions_frame() if positions is None else positions
    if v1:
        df.to_csv(spatial / "tissue_positions_list.csv", header=False, index=False)
    else:
        df.to_csv(spatial / "tissue_positions.csv", header=True, index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(VISIUM_SF if sf is None else sf))
    write_png(spatial / "tissue_hires_image.png", hires_shape, "RGBA")
    write_png(spatial / "tissue_lowres_image.png", (hires_shape[0] // 2, hires_shape[1] // 2))
    if matrix in ("h5", "both"):
        write_10x_h5(root / "filtered_feature_bc_matrix.h5", COUNTS, BARCODES, GENES, GENE_IDS)
    if matrix in ("mtx", "both"):
        # in "both", the mtx holds other numbers: the h5 must win
        mtx_counts = COUNTS if matrix == "mtx" else COUNTS + 100
        write_10x_mtx(root / "filtered_feature_bc_matrix", mtx_counts, BARCODES, GENES, GENE_IDS)
    return root


HD_MPP = 0.25


def make_hd(outs: Path, sizes=(8, 16)) -> Path:
    """A Visium HD outs/ with binned_outputs/square_NNNum/ for ``sizes`` (µm)."""
    for size in sizes:
        square = outs / "binned_outputs" / f"square_{size:03d}um"
        (square / "spatial").mkdir(parents=True)
        barcodes = [f"s_{size:03d}um_{i:05d}_00000-1" for i in range(4)]
        rows = np.array([-12.0, 40.0, 800.0, 1200.0])  # negative and outside: legitimate
        cols = np.array([-3.0, 64.0, 900.0, 2500.0])
        df = positions_frame(rows, cols, barcodes, in_tissue=[0, 1, 1, 0])
        df.to_parquet(square / "spatial" / "tissue_positions.parquet")
        sf = {
            "spot_diameter_fullres": size / HD_MPP,
            "bin_size_um": float(size),
            "microns_per_pixel": HD_MPP,
            "tissue_hires_scalef": 0.1,
        }
        (square / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
        write_png(square / "spatial" / "tissue_hires_image.png", (100, 100))  # 1000 × 1000 full-res
        counts = COUNTS[:4] * size
        write_10x_h5(square / "filtered_feature_bc_matrix.h5", counts, barcodes, GENES, GENE_IDS)
    return outs


def make_h5ad(
    path: Path, *, uns: bool = True, hires_shape: tuple[int, int] = (200, 180), **sf_overrides
) -> Path:
    """A legacy-ST h5ad like HER2ST: obsm['spatial'] = (x, y), 100 µm spots at 0.5 µm/px."""
    import anndata

    sf = {
        "bin_size_um": 100.0,
        "microns_per_pixel": 0.5,
        "spot_diameter_fullres": 200.0,
        "tissue_hires_scalef": 0.1,
    }
    sf.update(sf_overrides)
    sf = {k: v for k, v in sf.items() if v is not None}
    obs = pd.DataFrame(
        {"in_tissue": IN_TISSUE, "array_row": [1, 2, 3, 4, 5], "array_col": [6, 7, 8, 9, 10]},
        index=BARCODES,
    )
    var = pd.DataFrame({"gene_ids": GENE_IDS}, index=GENES)
    adata = anndata.AnnData(X=sp.csr_matrix(COUNTS.astype(np.int32)), obs=obs, var=var)
    adata.obsm["spatial"] = np.c_[COLS_X, ROWS_Y]  # (x, y)
    if uns:
        image = np.full((*hires_shape, 3), 0.5, dtype=np.float32)  # float in [0, 1]
        adata.uns["spatial"] = {"S1": {"scalefactors": sf, "images": {"hires": image}}}
    adata.write_h5ad(path)
    return path


@pytest.fixture
def no_warnings():
    """Turn every warning into an error inside the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_known_visium(spots: Spots) -> None:
    """The synthetic Visium content, in matrix-barcode order, after the reader."""
    np.testing.assert_array_equal(spots.barcodes, BARCODES)
    np.testing.assert_array_equal(spots.centers_yx, np.c_[ROWS_Y, COLS_X])
    np.testing.assert_array_equal(spots.counts.toarray(), COUNTS)
    assert spots.counts[3, 2] == 32  # spot 3, gene 2
    np.testing.assert_array_equal(spots.genes, GENES)
    np.testing.assert_array_equal(spots.gene_ids, GENE_IDS)
    np.testing.assert_array_equal(spots.in_tissue, IN_TISSUE.astype(bool))
    np.testing.assert_array_equal(spots.array_rc, np.c_[np.arange(5), 2 * np.arange(5)])
    assert spots.footprint == "disk"
    assert spots.mpp == pytest.approx(65 / SPOT_DIAMETER_FULLRES)
    assert spots.size_um == 55 and spots.bin_um == 55 and spots.pitch_um == 100
    assert spots.size_px == pytest.approx(55 / 0.5)
    assert (spots.n_spots, spots.n_genes) == (5, 3)


# ------------------------------------------------------------------------------------------
# Visium
# ------------------------------------------------------------------------------------------
def test_visium_v1_csv_h5(tmp_path, no_warnings):
    root = make_visium(tmp_path / "sampleA" / "outs", v1=True, matrix="h5")
    spots = read_visium(root)
    assert_known_visium(spots)
    assert spots.library_id == "sampleA"
    assert spots.counts.dtype == np.int32
    assert set(spots.image_paths) == {"hires", "lowres"}
    assert spots.image_scale("hires") == pytest.approx(0.1)
    assert spots.fullres_shape_yx_estimate() == (2000, 2000)
    image = spots.load_image("hires")  # RGBA png -> RGB uint8
    assert image.shape == (200, 200, 3) and image.dtype == np.uint8
    assert spots.images["hires"] is image


def test_visium_v2_csv_mtx_parent_of_outs(tmp_path, no_warnings):
    make_visium(tmp_path / "sampleB" / "outs", v1=False, matrix="mtx")
    assert detect_spots_layout(tmp_path / "sampleB") == "visium"
    spots = read_spots(tmp_path / "sampleB")  # the folder containing outs/
    assert_known_visium(spots)
    assert spots.library_id == "sampleB"


def test_visium_h5_preferred_over_mtx(tmp_path):
    spots = read_visium(make_visium(tmp_path / "outs", matrix="both"))
    np.testing.assert_array_equal(spots.counts.toarray(), COUNTS)


def test_visium_files_at_root_and_spatial_folder(tmp_path):
    root = make_visium(tmp_path / "flat")
    for f in (root / "spatial").iterdir():
        shutil.move(f, root / f.name)
    assert_known_visium(read_spots(root))
    other = make_visium(tmp_path / "other")
    assert_known_visium(read_spots(other / "spatial"))  # spatial/ itself: its parent is read


def test_visium_keeps_gene_expression_only(tmp_path):
    root = tmp_path / "outs"
    make_visium(root, matrix="none")
    counts = np.c_[COUNTS, np.arange(5) + 50]
    write_10x_mtx(
        root / "filtered_feature_bc_matrix",
        counts,
        BARCODES,
        [*GENES, "CD3_TotalSeqB"],
        [*GENE_IDS, "CD3"],
        ["Gene Expression"] * 3 + ["Antibody Capture"],
    )
    assert_known_visium(read_visium(root))


def test_visium_legacy_st_bin_size(tmp_path):
    sf = {"spot_diameter_fullres": 200.0, "bin_size_um": 100.0, "tissue_hires_scalef": 0.1}
    spots = read_visium(make_visium(tmp_path / "outs", sf=sf))
    assert spots.footprint == "disk" and spots.bin_um == 100 and spots.pitch_um == 200
    assert spots.mpp == pytest.approx(0.5)  # bin_size_um / spot_diameter_fullres
    assert spots.size_px == pytest.approx(200.0)


def test_visium_unknown_mpp_warns(tmp_path):
    with pytest.warns(StmapInputWarning, match="µm/px"):
        spots = read_visium(make_visium(tmp_path / "outs", sf={"tissue_hires_scalef": 0.1}))
    assert spots.mpp is None and np.isnan(spots.size_px) and spots.size_um == 55


def test_visium_unpositioned_barcodes(tmp_path):
    positions = positions_frame()
    positions = positions[positions.barcode != "AAAG-1"]
    root = make_visium(tmp_path / "outs", positions=positions)
    with pytest.raises(StmapInputError, match=r"1 of 5 barcodes .* drop_unpositioned"):
        read_visium(root)
    with pytest.warns(StmapInputWarning, match="1 of 5"):
        spots = read_visium(root, drop_unpositioned=True)
    assert list(spots.barcodes) == ["AAAC-1", "AAAT-1", "AACA-1", "AACC-1"]
    np.testing.assert_array_equal(spots.counts.toarray(), COUNTS[[0, 2, 3, 4]])


def test_visium_missing_files(tmp_path):
    root = make_visium(tmp_path / "outs", matrix="none")
    with pytest.raises(StmapInputError, match="filtered_feature_bc_matrix"):
        read_visium(root)
    (root / "spatial" / "tissue_positions_list.csv").unlink()
    with pytest.raises(StmapInputError, match="tissue_positions"):
        read_visium(root)
    with pytest.raises(StmapInputError, match="no such file"):
        read_spots(tmp_path / "nope")


def test_visium_bad_positions_columns(tmp_path):
    positions = positions_frame().rename(columns={"pxl_row_in_fullres": "y"})
    root = make_visium(tmp_path / "outs", v1=False, positions=positions)
    with pytest.raises(StmapInputError, match=r"missing columns \['pxl_row_in_fullres'\]"):
        read_visium(root)


def test_not_spaceranger_folder(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert detect_spots_layout(tmp_path / "junk") is None
    assert detect_spots_layout(tmp_path / "junk" / "notes.txt") is None
    assert detect_spots_layout(tmp_path / "missing") is None
    assert detect_spots_layout("\0bad") is None
    with pytest.raises(StmapInputError, match="not Space Ranger output"):
        read_spots(tmp_path / "junk")


# ------------------------------------------------------------------------------------------
# Image checks
# ------------------------------------------------------------------------------------------
def test_read_time_wrong_size_image_warns(tmp_path):
    # hires 20 × 20 px at scalef 0.1 = 200 × 200 full-res: the spots (x up to 1400) do not fit
    with pytest.warns(StmapInputWarning) as record:
        read_visium(make_visium(tmp_path / "outs", hires_shape=(20, 20)))
    messages = [str(w.message) for w in record]
    assert any("4 of 4 in-tissue spots" in m and "hires image 20×20 px" in m for m in messages)
    assert any("lowres image 10×10 px" in m for m in messages)
    assert all(w.filename == __file__ for w in record)  # attributed to the caller


def test_read_time_swapped_positions_raise(tmp_path):
    # full-res 600 (y) × 2000 (x); the file has x in the row column and y in the col column
    positions = positions_frame(rows=COLS_X, cols=ROWS_Y)
    root = make_visium(tmp_path / "outs", positions=positions, hires_shape=(60, 200))
    with pytest.raises(StmapInputError, match="swapped.*pxl_row_in_fullres must be y"):
        read_visium(root)


def test_read_time_hires_lowres_disagree(tmp_path):
    root = make_visium(tmp_path / "outs")
    write_png(root / "spatial" / "tissue_lowres_image.png", (150, 150))  # 3000 px vs 2000 px
    with pytest.warns(StmapInputWarning, match="hires and lowres"):
        read_visium(root)


def test_check_against_image(tmp_path, no_warnings):
    spots = read_visium(make_visium(tmp_path / "outs"))
    spots.check_against_image((2000, 2000, 3))  # all inside: silent
    spots.check_against_image((2000, 2000), mpp=0.52)  # within 10 %: silent


def test_check_against_image_problems(tmp_path):
    spots = read_visium(make_visium(tmp_path / "outs"))
    with pytest.warns(StmapInputWarning, match=r"1 of 5 spots \(1 in tissue\) lie outside"):
        spots.check_against_image((450, 2000))  # y = 500 is outside
    with pytest.raises(StmapInputError, match="4 of 4 spots fall outside.*wrong image"):
        spots.check_against_image((90, 90), name="slide")
    with pytest.raises(StmapInputError, match="fit with x and y swapped"):
        spots.check_against_image((1500, 600))  # fits as (x, y), not as (y, x)
    with pytest.warns(StmapInputWarning, match="0.25 µm/px"):
        spots.check_against_image((2000, 2000), mpp=0.25)


def test_subset(tmp_path):
    spots = read_visium(make_visium(tmp_path / "outs"))
    sub = spots.subset(spots.in_tissue)
    assert sub.n_spots == 4 and list(sub.barcodes) == ["AAAC-1", "AAAG-1", "AACA-1", "AACC-1"]
    np.testing.assert_array_equal(sub.counts.toarray(), COUNTS[IN_TISSUE.astype(bool)])
    picked = spots.subset([4, 0])
    np.testing.assert_array_equal(picked.centers_yx, [[500.0, 1400.0], [100.5, 1000.0]])
    np.testing.assert_array_equal(picked.array_rc, [[4, 8], [0, 0]])
    assert picked.mpp == spots.mpp and picked.image_paths == spots.image_paths
    with pytest.raises(ValueError, match="mask"):
        spots.subset(np.ones(3, bool))


# ------------------------------------------------------------------------------------------
# Visium HD
# ------------------------------------------------------------------------------------------
def test_hd_sizes_and_paths(tmp_path, no_warnings):
    outs = make_hd(tmp_path / "hdsample" / "outs")
    for path in (outs.parent, outs, outs / "binned_outputs"):
        assert available_bin_sizes(path) == [8.0, 16.0]
        assert detect_spots_layout(path) == "visium_hd"
    square = outs / "binned_outputs" / "square_016um"
    assert available_bin_sizes(square) == [16.0]
    assert available_bin_sizes(tmp_path / "nothing") == []
    assert read_spots(outs).bin_um == 8  # default: 8 if present
    spots = read_visium_hd(square)
    assert spots.bin_um == 16 and spots.library_id == "hdsample"
    with pytest.raises(StmapInputError, match=r"no 2 µm bins; sizes present: 8, 16 µm"):
        read_visium_hd(outs, bin_um=2)


def test_hd_content(tmp_path, no_warnings):
    outs = make_hd(tmp_path / "outs", sizes=(2, 16))
    assert read_visium_hd(outs).bin_um == 2  # no 8: the smallest
    spots = read_spots(outs, bin_um=16)
    assert spots.footprint == "square" and spots.size_um == 16 and spots.pitch_um == 16
    assert spots.mpp == HD_MPP and spots.size_px == pytest.approx(16 / HD_MPP)
    # negative and off-image coordinates are kept, not warned about at read time
    np.testing.assert_array_equal(
        spots.centers_yx, [[-12.0, -3.0], [40.0, 64.0], [800.0, 900.0], [1200.0, 2500.0]]
    )
    np.testing.assert_array_equal(spots.in_tissue, [False, True, True, False])
    np.testing.assert_array_equal(spots.counts.toarray(), COUNTS[:4] * 16)
    assert spots.fullres_shape_yx_estimate() == (1000, 1000)


def test_hd_check_warns_only_when_asked(tmp_path):
    spots = read_visium_hd(make_hd(tmp_path / "outs"), bin_um=8)
    with pytest.warns(StmapInputWarning, match=r"2 of 4 spots \(0 in tissue\) lie outside"):
        spots.check_against_image((1000, 1000))


def test_hd_folder_without_squares(tmp_path):
    (tmp_path / "binned_outputs").mkdir()
    with pytest.raises(StmapInputError, match="square_NNNum"):
        read_visium_hd(tmp_path / "binned_outputs")


# ------------------------------------------------------------------------------------------
# h5ad
# ------------------------------------------------------------------------------------------
def test_h5ad_legacy_st(tmp_path, no_warnings):
    path = make_h5ad(tmp_path / "st.h5ad")
    assert detect_spots_layout(path) == "h5ad"
    spots = read_spots(path)
    np.testing.assert_array_equal(spots.centers_yx, np.c_[ROWS_Y, COLS_X])  # (x, y) -> (y, x)
    np.testing.assert_array_equal(spots.counts.toarray(), COUNTS)
    np.testing.assert_array_equal(spots.gene_ids, GENE_IDS)
    np.testing.assert_array_equal(spots.genes, GENES)
    np.testing.assert_array_equal(spots.in_tissue, IN_TISSUE.astype(bool))
    np.testing.assert_array_equal(spots.array_rc[:, 0], [1, 2, 3, 4, 5])
    assert spots.footprint == "disk" and spots.bin_um == 100 and spots.pitch_um == 200
    assert spots.mpp == 0.5 and spots.size_px == 200.0 and spots.library_id == "S1"
    image = spots.load_image("hires")
    assert image.dtype == np.uint8 and image.shape == (200, 180, 3) and image[0, 0, 0] == 128
    assert spots.fullres_shape_yx_estimate() == (2000, 1800)


def test_h5ad_mpp_rules(tmp_path):
    visium = make_h5ad(tmp_path / "v.h5ad", bin_size_um=None, microns_per_pixel=None)
    spots = read_spots_h5ad(visium)  # Visium: 65 µm / spot_diameter_fullres
    assert spots.bin_um == 55 and spots.mpp == pytest.approx(65 / 200)
    st = make_h5ad(tmp_path / "st.h5ad", microns_per_pixel=None)
    assert read_spots_h5ad(st).mpp == pytest.approx(100 / 200)
    hd = make_h5ad(tmp_path / "hd.h5ad", bin_size_um=8.0, microns_per_pixel=None)
    spots = read_spots_h5ad(hd)
    assert spots.footprint == "square" and spots.mpp == pytest.approx(8 / 200)
    bare = make_h5ad(tmp_path / "bare.h5ad", uns=False)
    with pytest.warns(StmapInputWarning, match="µm/px"):
        spots = read_spots_h5ad(bare)
    assert spots.mpp is None and spots.library_id == "bare"


def test_h5ad_errors(tmp_path):
    import anndata

    path = tmp_path / "nospatial.h5ad"
    anndata.AnnData(X=np.ones((2, 2), np.float32)).write_h5ad(path)
    assert detect_spots_layout(path) is None  # not ours for the napari reader
    with pytest.raises(StmapInputError, match=r"no obsm\['spatial'\]"):
        read_spots(path)
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    assert detect_spots_layout(bad) is None
    with pytest.raises(StmapInputError, match="cannot read as .h5ad"):
        read_spots_h5ad(bad)
    with pytest.raises(StmapInputError, match="bin_um selects Visium HD"):
        read_spots(make_h5ad(tmp_path / "st.h5ad"), bin_um=8)


def test_h5ad_counts_layer_and_normalised_x(tmp_path):
    import anndata

    path = make_h5ad(tmp_path / "a.h5ad")
    adata = anndata.read_h5ad(path)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(COUNTS.astype(np.float32)))
    adata.write_h5ad(path)
    np.testing.assert_array_equal(read_spots_h5ad(path).counts.toarray(), COUNTS)
    del adata.layers["counts"]
    adata.write_h5ad(path)
    with pytest.warns(StmapInputWarning, match="non-integer"):
        read_spots_h5ad(path)


def test_h5ad_swapped_positions_raise(tmp_path):
    import anndata

    # hires 200 × 60 px at scalef 0.1: full-res 2000 × 600 px
    path = make_h5ad(tmp_path / "a.h5ad", hires_shape=(200, 60))
    adata = anndata.read_h5ad(path)
    true_y, true_x = ROWS_Y + 1000, COLS_X - 900  # fit in 2000 × 600
    adata.obsm["spatial"] = np.c_[true_y, true_x]  # written as (y, x) by mistake
    adata.write_h5ad(path)
    with pytest.raises(StmapInputError, match=r"swapped.*obsm\['spatial'\] must hold \(x, y\)"):
        read_spots_h5ad(path)


# ------------------------------------------------------------------------------------------
# Real layouts (../shared/data; skipped when absent)
# ------------------------------------------------------------------------------------------
REAL_LAYOUTS = {
    # name: (relative path, bin_um, n_spots, n_genes, mpp, footprint)
    "visium_squidpy": ("formats/visium_squidpy", None, 100, 100, 65 / 89.42751063343188, "disk"),
    "visium_cytassist": (
        "formats/visium_cytassist",
        None,
        2898,
        19465,
        65 / 14.964878633873417,
        "disk",
    ),
    "visium_hd_seurat_8um": (
        "formats/visium_hd_seurat",
        8,
        2695,
        100,
        0.27376126715315274,
        "square",
    ),
    "visium_hd_visiumio_2um": (
        "formats/visium_hd_visiumio",
        2,
        10,
        10,
        0.2738242950835738,
        "square",
    ),
}


def raw_positions(folder: Path) -> pd.DataFrame:
    """Positions straight from the Space Ranger file, indexed by barcode."""
    spatial = folder / "spatial"
    if (spatial / "tissue_positions.parquet").exists():
        df = pd.read_parquet(spatial / "tissue_positions.parquet")
    elif (spatial / "tissue_positions.csv").exists():
        df = pd.read_csv(spatial / "tissue_positions.csv")
    else:
        df = pd.read_csv(spatial / "tissue_positions_list.csv", header=None)
        df.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
        return df.set_index("barcode")
    df = df.rename(columns={"pxl_row_in_fullres": "pxl_row", "pxl_col_in_fullres": "pxl_col"})
    return df.set_index("barcode")


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_LAYOUTS))
def test_real_layouts(shared_data, name):
    rel, bin_um, n_spots, n_genes, mpp, footprint = REAL_LAYOUTS[name]
    spots = read_spots(shared_data / rel, bin_um=bin_um)
    assert (spots.n_spots, spots.n_genes) == (n_spots, n_genes)
    assert spots.mpp == pytest.approx(mpp, rel=1e-9)
    assert spots.footprint == footprint
    if bin_um is not None:
        assert spots.bin_um == bin_um == spots.size_um
        assert spots.size_px == pytest.approx(bin_um / mpp)
    else:
        assert spots.bin_um == 55 and spots.size_px == pytest.approx(55 / mpp)
    raw = raw_positions(spots.source)
    for i in (0, spots.n_spots - 1):
        row = raw.loc[spots.barcodes[i]]
        assert tuple(spots.centers_yx[i]) == (row["pxl_row"], row["pxl_col"])
        assert spots.in_tissue[i] == bool(row["in_tissue"])
    assert spots.fullres_shape_yx_estimate() is not None


@pytest.mark.realdata
def test_real_visium_squidpy_spot_and_counts(shared_data):
    spots = read_visium(shared_data / "formats" / "visium_squidpy")
    i = int(np.flatnonzero(spots.barcodes == "AAACAAGTATCTCCCA-1")[0])
    assert tuple(spots.centers_yx[i]) == (8513.0, 9811.0)  # pxl_row, pxl_col of the csv
    with h5py.File(shared_data / "formats/visium_squidpy/filtered_feature_bc_matrix.h5") as f:
        g = f["matrix"]
        start, stop = g["indptr"][i], g["indptr"][i + 1]
        expected = np.zeros(spots.n_genes)
        expected[g["indices"][start:stop]] = g["data"][start:stop]
    np.testing.assert_array_equal(spots.counts[i].toarray().ravel(), expected)


@pytest.mark.realdata
def test_real_hd_seurat_sizes(shared_data):
    path = shared_data / "formats" / "visium_hd_seurat"
    assert available_bin_sizes(path) == [8.0, 16.0]
    assert read_spots(path).bin_um == 8
    # that test set copies the 8 µm matrix into square_016um: only 642 barcodes match
    with pytest.raises(StmapInputError, match="2053 of 2695 barcodes"):
        read_visium_hd(path, bin_um=16)
    with pytest.warns(StmapInputWarning):
        spots = read_visium_hd(path, bin_um=16, drop_unpositioned=True)
    assert spots.n_spots == 642 and spots.size_px == pytest.approx(16 / 0.27376126715315274)
    assert (spots.centers_yx < 0).any()  # negative coordinates are kept


@pytest.mark.realdata
def test_real_hd_visiumio_mtx_equals_h5(shared_data, tmp_path):
    src = shared_data / "formats" / "visium_hd_visiumio" / "binned_outputs" / "square_002um"
    copy = tmp_path / "square_002um"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.h5"))
    from_h5, from_mtx = read_visium_hd(src), read_visium_hd(copy)
    assert from_mtx.n_spots == 10 and from_mtx.n_genes == 10
    assert set(from_mtx.barcodes) == set(from_h5.barcodes)  # quoted, not-gzipped tsv.gz
    assert "s_002um_02448_01644-1" in from_mtx.barcodes
    np.testing.assert_array_equal(from_mtx.genes, from_h5.genes)
    np.testing.assert_array_equal(from_mtx.gene_ids, from_h5.gene_ids)
    assert from_mtx.counts.nnz == 0 and from_mtx.bin_um == 2


HER2ST = {"C2": (187, 15706), "C3": (180, 15821), "C4": (184, 15842), "C5": (181, 15721)}


@pytest.mark.realdata
@pytest.mark.parametrize("section", sorted(HER2ST))
def test_real_her2st(shared_data, section):
    path = shared_data / "her2st" / section / "spots.h5ad"
    spots = read_spots(path)
    assert (spots.n_spots, spots.n_genes) == HER2ST[section]
    assert spots.mpp == pytest.approx(0.687)
    assert spots.footprint == "disk" and spots.bin_um == 100 and spots.pitch_um == 200
    assert spots.size_px == pytest.approx(100 / 0.687)
    assert spots.library_id == section and spots.images["hires"].dtype == np.uint8
    with h5py.File(path) as f:
        xy = f["obsm"]["spatial"][:]
    np.testing.assert_array_equal(spots.centers_yx, xy[:, ::-1])  # (x, y) -> (y, x)
    import tifffile

    with tifffile.TiffFile(shared_data / "her2st" / section / "he.ome.tif") as tif:
        shape = tif.series[0].shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spots.check_against_image(shape, name="he.ome.tif", mpp=0.687)
