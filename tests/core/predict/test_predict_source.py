"""PredictionSource: a dense store and a bin prediction answer through one interface.

The same regions give the same sums through the protocol as through the direct calls the
docks and ``stmap aggregate`` made before (``ensure_region`` + ``aggregate`` +
``combine_parts`` for a store; ``BinPrediction.region_sums`` for bins).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

GENES = 5


@pytest.fixture(scope="module")
def dense(small_sample, slide, tmp_path_factory):
    """A tiny PixNet's float32 store over the whole (small) slide, every tile predicted."""
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import Predictor

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:GENES])).eval()
    path = tmp_path_factory.mktemp("source") / "s.zarr"
    pred = Predictor(slide, model, path, tile_px=128, dtype="float32", tissue=False)
    pred.request()
    pred.wait(300)
    yield pred
    pred.close()


@pytest.fixture(scope="module")
def magnet(small_sample):
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    model = create_model("magnet_tiny", genes=list(small_sample.genes[:GENES])).eval()
    model.metadata = {"training": {"spot_area_um2": 256.0}}  # 16 µm bins
    return model


@pytest.fixture(scope="module")
def bins(magnet, slide):
    from napari_stmap.core.predict import predict_bin_region

    return predict_bin_region(magnet, slide, (40.0, 60.0, 232.0, 252.0))  # 6 × 6 bins


def _regions():
    from napari_stmap.core.geometry import Disk, Rectangle, Region, Square

    ring = Region(
        "ring", [(Rectangle(60.0, 80.0, 200.0, 220.0), 1.0), (Disk((130, 150), 50), -1.0)]
    )
    two = Region("two", [(Square((100.0, 100.0), 30.0), 1.0), (Disk((180.0, 200.0), 24.0), 1.0)])
    one = Region("one", [(Square((150.0, 120.0), 17.0), 1.0)])
    return [ring, two, one]


def test_both_sources_implement_the_protocol(dense, bins, magnet, slide):
    from napari_stmap.core.predict import (
        BinSource,
        PredictionSource,
        StoreSource,
        as_source,
    )

    store_src, bin_src = as_source(dense), as_source(bins, model=magnet, slide=slide)
    assert isinstance(store_src, StoreSource) and isinstance(bin_src, BinSource)
    for src in (store_src, bin_src, as_source(dense.store), as_source(dense.store.path)):
        assert isinstance(src, PredictionSource)
        assert src.output_names == [*src.genes, "total"] and len(src.genes) == GENES
    assert as_source(store_src) is store_src
    assert BinSource(model=magnet).output_names == bin_src.output_names  # genes before bins


def test_store_region_sums_equal_the_direct_calls(dense):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.predict import StoreSource, combine_parts, ensure_region, region_parts

    regions = _regions()
    fps, signs, groups = region_parts(regions)
    boxes = np.array([f.bbox_yx() for f in fps])
    bbox = (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))
    dense_map, grid = ensure_region(dense, bbox)
    want = combine_parts(aggregate(dense_map, grid, fps), signs, groups, len(regions))
    steps = []
    src = StoreSource(dense, block_px=64.0)  # several blocks
    got = src.region_sums(regions, progress=lambda d, t: steps.append((d, t)))
    assert got.shape == (3, GENES + 1) and np.all(np.isfinite(got)) and np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert steps[-1][0] == steps[-1][1] > 1
    per_fp = StoreSource(dense.store).region_sums(fps)  # footprints: one row each
    np.testing.assert_allclose(combine_parts(per_fp, signs, groups, 3), want, rtol=1e-9)
    assert src.region_sums([]).shape == (0, GENES + 1)


def test_store_background_counts_off_tissue(dense, tmp_path, slide):
    from napari_stmap.core.geometry import Square
    from napari_stmap.core.predict import Predictor, StoreSource
    from napari_stmap.core.store import SKIPPED

    with Predictor(slide, dense.model, tmp_path / "t.zarr", tile_px=128, dtype="float32") as p:
        p.request()
        p.wait(300)
        skipped = np.argwhere(p.store.done == SKIPPED)
        if not len(skipped):
            pytest.skip("the sample has tissue in every tile")
        cy, cx = p.spec.tile_center_level0(tuple(int(v) for v in skipped[0]))
        fp = [Square((cy, cx), 8.0)]
        assert np.isnan(StoreSource(p).region_sums(fp)).all()
        assert (StoreSource(p, background=0.0).region_sums(fp) == 0).all()


def test_store_gene_raster_is_the_gene_view(dense):
    from napari_stmap.core.predict import StoreSource, gene_view, view_grid

    src, gene = StoreSource(dense), dense.store.genes[1]
    full, grid = src.gene_raster(gene)
    want = np.asarray(gene_view(dense, gene))
    np.testing.assert_allclose(full, want, rtol=1e-6)
    assert grid == view_grid(dense) and full.dtype == np.float32
    box = (50.0, 70.0, 150.0, 210.0)
    part, pgrid = src.gene_raster(gene, mode="absolute", bbox_yx=box, level=1)
    rs, cs = view_grid(dense, 1).crop_slices(box)
    np.testing.assert_allclose(
        part, np.asarray(gene_view(dense, gene, mode="absolute", level=1))[rs, cs]
    )
    assert pgrid == view_grid(dense, 1).crop(box)


def test_store_unit_predictions_equal_the_direct_calls(dense, small_sample, slide):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.measured import load_measured, scale_key
    from napari_stmap.core.predict import StoreSource, ensure_region, spot_footprints

    meas = load_measured(small_sample.outs, scales_um=[8.0, 16.0, 55.0], slide=slide)
    units = {scale_key(b): meas.units(b) for b in (8.0, 16.0, 55.0)}

    def summed(fps):  # what the Compare dock computed
        boxes = np.array([f.bbox_yx() for f in fps])
        bbox = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
        d, grid = ensure_region(dense, bbox)
        return aggregate(d, grid, fps)

    base = summed(spot_footprints(meas.spots))
    got = StoreSource(dense).unit_predictions(meas, units)
    for key, u in units.items():
        want = np.asarray(u.members @ base) if u.members is not None else summed(spot_footprints(u))
        assert got[key].shape == (u.n, GENES + 1)
        np.testing.assert_allclose(got[key], want, rtol=1e-6, err_msg=key)


def test_bin_region_sums_equal_the_prediction(bins, magnet):
    from napari_stmap.core.predict import BinSource, combine_parts, region_parts

    regions = _regions()
    fps, signs, groups = region_parts(regions)
    want = combine_parts(bins.region_sums(fps), signs, groups, len(regions))
    got = BinSource(bins).region_sums(regions)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got).all()
    assert np.isnan(BinSource(model=magnet).region_sums(fps)).all()  # nothing predicted yet


def test_bin_gene_raster_crops_and_pools(bins):
    from napari_stmap.core.predict import BinSource

    src, gene = BinSource(bins), bins.genes[2]
    full, grid = src.gene_raster(gene)
    want, wgrid = bins.gene_raster(gene, "normalised")
    np.testing.assert_array_equal(full, want)
    assert grid == wgrid and full.shape == (6, 6)
    assert grid.origin_yx == (32.0, 64.0) and grid.pixel_px == 32.0  # lattice from (0, 0)
    box = (64.0, 64.0, 128.0, 128.0)  # rows 1-2, columns 0-1
    part, pgrid = src.gene_raster(gene, mode="absolute", bbox_yx=box)
    np.testing.assert_allclose(part, bins.gene_raster(gene, "absolute")[0][1:3, 0:2], rtol=1e-6)
    assert pgrid.shape_hw == (2, 2) and pgrid.origin_yx == (64.0, 64.0)
    coarse, cgrid = src.gene_raster(gene, level=1)  # 2 × 2 bins summed, then normalised
    raster, _ = bins.raster()
    g = bins.output_names.index(gene)
    sums = raster[[g, -1]].reshape(2, 3, 2, 3, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(coarse, np.log1p(1e4 * sums[0] / sums[1]), rtol=1e-5)
    assert cgrid.pixel_px == 2 * grid.pixel_px and coarse.shape == (3, 3)


def test_bin_unit_predictions_are_the_evaluation_predictions(bins, magnet, small_sample, slide):
    from napari_stmap.core.measured import load_measured, scale_key
    from napari_stmap.core.predict import BinSource, predict_units

    meas = load_measured(small_sample.outs, scales_um=[16.0], slide=slide)
    units = {scale_key(16.0): meas.units(16.0)}
    got = BinSource(bins, model=magnet, slide=slide).unit_predictions(meas, units)
    want = predict_units(magnet, slide, meas, units, device="cpu", tile_px=None, batch_size=4)
    for key in units:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    with pytest.raises(ValueError, match="model"):
        BinSource(bins).unit_predictions(meas, units)
