"""``stmap export --pred STORE.zarr --format spatialdata OUT.zarr``: predictions as SpatialData.

Read back with ``spatialdata.read_zarr``:
- a region's table row equals ``stmap aggregate``'s on the same GeoJSON; the gene image
  (absolute values) summed over a square region on map pixel edges equals that row too;
- every element's transformation puts a known spot centre on the same place: the spot grid's
  circle (level-0 px), the gene map pixel the project's MapGrid names, the H&E pixel of the
  chosen pyramid level (whose RGB is the slide's there);
- cells from ``stmap cells`` arrive as shapes + a table with cells.h5ad's numbers;
- refusals: an existing OUT without --overwrite, unknown genes; one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("spatialdata")
pytest.importorskip("torch")

STMAP = [sys.executable, "-m", "napari_stmap.cli"]


def _stmap(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def _ok(*argv) -> str:
    proc = _stmap(*argv)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _feature(name, ring_xy):
    return {
        "type": "Feature",
        "properties": {"name": name, "objectType": "annotation"},
        "geometry": {"type": "Polygon", "coordinates": [ring_xy]},
    }


@pytest.fixture(scope="module")
def run(small_sample, tiny_model, tmp_path_factory):
    """A store of the whole sample, a GeoJSON (a square on map pixel edges, a polygon with a
    hole), stmap aggregate on it, and the export (absolute values, 55 µm disk grid)."""
    root = tmp_path_factory.mktemp("export")
    store = root / "pred.zarr"
    _ok("predict", "--model", tiny_model, "--slide", small_sample.slide, "--out", store)
    square = [[96, 120], [208, 120], [208, 200], [96, 200], [96, 120]]  # multiples of 4 px
    outer = [[300, 300], [600, 320], [580, 560], [320, 540], [300, 300]]
    hole = [[400, 400], [460, 400], [460, 460], [400, 460], [400, 400]]
    shapes = {"type": "FeatureCollection", "features": [_feature("square", square)]}
    poly = _feature("holey", outer)
    poly["geometry"]["coordinates"].append(hole)
    shapes["features"].append(poly)
    (root / "regions.geojson").write_text(json.dumps(shapes))
    _ok(
        "aggregate",
        "--pred",
        store,
        "--shapes",
        root / "regions.geojson",
        "--out",
        root / "agg.h5ad",
    )
    out = root / "out.zarr"
    genes = ",".join(small_sample.genes[:3])
    _ok(
        "export", "--pred", store, "--format", "spatialdata", out, "--genes", genes,
        "--values", "absolute", "--shapes", root / "regions.geojson", "--grid", "55",
        "--footprint", "disk", "--hexagonal",
    )  # fmt: skip
    return {"root": root, "store": store, "out": out, "genes": small_sample.genes[:3]}


def _matrix(element, cs="global"):
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))


def test_tables_equal_stmap_aggregate(run):
    import anndata as ad
    import spatialdata as sd

    sdata = sd.read_zarr(run["out"])
    assert set(sdata.images) == {"he_image", "gene_maps"}
    assert set(sdata.shapes) == {"regions", "spot_grid"}
    table = sdata.tables["regions_table"]
    agg = ad.read_h5ad(run["root"] / "agg.h5ad")
    assert list(table.obs_names) == list(agg.obs_names) == ["square", "holey"]
    np.testing.assert_allclose(table.X, agg.X, rtol=1e-6)
    np.testing.assert_allclose(table.obs["total_counts"], agg.obs["total_counts"], rtol=1e-9)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "regions", "region_key": "region", "instance_key": "instance_id"}
    assert list(table.obs["instance_id"]) == list(sdata.shapes["regions"].index)
    assert sdata.shapes["regions"].geometry.iloc[1].interiors  # the hole is kept
    grid = sdata.tables["spot_grid_table"]
    assert grid.n_obs == len(sdata.shapes["spot_grid"]) > 10 and list(grid.var_names) == list(
        agg.var_names
    )


def test_gene_image_sums_to_the_table_row(run):
    import spatialdata as sd

    sdata = sd.read_zarr(run["out"])
    maps = sdata.images["gene_maps"]
    maps = maps if not hasattr(maps, "children") else sd.get_pyramid_levels(maps, n=0)
    assert list(maps.coords["c"].values) == list(run["genes"])
    inv = np.linalg.inv(_matrix(sdata.images["gene_maps"]))
    (x0, y0, _), (x1, y1, _) = inv @ [96, 120, 1], inv @ [208, 200, 1]
    assert all(float(v).is_integer() for v in (x0, y0, x1, y1))  # square on map pixel edges
    block = np.asarray(maps.data)[:, int(y0) : int(y1), int(x0) : int(x1)]
    row = sdata.tables["regions_table"].X[0, :3]
    np.testing.assert_allclose(block.sum(axis=(1, 2)), row, rtol=1e-4)


def test_every_transformation_puts_a_spot_centre_in_the_same_place(run, slide):
    import spatialdata as sd

    from napari_stmap.core.predict.views import view_grid
    from napari_stmap.core.store import open_store

    sdata = sd.read_zarr(run["out"])
    spots = sdata.shapes["spot_grid"]
    k = len(spots) // 2
    cx, cy = spots.geometry.iloc[k].x, spots.geometry.iloc[k].y
    centre = _matrix(spots) @ [cx, cy, 1]  # level-0 px
    np.testing.assert_allclose(centre[:2], [cx, cy])
    gi = np.linalg.inv(_matrix(sdata.images["gene_maps"])) @ centre
    want = view_grid(open_store(run["store"], mode="r")).to_map((centre[1], centre[0]))
    np.testing.assert_allclose(gi[[1, 0]], want, atol=1e-9)  # the project's MapGrid, (y, x)
    hi = np.linalg.inv(_matrix(sdata.images["he_image"])) @ centre
    he = sd.get_pyramid_levels(sdata.images["he_image"], n=0)
    r, c = int(hi[1]), int(hi[0])
    np.testing.assert_array_equal(np.asarray(he.data[:, r, c]), np.asarray(slide.levels[0][r, c]))


def test_he_level_scale(slide):
    """A coarser pyramid level is placed by Scale(level-0 px per level px)."""
    import dask.array as da

    from napari_stmap.core.export_spatialdata import he_element
    from napari_stmap.core.io.slide import Slide

    base = slide.levels[0]
    half = da.from_array(np.asarray(base)[::2, ::2])
    two = Slide(slide.path, (base, half), slide.mpp, slide.mpp_source)
    m = _matrix(he_element(two, 1))
    np.testing.assert_allclose(m[:2, :2], np.diag([2.0, 2.0]))
    with pytest.raises(Exception, match=r"levels 0: 600×800, 1: 300×400"):
        he_element(two, 2)


def test_cells_arrive_as_shapes_and_table(run, tmp_path):
    import anndata as ad
    import spatialdata as sd

    cells_in = {
        "type": "FeatureCollection",
        "features": [
            _feature(f"c{k}", [[x, y], [x + 20, y], [x + 20, y + 16], [x, y + 16], [x, y]])
            for k, (x, y) in enumerate([(100, 100), (300, 200), (500, 400)])
        ],
    }
    (tmp_path / "in.geojson").write_text(json.dumps(cells_in))
    cells = tmp_path / "cells.h5ad"
    _ok("cells", "--pred", run["store"], "--geojson", tmp_path / "in.geojson", "--out", cells)
    out = tmp_path / "cells.zarr"
    _ok("export", "--pred", run["store"], out, "--genes", run["genes"][0], "--cells", cells)
    sdata = sd.read_zarr(out)
    table, want = sdata.tables["cells_table"], ad.read_h5ad(cells)
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(want.X))
    assert table.uns["spatialdata_attrs"]["instance_key"] == "cell_id"
    bounds = sdata.shapes["cells"].loc[table.obs["cell_id"].to_numpy()].total_bounds
    np.testing.assert_allclose(bounds, [100, 100, 520, 416])


def test_refusals_are_one_line(run):
    again = _stmap("export", "--pred", run["store"], run["out"], "--genes", run["genes"][0])
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and "pass --overwrite" in lines[0]
    bad = _stmap("export", "--pred", run["store"], run["root"] / "b.zarr", "--genes", "NOPE")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "['NOPE'] are not in the store" in lines[0]
    assert not (run["root"] / "b.zarr").exists()
    before = sorted(p.name for p in run["root"].iterdir())
    _ok("export", "--pred", run["store"], run["out"], "--genes", run["genes"][1], "--overwrite")
    assert sorted(p.name for p in run["root"].iterdir()) == before  # replaced, no leftovers
