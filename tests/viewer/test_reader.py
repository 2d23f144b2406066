"""napari glue: the npe2 reader, layer tuples (aligned in µm) and the sample data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_stmap._layers import grid_affine, slide_layer, spots_layer
from napari_stmap._reader import napari_get_reader
from napari_stmap.core.io.slide import open_slide
from napari_stmap.core.io.spots import read_visium_hd


@pytest.mark.parametrize("name", ["notes.txt", "table.csv", "missing.svs", "data.npy"])
def test_reader_returns_none_on_foreign_files(tmp_path, name):
    path = tmp_path / name
    if name != "missing.svs":
        path.write_bytes(b"\x00not ours")
    assert napari_get_reader(str(path)) is None


def test_reader_returns_none_on_foreign_folder_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) is None


def test_reader_h5ad_without_spatial_is_not_ours(tmp_path):
    import anndata as ad

    path = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.ones((2, 2), np.float32)).write_h5ad(path)
    assert napari_get_reader(str(path)) is None


def test_slide_layer_in_um(small_sample):
    reader = napari_get_reader(str(small_sample.slide))
    ((data, kwargs, kind),) = reader(str(small_sample.slide))
    assert kind == "image" and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((small_sample.mpp, small_sample.mpp))
    slide = open_slide(small_sample.slide)
    assert kwargs["multiscale"] == (slide.n_levels > 1)
    level0 = data[0] if kwargs["multiscale"] else data
    assert level0.shape[:2] == slide.shape_yx


def test_hd_folder_layers_align_bins_with_slide(small_sample):
    reader = napari_get_reader(str(small_sample.outs))
    layers = reader(str(small_sample.outs))
    kinds = [kind for _, _, kind in layers]
    assert kinds[-1] in ("image", "points")
    assert any("hires" in kw["name"] for _, kw, _ in layers)
    bins = read_visium_hd(small_sample.outs, bin_um=8)
    points, _, kind = spots_layer(bins, name="x", as_raster=False)
    assert kind == "points"
    np.testing.assert_allclose(points, bins.centers_yx * bins.mpp)
    raster, kwargs, kind = spots_layer(bins, name="x", as_raster=True)
    assert kind == "image"
    # every bin's raster index maps (through the affine) onto its centre in µm
    affine = kwargs["affine"]
    rc = bins.array_rc - bins.array_rc.min(axis=0)
    world = (affine[:2, :2] @ rc.T).T + affine[:2, 2]
    np.testing.assert_allclose(world, bins.centers_yx * bins.mpp, atol=1e-6 * bins.mpp + 1e-6)
    total = np.asarray(bins.counts.sum(axis=1)).ravel()
    np.testing.assert_allclose(raster[rc[:, 0], rc[:, 1]], total)


def test_grid_affine_recovers_rotation():
    rng = np.random.default_rng(0)
    rc = rng.integers(0, 100, (500, 2)).astype(float)
    theta = np.deg2rad(3.0)
    rot = 16.0 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    yx = rc @ rot.T + [120.5, -7.25]
    fit = grid_affine(rc, yx)
    np.testing.assert_allclose(fit[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(fit[:, 2], [120.5, -7.25], atol=1e-9)


def test_h5ad_points_are_xy_swapped(tmp_path):
    import anndata as ad

    xy = np.array([[100.0, 40.0], [300.0, 250.0], [510.0, 90.0]])
    adata = ad.AnnData(X=np.arange(6, dtype=np.float32).reshape(3, 2) + 1)
    adata.obs_names = ["a", "b", "c"]
    adata.var_names = ["G1", "G2"]
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {
        "lib": {
            "scalefactors": {
                "spot_diameter_fullres": 130.0,
                "microns_per_pixel": 0.5,
                "tissue_hires_scalef": 1.0,
            },
            "images": {},
        }
    }
    path = tmp_path / "s.h5ad"
    adata.write_h5ad(path)
    layers = napari_get_reader(str(path))(str(path))
    data, kwargs, kind = layers[-1]
    assert kind == "points"
    np.testing.assert_allclose(data, xy[:, ::-1] * 0.5)
    assert kwargs["size"] == pytest.approx(130.0 * 0.5, rel=0.2)


def test_shared_her2st_layers(shared_data):
    c2 = shared_data / "her2st" / "C2"
    ((levels, skw, _),) = napari_get_reader(str(c2 / "he.ome.tif"))(str(c2 / "he.ome.tif"))
    assert len(levels) == 5 and skw["scale"][0] == pytest.approx(0.687, abs=1e-3)
    data, kwargs, kind = napari_get_reader(str(c2 / "spots.h5ad"))(str(c2 / "spots.h5ad"))[-1]
    assert kind == "points"
    import anndata as ad

    xy = ad.read_h5ad(c2 / "spots.h5ad").obsm["spatial"]
    np.testing.assert_allclose(data, np.asarray(xy, float)[:, ::-1] * 0.687, rtol=2e-3)
    assert kwargs["size"] == pytest.approx(100.0, rel=0.01)  # 100 µm spots, world in µm
    height, width = levels[0].shape[:2]
    assert (data[:, 0] / 0.687 < height).all() and (data[:, 1] / 0.687 < width).all()


def test_shared_spaceranger_folders_open(shared_data):
    for sub in ["visium_squidpy", "visium_cytassist", "visium_hd_seurat", "visium_hd_visiumio"]:
        path = shared_data / "formats" / sub
        reader = napari_get_reader(str(path))
        assert reader is not None, sub
        layers = reader(str(path))
        assert layers, sub


@pytest.mark.gui
def test_viewer_opens_sample_and_files(make_napari_viewer, small_sample):
    viewer = make_napari_viewer()
    viewer.open(str(small_sample.slide), plugin="napari-stmap")
    viewer.open(str(small_sample.outs), plugin="napari-stmap")
    slide = viewer.layers[0]
    assert slide.rgb
    assert tuple(slide.scale) == pytest.approx((small_sample.mpp, small_sample.mpp))
    bins = viewer.layers[-1]
    # bins lie on the slide: their world extent is inside the slide's (µm)
    s_ext, b_ext = slide.extent.world, bins.extent.world
    assert (b_ext[0] >= s_ext[0] - 20).all() and (b_ext[1] <= s_ext[1] + 20).all()


@pytest.mark.gui
def test_sample_data_contribution(make_napari_viewer, monkeypatch, small_sample):
    import napari_stmap._sample_data as sd

    monkeypatch.setattr(sd, "ensure_sample", lambda progress=None: small_sample)
    viewer = make_napari_viewer()
    viewer.open_sample("napari-stmap", "synthetic")
    assert len(viewer.layers) == 2
    assert viewer.layers[0].rgb and "8 µm" in viewer.layers[1].name


def test_slide_layer_tuple_for_single_level(tmp_path):
    path = tmp_path / "small.png"
    from PIL import Image

    Image.fromarray(np.full((50, 60, 3), 200, np.uint8)).save(path)
    data, kwargs, _ = slide_layer(open_slide(path, mpp=2.0))
    assert kwargs["scale"] == (2.0, 2.0)
    assert np.asarray(data if not isinstance(data, list) else data[0]).shape == (50, 60, 3)


def test_parquet_positions_roundtrip_sanity(small_sample):
    pos = pd.read_parquet(
        small_sample.outs
        / "binned_outputs"
        / "square_008um"
        / "spatial"
        / "tissue_positions.parquet"
    )
    bins = read_visium_hd(small_sample.outs, bin_um=8)
    row = pos.set_index("barcode").loc[bins.barcodes[0]]
    np.testing.assert_allclose(bins.centers_yx[0], [row.pxl_row_in_fullres, row.pxl_col_in_fullres])
    assert tifffile.TiffFile(small_sample.slide).is_ome


def test_spots_layer_records_the_folder_opened(small_sample):
    """A Visium HD outs/ opened with File > Open Folder: the docks read that folder (all sizes)."""
    from napari_stmap._reader import napari_get_reader

    layers = napari_get_reader(str(small_sample.outs))(str(small_sample.outs))
    meta = layers[-1][1]["metadata"]["stmap"]
    assert meta["kind"] == "spots" and meta["source"] == str(small_sample.outs)
