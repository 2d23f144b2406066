"""Measured spots from SpatialData zarr stores (:func:`read_spots` on ``data.zarr``).

Stores come from spatialdata-io's readers on the real Space Ranger layouts in ../shared (skipped
without it) and, for CI, from the synthetic sample written with spatialdata's own models
(tests/spatialdata_samples.py). Spots read from a store must equal those the project's Space
Ranger reader gives for the same folder: centres within 1e-6 px, counts equal.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("spatialdata")

from napari_stmap.core.errors import StmapInputError  # noqa: E402
from napari_stmap.core.io.spots import (  # noqa: E402
    available_bin_sizes,
    detect_spots_layout,
    read_spots,
    read_visium,
    read_visium_hd,
    table_path,
)
from spatialdata_samples import synthetic_store  # noqa: E402, I001 (tests/ helper module)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def assert_same_spots(got, want, *, mpp_rel: float = 1e-9) -> None:
    np.testing.assert_allclose(got.centers_yx, want.centers_yx, rtol=0, atol=1e-6)
    assert (got.counts != want.counts).nnz == 0 and got.counts.shape == want.counts.shape
    assert list(got.genes) == list(want.genes) and list(got.barcodes) == list(want.barcodes)
    assert got.footprint == want.footprint and got.bin_um == want.bin_um
    assert got.mpp == pytest.approx(want.mpp, rel=mpp_rel)
    assert got.size_px == pytest.approx(want.size_px, rel=mpp_rel)
    np.testing.assert_array_equal(got.in_tissue, want.in_tissue)
    np.testing.assert_array_equal(got.array_rc, want.array_rc)


@pytest.fixture(scope="module")
def hd_store(small_sample, tmp_path_factory):
    return synthetic_store(small_sample, tmp_path_factory.mktemp("sd") / "sample.zarr")


# ------------------------------------------------------------------------- synthetic (CI)
def test_synthetic_store_equals_space_ranger_reader(small_sample, hd_store):
    assert detect_spots_layout(hd_store) == "spatialdata"
    assert available_bin_sizes(hd_store) == [2.0, 8.0, 16.0]
    for b in (2.0, 8.0, 16.0):
        assert_same_spots(
            read_spots(hd_store, bin_um=b), read_visium_hd(small_sample.outs, bin_um=b)
        )
    default = read_spots(hd_store)  # 8 µm when present, as for Space Ranger folders
    assert default.bin_um == 8.0
    one = read_spots(table_path(hd_store, "square_016um"))
    assert one.bin_um == 16.0 and available_bin_sizes(hd_store / "tables" / "square_016um") == [16]


@pytest.mark.parametrize("layout", ["fullres", "um", "xenium"])
def test_every_frame_gives_level0_px(small_sample, tmp_path, layout):
    """Shapes in µm, the H&E placed by a scale or an affine: centres land in level-0 px."""
    store = synthetic_store(small_sample, tmp_path / f"{layout}.zarr", layout=layout, bins=(8.0,))
    assert_same_spots(read_spots(store), read_visium_hd(small_sample.outs, bin_um=8), mpp_rel=1e-9)


def test_hires_image_checked_and_kept(hd_store, slide):
    spots = read_spots(hd_store)
    thumb = spots.images["hires"]
    scale = spots.scalefactors["tissue_hires_scalef"]
    assert thumb.shape[2] == 3 and thumb.dtype == np.uint8
    assert thumb.shape[0] / scale == pytest.approx(slide.shape_yx[0])
    spots.check_against_image(slide.shape_yx, mpp=slide.mpp)  # no error, no warning


def test_reading_writes_nothing(hd_store):
    before = _files(hd_store)
    read_spots(hd_store, bin_um=16)
    detect_spots_layout(hd_store)
    available_bin_sizes(hd_store)
    assert _files(hd_store) == before


def test_misplaced_store_warned_then_refused(small_sample, tmp_path, slide):
    """Shapes moved off the H&E by their transformation: a warning at read time (the store's own
    image), an error against the slide, as for Space Ranger folders."""
    from spatialdata import read_zarr
    from spatialdata.transformations import Translation, set_transformation

    from napari_stmap.core.errors import StmapInputWarning

    store = synthetic_store(small_sample, tmp_path / "a.zarr", layout="fullres", bins=(8.0,))
    sdata = read_zarr(store)
    away = Translation([5000.0, 5000.0], axes=("x", "y"))
    set_transformation(sdata.shapes["sample_square_008um"], away, "global")
    sdata.write(tmp_path / "moved.zarr")
    with pytest.warns(StmapInputWarning, match="fall outside the hires image"):
        spots = read_spots(tmp_path / "moved.zarr")
    with pytest.raises(StmapInputError, match="spots fall outside the slide"):
        spots.check_against_image(slide.shape_yx, mpp=slide.mpp)


def test_cells_become_pseudo_spots(small_sample, tmp_path):
    """A table of cells (circles of many radii) is summed into squares by centroid."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from shapely import points
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Scale

    bins = read_visium_hd(small_sample.outs, bin_um=2)
    rng = np.random.default_rng(0)
    xy_um = bins.centers_yx[:, ::-1] * small_sample.mpp + rng.uniform(-0.9, 0.9, (bins.n_spots, 2))
    radius = rng.uniform(2.0, 6.0, bins.n_spots)
    cells = gpd.GeoDataFrame(
        {"radius": radius}, geometry=points(xy_um), index=np.arange(bins.n_spots)
    )
    obs = pd.DataFrame(
        {"cell_id": np.arange(bins.n_spots), "region": pd.Categorical(["cells"] * bins.n_spots)},
        index=[f"cell{k}" for k in range(bins.n_spots)],
    )
    table = TableModel.parse(
        ad.AnnData(X=bins.counts.copy(), obs=obs, var=pd.DataFrame(index=bins.genes)),
        region="cells",
        region_key="region",
        instance_key="cell_id",
    )
    scale = Scale([1 / small_sample.mpp] * 2, axes=("y", "x"))  # µm -> slide px, no image
    shapes = ShapesModel.parse(cells, transformations={"global": scale})
    SpatialData(shapes={"cells": shapes}, tables={"table": table}).write(tmp_path / "x.zarr")
    with pytest.raises(StmapInputError, match="µm/px unknown"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_spots(tmp_path / "x.zarr")
    with pytest.warns(UserWarning, match="no H&E image"):
        spots = read_spots(tmp_path / "x.zarr", bin_um=20, mpp=small_sample.mpp)
    side = 20 / small_sample.mpp
    assert spots.footprint == "square" and spots.bin_um == 20 and spots.size_px == side
    assert spots.counts.sum() == bins.counts.sum()  # every cell counted once
    cell_yx = xy_um[:, ::-1] / small_sample.mpp
    k = int(np.argmax(np.asarray(spots.counts.sum(axis=1)).ravel()))
    lo = spots.centers_yx[k] - side / 2
    inside = np.all((cell_yx >= lo) & (cell_yx < lo + side), axis=1)
    np.testing.assert_array_equal(
        np.asarray(spots.counts[k].todense()).ravel(),
        np.asarray(bins.counts[inside].sum(axis=0)).ravel(),
    )


# ------------------------------------------------------------------------- refusals
def test_refusals_name_what_is_there(hd_store, small_sample, tmp_path):
    tables = "tables present: square_002um, square_008um, square_016um"
    with pytest.raises(StmapInputError, match=f"no table 'cells'; {tables}"):
        table_path(hd_store, "cells")
    with pytest.raises(
        StmapInputError, match=r"needs a SpatialData \.zarr store, but it is a zarr"
    ):
        table_path(small_sample.root / "truth.zarr", "x")
    with pytest.raises(StmapInputError, match="no 4 µm bins; bin tables present: 2, 8, 16 µm"):
        read_spots(hd_store, bin_um=4)
    from spatialdata import SpatialData, read_zarr

    sdata = read_zarr(hd_store)  # two tables that are no Visium HD bin sizes: name one
    bins = sdata.tables["square_008um"]
    two = tmp_path / "two.zarr"
    SpatialData(
        images=dict(sdata.images),
        shapes={"sample_square_008um": sdata.shapes["sample_square_008um"]},
        tables={"a": bins, "b": bins.copy()},
    ).write(two)
    with pytest.raises(StmapInputError, match=r"2 tables \(a, b\); pass --table NAME"):
        read_spots(two)
    assert read_spots(two / "tables" / "b").n_spots == read_spots(table_path(two, "a")).n_spots


def test_missing_extra_is_one_line(hd_store, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "spatialdata", None)
    with pytest.raises(StmapInputError, match=r'pip install "napari-stmap\[spatialdata\]"'):
        read_spots(hd_store)


# ------------------------------------------------------------------------- real layouts
def _spatialdata_io():
    pytest.importorskip("spatialdata_io")
    import spatialdata_io

    return spatialdata_io


def test_spatialdata_io_on_the_synthetic_sample(small_sample, tmp_path):
    """spatialdata-io's Visium HD reader on ``stmap synth`` output: the same bins, every size."""
    sdio = _spatialdata_io()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sdio.visium_hd(
            small_sample.outs, dataset_id="sample", load_segmentations_only=False
        )
        sdata.write(tmp_path / "sample.zarr")
    assert available_bin_sizes(tmp_path / "sample.zarr") == [2.0, 8.0, 16.0]
    for b in (2.0, 8.0, 16.0):
        got = read_spots(tmp_path / "sample.zarr", bin_um=b)
        assert_same_spots(got, read_visium_hd(small_sample.outs, bin_um=b))


def test_real_visium_store_equals_space_ranger_reader(shared_data, tmp_path):
    sdio = _spatialdata_io()
    folder = shared_data / "formats" / "visium_squidpy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdio.visium(folder, dataset_id="squidpy").write(tmp_path / "visium.zarr")
    before = _files(tmp_path / "visium.zarr")
    got = read_spots(tmp_path / "visium.zarr")
    assert _files(tmp_path / "visium.zarr") == before
    assert_same_spots(got, read_visium(folder))
    assert got.pitch_um == 100.0 and got.size_um == 55.0


def test_real_visium_hd_store_equals_space_ranger_reader(shared_data, tmp_path):
    """spatialdata-io's Visium HD reader on the Seurat test layout (8 µm bins).

    That layout lacks ``feature_slice.h5`` (spatialdata-io reads only its metadata: a stub is
    added to a copy) and has RGBA PNGs (spatialdata-io 0.7.1 refuses 4-channel images: the
    copy keeps the lowres image as RGB, no hires).
    """
    import h5py
    from PIL import Image

    sdio = _spatialdata_io()
    src = shared_data / "formats" / "visium_hd_seurat"
    copy = tmp_path / "seurat"
    shutil.copytree(src, copy)
    for spatial in (copy / "binned_outputs").glob("*/spatial"):
        (spatial / "tissue_hires_image.png").unlink()
        lowres = spatial / "tissue_lowres_image.png"
        Image.open(lowres).convert("RGB").save(lowres)
    with h5py.File(copy / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = '{"hd_layout_json": "{\\"file_format\\": \\"1.0\\"}"}'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = sdio.visium_hd(copy, dataset_id="seurat", bin_size=8, load_segmentations_only=False)
        sdata.write(tmp_path / "hd.zarr")
    got = read_spots(tmp_path / "hd.zarr")
    want = read_visium_hd(src, bin_um=8)
    assert_same_spots(got, want, mpp_rel=1e-9)
