"""SpatialData in the viewer: napari-stmap opens a store's measured bins; napari-spatialdata
shows our export's gene map where the H&E and the project's MapGrid say it is."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("spatialdata")

from spatialdata_samples import synthetic_store  # noqa: E402, I001 (tests/ helper module)

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def store(small_sample, tmp_path_factory):
    return synthetic_store(small_sample, tmp_path_factory.mktemp("sd") / "sample.zarr")


def test_viewer_opens_a_spatialdata_store(make_napari_viewer, store, slide):
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="napari-stmap")
    kinds = [ly.metadata.get("stmap", {}).get("kind") for ly in layers]
    assert "spots" in kinds
    bins = layers[kinds.index("spots")]
    assert bins.metadata["stmap"]["source"] == str(store)
    image = [ly for ly in layers if ly is not bins][0]  # the store's H&E, scaled to level 0
    assert image.extent.world[1][0] == pytest.approx(slide.shape_yx[0] * slide.mpp, rel=0.01)


def test_slide_dock_reads_a_store_with_bin_sizes(docks, qtbot, small_sample, store):
    data, session = docks["data"], docks["session"]
    worker = data.load_slide(small_sample.slide)
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    worker = data.load_spots(store, bin_um=16.0)
    qtbot.waitUntil(lambda: getattr(session.spots, "bin_um", None) == 16.0, timeout=TIMEOUT_MS)
    assert worker is not None
    sizes = [data.bin_combo.itemData(k) for k in range(data.bin_combo.count())]
    assert sizes == [2.0, 8.0, 16.0] and data.bin_combo.isEnabled()


def test_napari_spatialdata_places_our_gene_map(
    make_napari_viewer, qtbot, small_sample, tiny_model, tmp_path
):
    import subprocess
    import sys

    import spatialdata as sd
    from napari_spatialdata import Interactive

    from napari_stmap.core.predict.views import view_grid
    from napari_stmap.core.store import open_store

    def stmap(*argv):
        cmd = [sys.executable, "-m", "napari_stmap.cli", *map(str, argv)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr

    gene = small_sample.genes[0]
    stmap(
        "predict",
        "--model",
        tiny_model,
        "--slide",
        small_sample.slide,
        "--out",
        tmp_path / "p.zarr",
    )
    stmap("export", "--pred", tmp_path / "p.zarr", tmp_path / "o.zarr", "--genes", gene)
    viewer = make_napari_viewer()
    interactive = Interactive(sd.read_zarr(tmp_path / "o.zarr"), headless=True)
    for k, element in enumerate(("he_image", "gene_maps")):
        interactive.add_element(element, "global")
        qtbot.waitUntil(lambda k=k: len(viewer.layers) > k, timeout=TIMEOUT_MS)
    he, genes = viewer.layers["he_image"], viewer.layers["gene_maps"]
    point = np.array([301.3, 457.9])  # level-0 px (y, x)
    np.testing.assert_allclose(np.asarray(he.world_to_data(point))[-2:], point - 0.5, atol=1e-9)
    grid = view_grid(open_store(tmp_path / "p.zarr", mode="r"))
    want = np.floor(grid.to_map(point))  # the map pixel holding the point
    got = np.asarray(genes.world_to_data(np.array([0.0, *point])))[-2:]
    np.testing.assert_array_equal(np.round(got), want)
