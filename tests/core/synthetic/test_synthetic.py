"""Synthetic tissue generator: layout, determinism, truth vs counts, learnability."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

from napari_stmap.core import synthetic as syn
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.synthetic import load_synthetic, truth_density, write_synthetic

SIZE_UM = (560.0, 400.0)  # (width, height): 1120 × 800 px at 0.5 µm/px -> 2 pyramid levels
N_GENES = 40


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    calls = []
    out = write_synthetic(
        tmp_path_factory.mktemp("syn") / "a",
        size_um=SIZE_UM,
        n_genes=N_GENES,
        seed=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls and calls[-1][0] == calls[-1][1]
    return out


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """Same seed, different generation tile size."""
    return write_synthetic(
        tmp_path_factory.mktemp("syn") / "b", size_um=SIZE_UM, n_genes=N_GENES, seed=3, tile_px=512
    )


def _level0(sample) -> np.ndarray:
    with tifffile.TiffFile(sample.slide) as tif:
        return tif.series[0].levels[0].asarray()


def _dense_counts(sample, bin_um: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Counts (gene, row, col) of a bin size (0 where not in the filtered matrix) + presence mask."""
    folder = sample.outs / "binned_outputs" / f"square_{bin_um:03d}um"
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
    shape = (positions.array_row.max() + 1, positions.array_col.max() + 1)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        m = f["matrix"]
        n_genes, n_bins = m["shape"][:]
        data, indices, indptr = m["data"][:], m["indices"][:], m["indptr"][:]
        barcodes = m["barcodes"][:].astype(str)
    rows = np.array([int(b.split("_")[2]) for b in barcodes])
    cols = np.array([int(b.split("_")[3].split("-")[0]) for b in barcodes])
    dense = np.zeros((n_genes, *shape), dtype=np.int64)
    present = np.zeros(shape, dtype=bool)
    present[rows, cols] = True
    bin_of = np.repeat(np.arange(n_bins), np.diff(indptr))
    dense[indices, rows[bin_of], cols[bin_of]] = data
    return dense, present, positions


def _block(a: np.ndarray, k: int, how=np.sum) -> np.ndarray:
    h, w = a.shape[-2] // k * k, a.shape[-1] // k * k
    a = a[..., :h, :w]
    return how(a.reshape(*a.shape[:-2], h // k, k, w // k, k), axis=(-3, -1))


def _capture_px(sample) -> list[float]:
    return sample.metadata["capture_bbox_px"]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_layout_and_metadata(sample):
    meta = sample.metadata
    assert load_synthetic(sample.root) == sample
    assert sample.slide.is_file() and sample.truth.is_dir()
    assert meta["seed"] == 3 and meta["mpp"] == 0.5 and meta["shape_px"] == [800, 1120]
    assert len(sample.genes) == N_GENES == len(set(sample.genes))
    categories = {g["category"] for g in meta["genes"]}
    assert categories == {"marker", "smooth", "noise", "housekeeping"}
    assert {"ERBB2", "CD3E", "COL1A1", "KRT5", "ADIPOQ", "ACTB"} <= set(sample.genes)
    assert all(re.fullmatch(r"[A-Z0-9]+", g) for g in sample.genes)
    assert set(meta["cell_types"]) == {
        "tumour",
        "lymphocyte",
        "fibroblast",
        "epithelial",
        "adipocyte",
    }
    y0, x0, y1, x1 = meta["capture_bbox_um"]
    assert (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0 and y1 - y0 <= 6500
    for b in (2, 8, 16):
        assert (sample.outs / "binned_outputs" / f"square_{b:03d}um").is_dir()


def test_ome_tiff_pyramid(sample):
    with tifffile.TiffFile(sample.slide) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(800, 1120, 3), (400, 560, 3)]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression in (tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.ADOBE_DEFLATE)
        pixels = re.search(r"<Pixels [^>]*>", tif.ome_metadata).group(0)
    assert 'PhysicalSizeX="0.5"' in pixels and 'PhysicalSizeY="0.5"' in pixels
    assert 'PhysicalSizeXUnit="µm"' in pixels
    rgb = _level0(sample)
    corner = rgb[:40, :40].reshape(-1, 3).mean(axis=0)
    assert corner.min() > 225  # near-white background around the tissue
    centre = rgb[350:450, 500:620].reshape(-1, 3).mean(axis=0)
    assert centre[1] < corner[1] - 40  # stained tissue in the middle (green absorbed)


def test_same_seed_any_tiling_is_identical(sample, twin):
    assert np.array_equal(_level0(sample), _level0(twin))
    for b in (2, 16):
        a, pa, _ = _dense_counts(sample, b)
        t, pt, _ = _dense_counts(twin, b)
        assert np.array_equal(pa, pt) and np.array_equal(a, t)
    za, zb = zarr.open_group(sample.truth, mode="r"), zarr.open_group(twin.truth, mode="r")
    assert np.array_equal(za["abundance"][:], zb["abundance"][:])


def test_region_render_independent_of_block(sample):
    world = syn._make_world(3, 0.5, SIZE_UM)
    big = syn._render_rgb(world, 200, 300, 300, 400)
    small = syn._render_rgb(world, 333, 517, 77, 91)  # odd offsets, cells cut at both borders
    assert np.array_equal(big[133:210, 217:308], small)
    other = syn._render_rgb(syn._make_world(4, 0.5, SIZE_UM), 200, 300, 300, 400)
    assert np.abs(big.astype(int) - other).mean() > 5  # another seed: another tissue


def test_h5_matrix_layout(sample):
    folder = sample.outs / "binned_outputs" / "square_008um"
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        m = f["matrix"]
        n_genes, n_bins = m["shape"][:]
        assert n_genes == N_GENES and len(m["barcodes"]) == n_bins
        assert len(m["indptr"]) == n_bins + 1 and m["indptr"][-1] == len(m["data"]) == len(
            m["indices"]
        )
        assert m["data"].dtype.kind == "i" and m["data"][:].min() > 0
        assert m["indices"][:].max() < n_genes
        features = m["features"]
        assert features["name"][:].astype(str).tolist() == list(sample.genes)
        assert set(features["feature_type"][:].astype(str)) == {"Gene Expression"}
        assert len(features["id"]) == len(features["genome"]) == n_genes
        barcodes = m["barcodes"][:].astype(str)
    assert all(re.fullmatch(r"s_008um_\d{5}_\d{5}-1", b) for b in barcodes[:50])
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet")
    assert positions.barcode[positions.in_tissue == 1].tolist() == barcodes.tolist()


def test_positions_scalefactors_images(sample):
    y0, x0, y1, x1 = sample.metadata["capture_bbox_um"]
    for b in (2, 8, 16):
        spatial = sample.outs / "binned_outputs" / f"square_{b:03d}um" / "spatial"
        pos = pd.read_parquet(spatial / "tissue_positions.parquet")
        assert list(pos.columns) == [
            "barcode",
            "in_tissue",
            "array_row",
            "array_col",
            "pxl_row_in_fullres",
            "pxl_col_in_fullres",
        ]
        assert pos.pxl_row_in_fullres.dtype == np.float64 and pos.in_tissue.isin([0, 1]).all()
        assert len(pos) == round((y1 - y0) / b) * round((x1 - x0) / b)
        assert 0 < pos.in_tissue.mean() < 1
        row = pos.iloc[len(pos) // 2]
        assert row.pxl_row_in_fullres == pytest.approx((y0 + (row.array_row + 0.5) * b) / 0.5)
        assert row.pxl_col_in_fullres == pytest.approx((x0 + (row.array_col + 0.5) * b) / 0.5)
        scale = json.loads((spatial / "scalefactors_json.json").read_text())
        assert scale["microns_per_pixel"] == 0.5 and scale["bin_size_um"] == b
        assert scale["spot_diameter_fullres"] == pytest.approx(b / 0.5)
        hires = Image.open(spatial / "tissue_hires_image.png")
        lowres = Image.open(spatial / "tissue_lowres_image.png")
        assert hires.size == (1120, 800) and scale["tissue_hires_scalef"] == 1.0
        assert max(lowres.size) == 600 and scale["tissue_lowres_scalef"] == pytest.approx(
            600 / 1120
        )


def test_bins_are_additive(sample):
    fine, fine_present, _ = _dense_counts(sample, 2)
    for b in (8, 16):
        coarse, present, _ = _dense_counts(sample, b)
        k = b // 2
        summed = _block(fine, k)
        full = _block(fine_present, k) == k * k  # all fine bins in the filtered matrix
        check = present & full
        assert check.sum() > 50
        assert np.array_equal(coarse[:, check], summed[:, check])


def test_counts_match_truth_poisson(sample):
    counts, present, _ = _dense_counts(sample, 8)
    truth = truth_density(sample, bbox_yx=_capture_px(sample), grid_um=8.0)
    assert truth.shape == (N_GENES + 1, *present.shape)
    np.testing.assert_allclose(truth[-1], truth[:-1].sum(axis=0), rtol=1e-4)
    lam, obs = truth[:-1][:, present], counts[:, present]
    for g in np.nonzero(lam.sum(axis=1) > 200)[0]:
        assert abs(obs[g].sum() - lam[g].sum()) < 5 * np.sqrt(lam[g].sum()), sample.genes[g]
    z = (obs - lam) / np.sqrt(lam)
    assert abs(z.mean()) < 0.05 and 0.85 < z.var() < 1.15


def test_expression_scale_like_visium_hd(sample):
    _, present8, _ = _dense_counts(sample, 8)
    total8 = truth_density(sample, bbox_yx=_capture_px(sample), grid_um=8.0)[-1]
    assert 20 < np.median(total8[present8]) < 250
    fine, present2, _ = _dense_counts(sample, 2)
    totals2 = fine.sum(axis=0)[present2]
    assert 0.5 < totals2.mean() < 10 and np.percentile(totals2, 99) <= 25
    corner = truth_density(sample, bbox_yx=(0, 0, 32, 32), grid_um=8.0)[-1]  # background
    assert 0 < corner.max() < 2


def test_markers_follow_their_cell_type(sample):
    counts, present, _ = _dense_counts(sample, 16)
    group = zarr.open_group(sample.truth, mode="r")
    y0, x0, y1, x1 = (round(v / 2) for v in sample.metadata["capture_bbox_um"])
    abundance = _block(group["abundance"][:, y0:y1, x0:x1].astype(np.float32), 8, np.mean)
    for gene, kind in (("ERBB2", 0), ("CD3E", 1), ("COL1A1", 2), ("KRT5", 3)):
        g = sample.genes.index(gene)
        r = _pearson(counts[g][present], abundance[kind][present])
        assert r > 0.5, (gene, r)


def _image_features(sample, box) -> np.ndarray:
    """Per 16 µm bin of the capture area: mean, sd, dark and white fractions of the RGB image."""
    rgb = _level0(sample)[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])].astype(np.float32)
    channels = np.moveaxis(rgb, -1, 0)
    dark, white = (channels[1:2] < 110).astype(np.float32), (channels[1:2] > 215).astype(np.float32)
    parts = [
        _block(channels, 32, np.mean),
        _block(channels, 32, np.std),
        _block(dark, 32, np.mean),
        _block(white, 32, np.mean),
    ]
    return np.concatenate(parts)


def test_noise_genes_unrelated_to_image(sample):
    """Normalised expression (log1p(1e4 gene / total), as in the design) predicted from simple
    image features by least squares: markers well, noise genes at chance level only."""
    box = _capture_px(sample)
    truth = truth_density(sample, bbox_yx=box, grid_um=16.0)
    normalised = np.log1p(1e4 * truth[:-1] / truth[-1])
    _, present, _ = _dense_counts(sample, 16)
    x = np.stack([f[present] for f in _image_features(sample, box)], axis=1)
    x = np.c_[(x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9), np.ones(len(x))]

    def fit_r(g: int) -> float:
        y = normalised[g][present]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return _pearson(x @ coef, y)

    meta = sample.metadata["genes"]
    noise = [fit_r(g) for g, m in enumerate(meta) if m["category"] == "noise"]
    tumour = [
        fit_r(g)
        for g, m in enumerate(meta)
        if m["category"] == "marker" and m["cell_type"] == "tumour"
    ]
    assert np.mean(noise) < 0.4 and np.mean(tumour) > 0.8, (noise, tumour)


def test_noise_genes_are_a_share_of_the_rest(sample):
    """By construction: noise gene = fixed share × (all non-noise genes) × its noise field."""
    truth = truth_density(sample, bbox_yx=(200, 300, 328, 460), grid_um=2.0)
    meta = sample.metadata["genes"]
    noise = np.array([m["category"] == "noise" for m in meta])
    rest = truth[:-1][~noise].sum(axis=0)
    fields = zarr.open_group(sample.truth, mode="r")["fields"]
    names = list(zarr.open_group(sample.truth, mode="r").attrs["field_names"])
    for g in np.nonzero(noise)[0]:
        field = fields[names.index(meta[g]["field"]), 50:82, 75:115].astype(np.float32)
        ratio = truth[g] / (rest * field)
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=2e-3)


def test_truth_density_is_additive_and_exact(sample):
    box = (8, 16, 8 + 4 * 32, 16 + 5 * 32)  # 64 × 80 µm, not on the 16 µm grid
    fine = truth_density(sample, bbox_yx=box, genes=["ERBB2", "ACTB"], grid_um=2.0)
    coarse = truth_density(sample, bbox_yx=box, genes=["ERBB2", "ACTB"], grid_um=16.0)
    assert fine.shape == (3, 32, 40) and coarse.shape == (3, 4, 5)
    np.testing.assert_allclose(_block(fine, 8), coarse, rtol=1e-4)
    odd = truth_density(sample, bbox_yx=(5, 7, 45, 60), grid_um=8.0)  # partial cells at the end
    whole = truth_density(sample, bbox_yx=(5, 7, 45, 60), grid_um=1000.0)
    np.testing.assert_allclose(odd.sum(axis=(1, 2)), whole[:, 0, 0], rtol=1e-4)
    with pytest.raises(StmapInputError, match="NOPE"):
        truth_density(sample, genes=["NOPE"])


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(StmapInputError, match="--overwrite") as info:
        write_synthetic(tmp_path, size_um=(64.0, 64.0))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    for bad in (
        {"bin_sizes_um": (3.0,)},
        {"bin_sizes_um": (8.0, 12.0)},
        {"tile_px": 100},
        {"n_genes": 3},
    ):
        with pytest.raises(StmapInputError):
            write_synthetic(tmp_path / "new", size_um=(64.0, 64.0), **bad)
    with pytest.raises(StmapInputError, match="synthetic.json"):
        load_synthetic(tmp_path)


def test_overwrite_and_small_sample(tmp_path):
    out = tmp_path / "s"
    first = write_synthetic(out, size_um=(96.0, 64.0), n_genes=8, bin_sizes_um=(8.0,), seed=1)
    (out / "mine.txt").write_text("kept")
    again = write_synthetic(
        out, size_um=(96.0, 64.0), n_genes=8, bin_sizes_um=(8.0,), seed=2, overwrite=True
    )
    assert (out / "mine.txt").read_text() == "kept"
    assert again.seed == 2 and first.genes == again.genes and again.bin_sizes_um == (8.0,)
    assert not (out / "outs" / "binned_outputs" / "square_002um").exists()
    assert isinstance(again.root, Path)
