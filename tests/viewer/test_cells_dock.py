"""The Cells dock through napari's plugin path on the synthetic sample."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("error:Private attribute access:FutureWarning")

PLUGIN = "napari-stmap"
TIMEOUT_MS = 120_000


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


@pytest.fixture
def opened(make_napari_viewer, tmp_path, monkeypatch, small_sample, tiny_model, qtbot):
    """A viewer with the sample's slide, the tiny model, and the Cells dock."""
    monkeypatch.setenv("STMAP_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    viewer.open(small_sample.slide, plugin=PLUGIN)
    _dock, data = viewer.window.add_plugin_dock_widget(PLUGIN, "Slide & data")
    _dock, cells = viewer.window.add_plugin_dock_widget(PLUGIN, "Cells")
    session = cells.session
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    assert data.load_model(tiny_model)
    viewer.reset_view()
    return viewer, cells


def _run(qtbot, cells) -> None:
    cells.run()
    qtbot.waitUntil(
        lambda: cells.run_btn.isEnabled() and cells.cells is not None, timeout=TIMEOUT_MS
    )


def test_segment_whole_slide_colour_and_export(opened, qtbot, tmp_path, errors):
    import anndata as ad

    viewer, cells = opened
    cells.set_source("segment")
    cells.expand.setValue(2.0)
    cells.extent.setCurrentIndex(1)  # whole slide
    _run(qtbot, cells)
    assert not errors
    table = cells.cells.table
    assert table.n > 300 and np.isfinite(table.counts).all()
    layer = viewer.layers["stmap: cells"]
    assert type(layer).__name__ == "Labels"
    assert layer.scale[-1] == pytest.approx(0.5)  # µm per label px
    labels = np.asarray(layer.data)
    assert set(np.unique(labels[labels > 0])) == set(table.ids.tolist())
    gene = cells.gene.itemText(0)
    shown = cells.show_gene(gene)
    assert shown.name == f"stmap: cells {gene}"
    values = np.asarray(shown.data)
    k = int(np.argmax(table.area_px))
    y, x = np.argwhere(labels == table.ids[k])[0]
    col = table.output_names.index(gene)
    want = np.log1p(1e4 * table.counts[k, col] / table.counts[k, -1])
    assert values[y, x] == pytest.approx(want, rel=1e-5)
    assert np.isnan(values[labels == 0]).all()
    # outlines only when zoomed in (napari draws contours on the Qt thread, per loaded region)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom = 0.1
    assert layer.contour == 0 and not layer.visible  # the values show, filled labels hidden
    camera.zoom = 4.0
    assert layer.contour == 1 and layer.visible
    paths = cells.export(tmp_path / "cells.h5ad")
    back = ad.read_h5ad(paths[0])
    assert back.n_obs == table.n and back.uns["stmap"]["source"] == "segment"
    assert paths[1].exists()
    assert cells.export(tmp_path / "cells.h5ad") is None and errors  # no silent overwrite


def test_labels_layer_in_view(opened, qtbot, errors):
    """A Labels layer of the viewer (here at half resolution) as the cells, in the view."""
    viewer, cells = opened
    lab = np.zeros((300, 400), dtype=np.int32)
    lab[50:60, 40:52] = 5
    lab[120:140, 200:230] = 9
    viewer.add_labels(lab, name="my cells", scale=(1.0, 1.0))  # 1 µm = 2 slide px
    cells.set_source("layer", layer="my cells")
    cells.extent.setCurrentIndex(0)  # current view: the whole slide after reset_view
    _run(qtbot, cells)
    assert not errors
    table = cells.cells.table
    assert sorted(table.ids.tolist()) == [5, 9]
    order = np.argsort(table.ids)
    np.testing.assert_allclose(table.area_px[order], [120 * 4, 600 * 4])  # level-0 px²
    assert cells.cells.factor == 2
