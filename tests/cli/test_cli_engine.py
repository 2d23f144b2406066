"""``stmap predict`` / ``stmap aggregate`` end to end on a tiny model and the small sample."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stmap.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_sample, tiny_model):
    out = tmp_path_factory.mktemp("pred") / "pred.zarr"
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_model),
                "--slide",
                str(small_sample.slide),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    return out


def test_predict_resume_is_noop(store, small_sample, tiny_model, capsys):
    from napari_stmap.core.store import open_store

    before = open_store(store).counts()
    assert before["todo"] == 0 and before["done"] > 0
    assert (
        main(
            [
                "predict",
                "--model",
                str(tiny_model),
                "--slide",
                str(small_sample.slide),
                "--out",
                str(store),
            ]
        )
        == 0
    )
    assert open_store(store).counts() == before


def test_predict_refuses_other_slide(store, tmp_path, tiny_model, capsys):
    from napari_stmap.core.synthetic import write_synthetic

    other = write_synthetic(tmp_path / "other", size_um=(200.0, 200.0), n_genes=8, seed=9)
    code = main(
        ["predict", "--model", str(tiny_model), "--slide", str(other.slide), "--out", str(store)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "pred.zarr" in err


def _core_sums(store_path, footprints):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.geometry import weight_matrix
    from napari_stmap.core.predict import region_map

    boxes = np.array([fp.bbox_yx() for fp in footprints])
    box = (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))
    dense, grid = region_map(store_path, box, background=0.0)
    return aggregate(dense, grid, weight_matrix(footprints, grid))


def test_aggregate_grid_equals_core(store, small_sample, tmp_path):
    from napari_stmap.core.geometry import spot_grid

    region = [100.0, 120.0, 400.0, 500.0]
    out = tmp_path / "grid.h5ad"
    assert (
        main(
            [
                "aggregate",
                "--pred",
                str(store),
                "--grid",
                "16",
                "--region",
                *map(str, region),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    adata = ad.read_h5ad(out)
    mpp = small_sample.mpp
    centers, fps = spot_grid(tuple(region), size_px=16 / mpp, pitch_px=16 / mpp, footprint="square")
    expected = _core_sums(store, fps)
    g = adata.n_vars
    np.testing.assert_allclose(adata.X, expected[:, :g], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.obs["total_counts"], expected[:, g], rtol=1e-5)
    np.testing.assert_allclose(adata.obsm["spatial"], centers[:, ::-1])
    np.testing.assert_allclose(adata.obs["area_um2"], 256.0)
    assert adata.uns["spatial"][next(iter(adata.uns["spatial"]))]["scalefactors"][
        "microns_per_pixel"
    ] == pytest.approx(mpp)


def test_aggregate_geojson_polygon_with_hole_and_point(store, tmp_path):
    from napari_stmap.core.geometry import Disk, Polygon

    outer = [[100, 100], [400, 100], [400, 300], [100, 300], [100, 100]]  # [x, y]
    hole = [[200, 150], [300, 150], [300, 250], [200, 250], [200, 150]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"name": "ring"},
                "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
            },
            {
                "type": "Feature",
                "properties": {"name": "dot", "radius_px": 30},
                "geometry": {"type": "Point", "coordinates": [500, 350]},
            },
        ],
    }
    shapes = tmp_path / "shapes.geojson"
    shapes.write_text(json.dumps(doc))
    out = tmp_path / "shapes.csv"
    assert (
        main(["aggregate", "--pred", str(store), "--shapes", str(shapes), "--out", str(out)]) == 0
    )
    table = pd.read_csv(out, index_col="region")
    assert list(table.index) == ["ring", "dot"]
    whole = _core_sums(store, [Polygon(np.array(outer, float)[:, ::-1])])[0]
    inner = _core_sums(store, [Polygon(np.array(hole, float)[:, ::-1])])[0]
    dot = _core_sums(store, [Disk((350.0, 500.0), 60.0)])[0]
    genes = [
        c
        for c in table.columns
        if c not in ("x_px", "y_px", "area_um2", "footprint", "total_counts")
    ]
    np.testing.assert_allclose(
        table.loc["ring", genes].to_numpy(float), (whole - inner)[: len(genes)], rtol=1e-4
    )
    np.testing.assert_allclose(
        table.loc["dot", genes].to_numpy(float), dot[: len(genes)], rtol=1e-4
    )
    # never overwrite silently
    assert (
        main(["aggregate", "--pred", str(store), "--shapes", str(shapes), "--out", str(out)]) == 2
    )


def test_aggregate_bad_geojson(store, tmp_path, capsys):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    code = main(
        ["aggregate", "--pred", str(store), "--shapes", str(bad), "--out", str(tmp_path / "o.csv")]
    )
    assert code == 2 and "bad.geojson" in capsys.readouterr().err
