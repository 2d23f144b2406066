"""Cells from GeoJSON, and the files written: cells.h5ad + cells.geojson (the contract)."""

from __future__ import annotations

import gc
import json
import weakref

import anndata as ad
import numpy as np
import pytest

from napari_stmap.core.cells import (
    ArrayLabels,
    CellBatch,
    CellWriter,
    collect,
    iter_cells,
    open_cells,
    read_cells_geojson,
    write_cells,
)
from napari_stmap.core.errors import StmapInputError


@pytest.fixture
def written(tmp_path, source, nuclei):
    labels = ArrayLabels(nuclei, 1, kind="segment", name="nuclei")
    table = collect(iter_cells(labels, source), source.output_names)
    prov = {"store": "pred.zarr", "slide": "he.ome.tif", "mpp": 0.5, "source": "segment"}
    prov["expand_um"] = 0.0
    paths = write_cells(table, tmp_path / "cells.h5ad", source.genes, mpp=0.5, provenance=prov)
    return table, paths


def test_h5ad_and_geojson_follow_the_contract(written, source):
    table, (h5ad, geo) = written
    assert geo == h5ad.with_suffix(".geojson")
    a = ad.read_h5ad(h5ad)
    g = len(source.genes)
    assert a.shape == (table.n, g) and a.X.dtype == np.float32
    assert list(a.var_names) == source.genes
    np.testing.assert_array_equal(a.obs["cell_id"].to_numpy(), table.ids)
    assert list(a.obs_names) == [str(i) for i in table.ids]
    np.testing.assert_allclose(a.X, table.counts[:, :g], rtol=1e-6)
    np.testing.assert_allclose(a.obs["total_counts"], table.counts[:, g])
    np.testing.assert_allclose(a.obs["area_um2"], table.area_px * 0.25)
    np.testing.assert_allclose(a.obsm["spatial"], table.centroid_yx[:, ::-1])
    np.testing.assert_allclose(a.obs[["centroid_x", "centroid_y"]], table.centroid_yx[:, ::-1])
    want = np.log1p(1e4 * table.counts[:, :g] / table.counts[:, g:])
    np.testing.assert_allclose(a.layers["lognorm"], want, rtol=1e-5)
    assert a.uns["stmap"]["source"] == "segment" and a.uns["stmap"]["expand_um"] == 0.0
    lib = next(iter(a.uns["spatial"]))
    assert a.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"] == 0.5
    doc = json.loads(geo.read_text())
    feats = doc["features"]
    assert doc["type"] == "FeatureCollection" and len(feats) == table.n
    assert {f["properties"]["objectType"] for f in feats} == {"detection"}
    assert [f["properties"]["cell_id"] for f in feats] == table.ids.tolist()


def test_geojson_cells_round_trip(written, source, slide):
    """The written outlines read back as cells: same ids, sums within the corner cuts."""
    table, (_, geo) = written
    cells = open_cells(slide, geojson=geo)
    assert cells.kind == "geojson"
    back = collect(cells.iter_batches(source), source.output_names)
    order = np.argsort(back.ids)
    ref = np.argsort(table.ids)
    np.testing.assert_array_equal(back.ids[order], table.ids[ref])
    rel = np.abs(back.counts[order, -1] / table.counts[ref, -1] - 1)
    assert np.median(rel) < 0.02 and rel.max() < 0.1
    np.testing.assert_allclose(back.centroid_yx[order], table.centroid_yx[ref], atol=0.5)
    # expanded GeoJSON cells are drawn into pixels, then grown
    grown = open_cells(slide, geojson=geo, expand_um=3.0)
    drawn = collect(iter_cells(grown, None, outlines=False))
    assert drawn.n == table.n and drawn.area_px.sum() > 1.3 * table.area_px.sum()


def test_qupath_detection_export(tmp_path, source):
    """A bare list of QuPath detections with UUIDs: numbered in file order, summed as polygons."""
    feats = [
        {
            "type": "Feature",
            "id": f"uuid-{k}",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + 20, y], [x + 20, y + 16], [x, y + 16], [x, y]]],
            },
            "properties": {"objectType": "detection", "classification": {"name": "Tumor"}},
        }
        for k, (x, y) in enumerate([(100.5, 80.25), (300, 200), (500.75, 410)])
    ]
    path = tmp_path / "detections.geojson"
    path.write_text(json.dumps(feats))
    cells = read_cells_geojson(path)
    np.testing.assert_array_equal(cells.ids, [1, 2, 3])
    table = collect(cells.iter_batches(source), source.output_names)
    want = source.region_sums(cells.regions)
    np.testing.assert_allclose(table.counts[np.argsort(table.ids)], want, rtol=1e-12)
    np.testing.assert_allclose(table.area_px, 320.0)


def test_bad_cell_files(tmp_path, slide):
    (tmp_path / "cells.geojson").write_text("not json at all")
    with pytest.raises(StmapInputError, match="not valid GeoJSON"):
        open_cells(slide, geojson=tmp_path / "cells.geojson")
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(StmapInputError, match="no cell polygons found"):
        open_cells(slide, geojson=tmp_path / "empty.geojson")
    with pytest.raises(StmapInputError, match="exactly one source of cells"):
        open_cells(slide, segment=True, geojson=tmp_path / "empty.geojson")
    with pytest.raises(StmapInputError, match="distance >= 0"):
        open_cells(slide, labels=None, segment=True, expand_um=-1, bbox_yx=(0, 0, 50, 50))


def test_writer_keeps_no_batch_counts(tmp_path):
    """The streaming writer keeps a few numbers per cell, never a batch's (n, G + 1) counts:
    a view into them (the total column) once kept every batch alive, so memory grew with the
    slide (2 KB per cell at 250 genes)."""
    genes = ["A", "B", "C"]
    prov = {"store": "pred.zarr", "slide": "he.ome.tif", "mpp": 0.5, "source": "segment"}
    refs = []
    with CellWriter(tmp_path / "c.h5ad", genes, mpp=0.5, provenance=prov) as writer:
        for k in range(3):
            counts = np.full((4, 4), k + 1.0)
            refs.append(weakref.ref(counts))
            ring = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]]) + 10 * k
            batch = CellBatch(
                np.arange(4 * k + 1, 4 * k + 5),
                counts,
                np.full(4, 16.0),
                ring[:4] + 2,
                [[[ring]]] * 4,
            )
            writer.add(batch)
            del batch, counts
        gc.collect()
        assert all(r() is None for r in refs)
    adata = ad.read_h5ad(tmp_path / "c.h5ad")
    assert adata.n_obs == 12 and np.allclose(adata.obs["total_counts"], np.repeat([1, 2, 3], 4))
