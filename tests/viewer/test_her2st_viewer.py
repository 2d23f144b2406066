"""Cells and region contrasts from the viewer on a real H&E section (HER2ST C2, 0.687 µm/px).

Through napari's plugin path (reader, Plugins-menu docks) with a random-init model: the camera
zoomed to a ~0.6 × 0.8 mm area of tumour nests and stroma in the middle of the section, the
Cells dock's built-in segmentation over the view, a gene colouring checked against the exported
``cells.h5ad``, then two halves of that area compared in the Regions dock. Skipped without
``../shared``. Private napari access fails here as in test_plugin_path.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("torch")

from test_plugin_path import no_private_access  # noqa: E402,F401 (autouse fixture)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.filterwarnings("error:Private attribute access:FutureWarning"),
]

PLUGIN = "napari-stmap"
TIMEOUT_MS = 120_000
#: Centre of the area looked at, level-0 px (y, x): tumour nests in stroma, all tissue
#: (checked on a thumbnail; the test checks the tissue mask over the view).
CENTRE_YX = (6000.0, 5700.0)
VIEW_UM = 600.0


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


@pytest.fixture
def c2(shared_data):
    path = shared_data / "her2st" / "C2" / "he.ome.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_c2_cells_and_compare_from_the_viewer(
    c2, make_napari_viewer, make_model_file, qtbot, tmp_path, monkeypatch, errors
):
    import anndata as ad
    from qtpy.QtCore import Qt

    from napari_stmap._widgets._viewer import camera_of, viewport_bbox_px
    from napari_stmap.core.tiling import tissue_mask

    monkeypatch.setenv("STMAP_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(c2, plugin=PLUGIN)
    _dock, data = viewer.window.add_plugin_dock_widget(PLUGIN, "Slide & data")
    _dock, cells = viewer.window.add_plugin_dock_widget(PLUGIN, "Cells")
    _dock, regions = viewer.window.add_plugin_dock_widget(PLUGIN, "Regions")
    session = cells.session
    assert regions.session is session
    session.store_root = tmp_path / "stores"
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    mpp = session.mpp
    assert mpp == pytest.approx(0.687, abs=1e-3)
    model = make_model_file(5)
    assert data.load_model(model)

    # zoom to tissue, 0.6 mm across the canvas's short side (world µm)
    h, w = (float(v) for v in viewer.canvas.size)
    camera = camera_of(viewer)
    camera.center = (CENTRE_YX[0] * mpp, CENTRE_YX[1] * mpp)
    camera.zoom = min(h, w) / VIEW_UM  # the short side of the canvas shows VIEW_UM
    bbox = viewport_bbox_px(viewer, mpp, session.slide.shape_yx)
    assert bbox is not None
    y0, x0, y1, x1 = bbox
    area_mm2 = (y1 - y0) * (x1 - x0) * mpp**2 / 1e6
    assert 0.3 < area_mm2 < 0.6, bbox
    tissue = tissue_mask(session.slide)
    ty, tx = tissue.px_yx
    assert tissue.mask[int(y0 / ty) : int(y1 / ty) + 1, int(x0 / tx) : int(x1 / tx) + 1].all()

    # 1. nuclei over the view (the dock's defaults: built-in segmentation, current view)
    cells.set_source("segment")
    cells.expand.setValue(3.0)
    assert cells.extent.currentIndex() == 0
    cells.run()
    qtbot.waitUntil(
        lambda: cells.run_btn.isEnabled() and cells.cells is not None, timeout=TIMEOUT_MS
    )
    assert not errors, errors
    table = cells.cells.table
    n = table.n
    density = n / area_mm2
    print(f"C2 view {area_mm2:.3f} mm²: {n} nuclei ({density:.0f} per mm²)")
    assert 1000 < density < 15000, (n, area_mm2)
    assert np.isfinite(table.counts).all() and (table.counts[:, -1] > 0).all()
    # every cell's centroid lies in the view (level-0 px)
    cy, cx = table.centroid_yx.T
    assert (cy >= y0 - 1).all() and (cy <= y1 + 1).all() and (cx >= x0 - 1).all()
    assert (cx <= x1 + 1).all()
    labels_layer = viewer.layers["stmap: cells"]
    assert type(labels_layer).__name__ == "Labels"
    lab = np.asarray(labels_layer.data[0] if labels_layer.multiscale else labels_layer.data)
    assert set(np.unique(lab[lab > 0]).tolist()) == set(table.ids.tolist())
    # placed over the view: world µm = level-0 px × mpp
    np.testing.assert_allclose(
        np.asarray(labels_layer.extent.world)[:, -2:],
        [[y0 * mpp, x0 * mpp], [y1 * mpp, x1 * mpp]],
        atol=2 * mpp,
    )

    # the colouring of one gene against the exported table
    gene = session.model_genes[1]
    cells.gene.setCurrentText(gene)
    cells.gene.activated.emit(cells.gene.currentIndex())  # the user's pick
    shown = viewer.layers[f"stmap: cells {gene}"]
    values = shown.data[0] if shown.multiscale else shown.data
    assert values.shape == lab.shape
    paths = cells.export(tmp_path / "cells.h5ad")
    assert paths is not None and all(p.exists() for p in paths)
    back = ad.read_h5ad(paths[0])
    assert back.n_obs == n and list(back.var_names) == list(session.model_genes)
    rng = np.random.default_rng(0)
    for cell_id in rng.choice(table.ids, size=5, replace=False):
        y, x = np.argwhere(lab == cell_id)[0]
        want = back[str(cell_id), gene].layers["lognorm"][0, 0]
        assert float(values[y, x]) == pytest.approx(float(want), rel=1e-5)
        # the counts shown in "counts" mode are the file's X
        k = int(np.flatnonzero(table.ids == cell_id)[0])
        col = table.output_names.index(gene)
        assert table.counts[k, col] == pytest.approx(float(back[str(cell_id), gene].X[0, 0]))
    assert not errors, errors

    # 2. two halves of the view compared with 16 µm squares
    layer = regions.regions_layer()
    xm = (x0 + x1) / 2
    for name, (a, b) in (("left half", (x0, xm)), ("right half", (xm, x1))):
        rect = np.array([[y0, a], [y0, b], [y1, b], [y1, a]])
        layer.add(rect, shape_type="rectangle")
        layer.features.loc[layer.nshapes - 1, "name"] = name
    section = regions.contrast
    section.setChecked(True)
    section.refresh_regions()
    section.a_combo.setCurrentText("left half")
    section.b_combo.setCurrentText("right half")
    section.unit_combo.setCurrentText("squares")
    section.unit_size.setValue(16.0)
    section.run_btn.click()
    qtbot.waitUntil(lambda: section.result is not None, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: section.run_btn.isEnabled(), timeout=TIMEOUT_MS)
    result = section.result
    shown_genes = section.table.visible_genes()
    assert sorted(shown_genes) == sorted(session.model_genes)
    q_col = [section.table.proxy.index(r, 3).data() for r in range(len(shown_genes))]
    assert all(0.0 <= float(q) <= 1.0 for q in q_col), q_col
    assert ((result.q >= 0) & (result.q <= 1)).all() and np.isfinite(result.log2fc).all()
    # each half is about 300 × 400 µm: hundreds of 16 µm squares
    print(f"squares: n_a={result.n_a}, n_b={result.n_b}")
    assert result.n_a > 3 and result.n_b > 3
    assert min(result.n_a, result.n_b) > 200
    assert "left half vs right half" in section.status.text()

    # clicking a gene of the table adds its heatmap
    pick = section.table.gene_at(0)
    rect = section.table.visualRect(section.table.proxy.index(0, 1))
    qtbot.mouseClick(section.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: f"stmap: {pick}" in viewer.layers, timeout=TIMEOUT_MS)
    assert not errors, errors
    assert slide_layer in viewer.layers
