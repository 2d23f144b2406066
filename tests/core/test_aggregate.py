"""Map + footprints -> sums: numpy and torch agree, gradients, bins, normalisation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp

from napari_stmap.core.aggregate import (
    BatchWeights,
    aggregate,
    aggregate_torch,
    batch_weights,
    sum_bins,
    to_torch_sparse,
)
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import (
    Disk,
    Ellipse,
    MapGrid,
    Polygon,
    Square,
    disks,
    squares,
    weight_matrix,
)
from napari_stmap.core.metrics import normalize_expression

MPP = 0.2634
PIX = 2.0 / MPP  # 2 µm map pixel, level-0 px


@pytest.fixture
def grid() -> MapGrid:
    return MapGrid(origin_yx=(5.5, 9.25), pixel_px=PIX, shape_hw=(40, 48))


@pytest.fixture
def map_chw(grid: MapGrid) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.gamma(1.5, 1.0, (5, *grid.shape_hw)).astype(np.float32)


def spots(grid: MapGrid) -> list:
    c = grid.from_map((20.3, 22.8))
    return [
        Disk(c, 9 * PIX),
        Square(c + 7, 4 * PIX),
        Ellipse(c - 11, (6 * PIX, 3 * PIX), 0.7),
        Polygon([(c[0], c[1]), (c[0] + 60, c[1] + 5), (c[0] + 10, c[1] + 80)]),
    ]


def test_import_does_not_pull_torch() -> None:
    import subprocess

    code = "import napari_stmap.core.aggregate, napari_stmap.core.metrics, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_aggregate_constant_map_gives_areas(grid: MapGrid) -> None:
    fps = spots(grid)
    ones = np.ones((2, *grid.shape_hw))
    got = aggregate(ones, grid, fps)
    areas = np.array([f.area_px() for f in fps]) / PIX**2
    assert got.shape == (4, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got[:, 0], areas, rtol=1e-9)
    np.testing.assert_array_equal(got[:, 0], got[:, 1])


def test_aggregate_footprints_or_matrix_and_additivity(grid: MapGrid, map_chw) -> None:
    fps = spots(grid)
    w = weight_matrix(fps, grid)
    by_fp, by_w = aggregate(map_chw, grid, fps), aggregate(map_chw, grid, w)
    np.testing.assert_array_equal(by_fp, by_w)
    dense_ref = w.toarray() @ map_chw.reshape(5, -1).T.astype(np.float64)
    np.testing.assert_allclose(by_w, dense_ref, rtol=1e-12)
    # 8 µm square == its four 4 µm quarters, on a random map at a sub-pixel offset
    side = 4.0 / MPP
    c = grid.from_map((17.37, 25.61))
    quarters = squares(c + side / 2 * np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]), side)
    whole = aggregate(map_chw, grid, [Square(c, 2 * side)])
    np.testing.assert_allclose(aggregate(map_chw, grid, quarters).sum(0), whole[0], rtol=1e-12)
    assert aggregate(map_chw, grid, fps[0]).shape == (1, 5)


def test_aggregate_nan_only_poisons_touching_spots(grid: MapGrid, map_chw) -> None:
    m = map_chw.astype(np.float64)
    m[2, 10, 10] = np.nan
    near = Disk(grid.from_map((10.5, 10.5)), 3 * PIX)
    far = Disk(grid.from_map((30.5, 30.5)), 3 * PIX)
    got = aggregate(m, grid, [near, far])
    assert np.isnan(got[0, 2]) and np.isfinite(got[0, [0, 1, 3, 4]]).all()
    assert np.isfinite(got[1]).all()


def test_aggregate_outside_and_dask(grid: MapGrid, map_chw) -> None:
    da = pytest.importorskip("dask.array")
    fps = [*spots(grid), Disk((-1e4, -1e4), 50.0)]
    lazy = da.from_array(map_chw, chunks=(5, 16, 16))
    got = aggregate(lazy, grid, fps)
    np.testing.assert_allclose(got, aggregate(map_chw, grid, fps), rtol=1e-12)
    np.testing.assert_array_equal(got[-1], 0.0)
    assert aggregate(map_chw, grid, [Disk((-1e4, -1e4), 5.0)]).shape == (1, 5)


def test_aggregate_bad_input(grid: MapGrid, map_chw) -> None:
    with pytest.raises(StmapInputError, match="does not match grid"):
        aggregate(map_chw[:, :10], grid, spots(grid))
    with pytest.raises(StmapInputError, match="columns"):
        aggregate(map_chw, grid, sp.csr_matrix((2, 7)))


# ------------------------------------------------------------------------------------ torch
def test_torch_matches_numpy_shared_spots(grid: MapGrid, map_chw) -> None:
    torch = pytest.importorskip("torch")
    w = weight_matrix(spots(grid), grid)
    ref = aggregate(map_chw, grid, w)
    t = torch.from_numpy(map_chw)
    out3 = aggregate_torch(t, to_torch_sparse(w))
    assert out3.shape == (4, 5) and out3.dtype == torch.float32
    np.testing.assert_allclose(out3.numpy(), ref, rtol=1e-5)
    batch = torch.stack([t, 2 * t, 0 * t])
    out4 = aggregate_torch(batch, w)  # scipy matrix accepted too
    assert out4.shape == (3, 4, 5)
    np.testing.assert_allclose(out4[1].numpy(), 2 * ref, rtol=1e-5)
    np.testing.assert_array_equal(out4[2].numpy(), 0.0)
    out64 = aggregate_torch(t.double(), to_torch_sparse(w, dtype=torch.float64))
    np.testing.assert_allclose(out64.numpy(), ref, rtol=1e-12)


def test_torch_per_item_spots(grid: MapGrid, map_chw) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    per_item = [
        weight_matrix(disks(grid.from_map(rng.uniform(0, 40, (n, 2))), 5 * PIX), grid)
        for n in (3, 0, 6)
    ]
    maps = rng.gamma(1.0, 1.0, (3, 5, *grid.shape_hw)).astype(np.float32)
    bw = batch_weights(per_item, grid.shape_hw)
    assert isinstance(bw, BatchWeights) and bw.counts == (3, 0, 6)
    assert bw.item_index.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2]
    out = aggregate_torch(torch.from_numpy(maps), bw)
    assert out.shape == (9, 5)
    ref = np.concatenate([aggregate(maps[b], grid, per_item[b]) for b in range(3)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(StmapInputError):
        aggregate_torch(torch.from_numpy(maps[:2]), bw)


def test_torch_gradient_is_the_coverage_map(grid: MapGrid, map_chw) -> None:
    torch = pytest.importorskip("torch")
    fps = spots(grid)
    w = weight_matrix(fps, grid)
    t = torch.from_numpy(map_chw).requires_grad_(True)
    out = aggregate_torch(t, to_torch_sparse(w))
    out[2].sum().backward()  # spot 2, all channels
    cov = w[2].toarray().reshape(grid.shape_hw)
    for c in range(5):
        np.testing.assert_allclose(t.grad[c].numpy(), cov, rtol=1e-6, atol=1e-7)
    # batched: d(sum of everything) / d map = column sums of W, for every item and channel
    tb = torch.from_numpy(np.stack([map_chw, map_chw])).requires_grad_(True)
    aggregate_torch(tb, w).sum().backward()
    colsum = np.asarray(w.sum(axis=0)).reshape(grid.shape_hw)
    np.testing.assert_allclose(tb.grad[1, 3].numpy(), colsum, rtol=1e-6, atol=1e-7)


def test_to_torch_sparse_roundtrip(grid: MapGrid) -> None:
    torch = pytest.importorskip("torch")
    w = weight_matrix(spots(grid), grid)
    t = to_torch_sparse(w, dtype=torch.float64)
    assert t.is_sparse and t.shape == w.shape
    np.testing.assert_array_equal(t.to_dense().numpy(), w.toarray())


# ------------------------------------------------------------------------------------- bins
def hd_bins(origin=(3.0, 7.0), n=16, bin_px=2.0 / MPP, genes=6, seed=2):
    """An n×n lattice of 2 µm bins with Poisson counts, row-major."""
    rng = np.random.default_rng(seed)
    iy, ix = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    index = np.stack([iy.ravel(), ix.ravel()], 1)
    centers = np.asarray(origin) + (index + 0.5) * bin_px
    counts = rng.poisson(0.7, (n * n, genes)).astype(float)
    return centers, counts, index, bin_px


def test_sum_bins_2um_to_8um() -> None:
    centers, counts, index, bin_px = hd_bins()
    new_c, summed, group = sum_bins(counts, centers, bin_px=bin_px, target_px=4 * bin_px)
    assert summed.shape == (16, 6) and group.shape == (256,)
    np.testing.assert_allclose(summed.sum(0), counts.sum(0))
    block = index // 4
    for g in range(16):
        members = np.flatnonzero(group == g)
        assert len(members) == 16 and len({tuple(b) for b in block[members]}) == 1
        np.testing.assert_allclose(summed[g], counts[members].sum(0))
        np.testing.assert_allclose(new_c[g], centers[members].mean(0))  # block centre
    # sparse in -> sparse out; integer lattice indices give the same groups
    s_c, s_sum, s_group = sum_bins(
        sp.csr_matrix(counts), centers, bin_px=bin_px, target_px=8 / MPP, index_yx=index
    )
    assert sp.issparse(s_sum)
    np.testing.assert_allclose(s_sum.toarray(), summed)
    np.testing.assert_array_equal(s_group, group)
    np.testing.assert_allclose(s_c, new_c)


def test_sum_bins_of_map_sums_equals_coarse_bins(map_chw) -> None:
    """Predicted 2 µm bins summed to 8 µm == predicted 8 µm bins (one map serves all scales)."""
    grid = MapGrid((0.0, 0.0), PIX, (40, 48))
    centers, _, _, bin_px = hd_bins(origin=(3.0, 7.0), n=16)
    fine = aggregate(map_chw, grid, squares(centers, bin_px))
    new_c, summed, _ = sum_bins(
        fine, centers, bin_px=bin_px, target_px=4 * bin_px, origin_yx=(3.0, 7.0)
    )
    coarse = aggregate(map_chw, grid, squares(new_c, 4 * bin_px))
    np.testing.assert_allclose(summed, coarse, rtol=1e-10)


def test_sum_bins_bad_factor() -> None:
    centers, counts, _, bin_px = hd_bins()
    with pytest.raises(StmapInputError, match="whole multiple"):
        sum_bins(counts, centers, bin_px=bin_px, target_px=2.5 * bin_px)
    with pytest.raises(StmapInputError, match="one row per bin"):
        sum_bins(counts[:5], centers, bin_px=bin_px, target_px=2 * bin_px)


# -------------------------------------------------------------------------- normalisation
def test_normalize_expression() -> None:
    genes = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    total = np.array([10.0, 0.0, 4.0])
    out = normalize_expression(genes, total)
    np.testing.assert_allclose(out[0], np.log1p(1e4 * np.array([0.1, 0.3])))
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[2], np.log1p(5e3))
    np.testing.assert_allclose(
        normalize_expression(sp.csr_matrix(genes), total, scale=1.0)[2], np.log1p(0.5)
    )
    with pytest.raises(StmapInputError):
        normalize_expression(genes, total[:2])


def test_normalisation_is_taken_after_summing() -> None:
    centers, counts, _, bin_px = hd_bins(genes=4)
    total = counts.sum(1) + 3.0
    _, summed, group = sum_bins(
        np.column_stack([counts, total]), centers, bin_px=bin_px, target_px=4 * bin_px
    )
    norm = normalize_expression(summed[:, :4], summed[:, 4])
    g = 5
    members = group == g
    expected = np.log1p(1e4 * counts[members].sum(0) / total[members].sum())
    np.testing.assert_allclose(norm[g], expected)
