"""Per-cell sums: additive, the same whatever the tiling or the label image's downsample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_stmap.core.cells import (
    ArrayLabels,
    collect,
    iter_cells,
    label_factor,
    open_labels,
)
from napari_stmap.core.cells.measure import label_runs
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import Rectangle, Region

H, W = 600, 800  # the small sample, level-0 px


def _table(labels, source, **kw):
    return collect(iter_cells(labels, source, **kw), source.output_names if source else ())


def _by_id(table):
    order = np.argsort(table.ids)
    return table.ids[order], table.counts[order], table.area_px[order], table.centroid_yx[order]


def _voronoi(box, n, seed=0):
    """Labels (H, W) whose cells tile the level-0 px box exactly (nearest of n random seeds)."""
    y0, x0, y1, x1 = box
    rng = np.random.default_rng(seed)
    seeds = rng.uniform((y0, x0), (y1, x1), size=(n, 2))
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    _, nearest = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], axis=1))
    lab = np.zeros((H, W), dtype=np.int32)
    lab[y0:y1, x0:x1] = nearest.reshape(yy.shape) + 1
    return lab


def test_label_runs_cover_every_pixel():
    lab = np.array([[0, 1, 1, 2], [3, 3, 0, 0], [4, 4, 4, 4]])
    value, row, c0, c1 = label_runs(lab)
    rebuilt = np.zeros_like(lab)
    for v, r, a, b in zip(value, row, c0, c1, strict=True):
        rebuilt[r, a:b] = v
    np.testing.assert_array_equal(rebuilt, lab)
    assert len(value) == 4


def test_cells_tiling_a_region_sum_to_the_region(source):
    box = (101, 57, 433, 611)  # not aligned to map pixels (4 level-0 px) nor to tiles
    lab = _voronoi(box, 300)
    cells = _table(ArrayLabels(lab, 1, kind="labels", name="voronoi"), source, tile_px=96)
    assert cells.n == 300
    region = Region("box", [(Rectangle(*box), 1.0)])
    want = source.region_sums([region])[0]
    got = cells.counts.sum(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert cells.area_px.sum() == pytest.approx((box[2] - box[0]) * (box[3] - box[1]))


def test_tiling_and_halo_do_not_change_cells(source, nuclei):
    labels = ArrayLabels(nuclei, 1, kind="segment", name="nuclei")
    one = _by_id(_table(labels, source, tile_px=4096, halo_px=64))
    small = _by_id(_table(labels, source, tile_px=50, halo_px=6))  # many cells > halo
    np.testing.assert_array_equal(one[0], small[0])
    assert len(one[0]) == len(np.unique(nuclei)) - 1
    for a, b in zip(one[1:], small[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_downsampled_labels_measure_the_same_cells(source, nuclei, tmp_path):
    import tifffile

    full = ArrayLabels(nuclei, 1, kind="labels", name="full")
    ref_ids, ref_counts, ref_area, ref_c = _by_id(_table(full, source))
    for f in (2, 4):
        small = nuclei[f // 2 :: f, f // 2 :: f]  # nearest-neighbour downsample, as tools save
        path = tmp_path / f"labels_{f}.tif"
        tifffile.imwrite(path, small)
        labels = open_labels(path, (H, W))
        assert labels.factor == f
        ids, counts, area, cen = _by_id(_table(labels, source))
        common, ia, ib = np.intersect1d(ref_ids, ids, return_indices=True)
        assert len(common) >= 0.9 * len(ref_ids)  # tiny nuclei may vanish at 1/4
        rel = np.abs(counts[ib, -1] - ref_counts[ia, -1]) / ref_counts[ia, -1]
        assert np.median(rel) < 0.05 * f
        assert abs(counts[:, -1].sum() / ref_counts[:, -1].sum() - 1) < 0.03 * f
        assert np.median(np.linalg.norm(cen[ib] - ref_c[ia], axis=1)) < f
        # the same cells drawn at full resolution (each label px -> f × f) measure exactly alike
        up = np.kron(small, np.ones((f, f), dtype=small.dtype))[:H, :W]
        exact = _by_id(_table(ArrayLabels(up, 1, kind="labels", name="up"), source))
        clip = small[: -(-H // f), : -(-W // f)]
        on = _by_id(_table(ArrayLabels(clip, f, kind="labels", name="small"), source))
        for a, b in zip(exact, on, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-6)


def test_label_factor_accepts_whole_downsamples_only():
    assert label_factor((600, 800), (600, 800)) == 1
    assert label_factor((300, 400), (600, 800)) == 2
    assert label_factor((150, 200), (601, 801)) == 4  # ceil or floor of slide / f
    with pytest.raises(StmapInputError) as err:
        label_factor((333, 401), (600, 800), name="seg.tif")
    msg = str(err.value)
    assert "\n" not in msg
    assert "333 × 401" in msg and "600 × 800" in msg and "300 × 400 (1/2)" in msg


def test_open_labels_refuses_wrong_size_and_type(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "wrong.tif", np.zeros((333, 401), np.uint16))
    with pytest.raises(StmapInputError, match="wrong.tif is 333 × 401 px .* slide is 600 × 800"):
        open_labels(tmp_path / "wrong.tif", (H, W))
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((600, 800), np.float32))
    with pytest.raises(StmapInputError, match="not integer ids"):
        open_labels(tmp_path / "float.tif", (H, W))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(StmapInputError, match="unsupported label image"):
        open_labels(tmp_path / "x.png", (H, W))


def test_geometry_only_without_a_prediction():
    lab = np.zeros((40, 50), dtype=np.int32)
    lab[5:9, 10:20] = 7  # 4 × 10 px
    lab[20:30, 30:35] = 3
    cells = collect(iter_cells(ArrayLabels(lab, 2, kind="labels", name="t"), None))
    ids, _, area, cen = cells.ids, cells.counts, cells.area_px, cells.centroid_yx
    order = np.argsort(ids)
    assert cells.counts is None
    np.testing.assert_array_equal(ids[order], [3, 7])
    np.testing.assert_allclose(area[order], [50 * 4, 40 * 4])  # level-0 px² at factor 2
    np.testing.assert_allclose(cen[order], [[50, 65], [14, 30]])  # level-0 px (y, x)
    # outlines trace pixel edges: the rectangle of cell 7 in level-0 px
    outer = cells.outlines[list(ids).index(7)][0][0]
    np.testing.assert_allclose(outer.min(0), [10, 20], atol=0.26)
    np.testing.assert_allclose(outer.max(0), [18, 40], atol=0.26)


def test_value_pyramid_direct_table_equals_sorted_lookup():
    from napari_stmap.core.cells import view

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 60, (64, 80)).astype(np.int32)
    labels[0, 0] = 999  # a label with no cell in the table
    ids = np.arange(1, 60)
    values = rng.random(59).astype(np.float32)
    direct = np.asarray(view.value_pyramid([labels], ids, values)[0])
    old, view.DIRECT_LUT_MAX_ID = view.DIRECT_LUT_MAX_ID, 0  # force the sorted lookup
    try:
        sorted_ = np.asarray(view.value_pyramid([labels], ids, values)[0])
    finally:
        view.DIRECT_LUT_MAX_ID = old
    np.testing.assert_array_equal(direct, sorted_)
    assert np.isnan(direct[labels == 0]).all() and np.isnan(direct[0, 0])
    assert direct[labels == 5][0] == values[4]
