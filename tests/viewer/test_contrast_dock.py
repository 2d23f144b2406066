"""The Regions dock's "Compare two regions" section, through napari's plugin path.

The viewer's prediction store is the synthetic truth (tests/truth_store.py), so the ranking is
known: a region over the tumour nests against a stroma region puts the tumour markers first
and the fibroblast markers last. Private napari access fails here as in test_plugin_path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("napari")
pytest.importorskip("torch")

from test_plugin_path import no_private_access  # noqa: E402,F401 (autouse fixture)

pytestmark = pytest.mark.filterwarnings("error:Private attribute access:FutureWarning")

PLUGIN = "napari-stmap"
TIMEOUT_MS = 60_000
TUMOUR = {"ERBB2", "GRB7", "STARD3"}
STROMA = {"COL1A1", "COL1A2", "DCN"}


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("STMAP_CACHE", str(tmp_path / "cache"))
    return make_napari_viewer()


@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


def _open_with_truth(viewer, qtbot, small_sample, make_model_file, tmp_path):
    """Slide opened by napari's reader, a 15-gene model whose store holds the truth, and
    the Regions dock with a tumour and a stroma region drawn from the truth."""
    from napari_stmap.core.regions import footprint_shape
    from napari_stmap.core.store import store_path_for
    from truth_store import truth_regions, write_truth_store

    viewer.open(small_sample.slide, plugin=PLUGIN)
    _dock, data = viewer.window.add_plugin_dock_widget(PLUGIN, "Slide & data")
    _dock, regions = viewer.window.add_plugin_dock_widget(PLUGIN, "Regions")
    session = data.session
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    model = make_model_file(15)
    session.store_root = tmp_path / "stores"
    write_truth_store(
        small_sample, model, store_path_for(session.slide.path, model, session.store_root)
    )
    assert data.load_model(model)
    layer = regions.regions_layer()
    for cell_type, level, name in (("tumour", 0.5, "Tumour nests"), ("fibroblast", 0.2, "Stroma")):
        kind, vertices = footprint_shape(truth_regions(small_sample, cell_type, level).parts[0][0])
        layer.add(vertices, shape_type=kind)
        layer.features.loc[layer.nshapes - 1, "name"] = name
    section = regions.contrast
    assert not section.body.isVisibleTo(section)  # folded until the user ticks the box
    section.setChecked(True)
    assert section.body.isVisibleTo(section)
    return section, session


def test_compare_regions_table_volcano_heatmaps_export(
    viewer, qtbot, small_sample, make_model_file, tmp_path, errors, monkeypatch
):
    section, session = _open_with_truth(viewer, qtbot, small_sample, make_model_file, tmp_path)
    section.refresh_regions()
    assert [section.a_combo.itemText(i) for i in range(section.a_combo.count())] == [
        "Tumour nests",
        "Stroma",
    ]
    assert section.b_combo.itemText(section.b_combo.count() - 1) == "rest of tissue"
    section.a_combo.setCurrentText("Tumour nests")
    section.b_combo.setCurrentText("Stroma")
    section.unit_combo.setCurrentText("squares")
    section.unit_size.setValue(16.0)
    section.run_btn.click()
    qtbot.waitUntil(lambda: section.result is not None, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: section.run_btn.isEnabled(), timeout=TIMEOUT_MS)
    genes = section.table.visible_genes()
    assert len(genes) == 15
    assert set(genes[:3]) == TUMOUR and set(genes[-3:]) == STROMA, genes
    assert "Tumour nests vs Stroma" in section.status.text()
    assert "not independent" in section.status.text()

    # search, and sort by clicking a header
    from qtpy.QtCore import QPoint, Qt

    section.search.setText("col1")
    assert sorted(section.table.visible_genes()) == ["COL1A1", "COL1A2"]
    section.search.setText("")
    header = section.table.horizontalHeader()
    x = header.sectionViewportPosition(2) + header.sectionSize(2) // 2  # log2 FC
    qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, 5))
    assert header.sortIndicatorSection() == 2
    ascending = header.sortIndicatorOrder() == Qt.SortOrder.AscendingOrder
    assert set(section.table.visible_genes()[:3]) == (STROMA if ascending else TUMOUR)

    # clicking a row adds that gene's heatmap (the Genes dock's own code)
    row = section.table.visible_genes().index("DCN")
    rect = section.table.visualRect(section.table.proxy.index(row, 1))
    qtbot.mouseClick(section.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: "stmap: DCN" in viewer.layers, timeout=TIMEOUT_MS)

    # clicking a point of the volcano plot adds its gene's heatmap
    from matplotlib.backend_bases import MouseEvent

    g = section.result.genes.index("ERBB2")
    ax = section.figure.axes[0]
    section.canvas.draw()
    x, y = ax.transData.transform(section.points.get_offsets()[g])
    MouseEvent("button_press_event", section.canvas, x, y, button=1)._process()
    qtbot.waitUntil(lambda: "stmap: ERBB2" in viewer.layers, timeout=TIMEOUT_MS)

    # export through the save dialog (answered here as the user would)
    import napari_stmap._widgets._contrast as contrast_module

    out = tmp_path / "contrast.csv"
    monkeypatch.setattr(contrast_module, "ask_save_path", lambda *a: (str(out), False))
    section.export_btn.click()
    table = pd.read_csv(out)
    assert set(table["gene"][:3]) == TUMOUR and len(table) == 15
    np.testing.assert_allclose(
        table.set_index("gene").loc[section.result.genes, "log2fc"], section.result.log2fc
    )
    assert not errors


def test_compare_rest_and_refusals(
    viewer, qtbot, small_sample, make_model_file, tmp_path, errors, monkeypatch
):
    section, session = _open_with_truth(viewer, qtbot, small_sample, make_model_file, tmp_path)
    section.refresh_regions()
    section.a_combo.setCurrentText("Stroma")
    section.b_combo.setCurrentText("Stroma")
    section.run_btn.click()
    assert errors and "both 'Stroma'" in errors[-1] and section.result is None
    # too large units: a notification naming the count, the button comes back
    section.b_combo.setCurrentText("rest of tissue")
    section.unit_size.setValue(150.0)
    section.run_btn.click()
    qtbot.waitUntil(lambda: len(errors) == 2, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: section.run_btn.isEnabled(), timeout=TIMEOUT_MS)
    assert "'Stroma' holds" in errors[-1] and "use smaller units" in errors[-1]
    # Visium-like spots against the rest of the tissue
    section.unit_combo.setCurrentText("Visium-like spots")
    section.unit_size.setValue(20.0)
    section.run_btn.click()
    qtbot.waitUntil(lambda: section.result is not None, timeout=TIMEOUT_MS)
    assert section.result.name_b == "rest" and set(section.table.visible_genes()[:3]) == STROMA
    # cells of a cells.h5ad as the units, the file chosen in the open dialog
    import napari_stmap._widgets._contrast as contrast_module
    from napari_stmap.core.predict import StoreSource
    from napari_stmap.core.tiling import tissue_mask
    from truth_store import write_cells

    slide = session.slide
    path = write_cells(
        tmp_path / "cells.h5ad", StoreSource(session.store_path()), slide, tissue_mask(slide)
    )
    monkeypatch.setattr(contrast_module, "ask_open_path", lambda *a: str(path))
    section.unit_combo.setCurrentText("cells (.h5ad)")
    section.unit_combo.activated.emit(section.unit_combo.currentIndex())
    assert section.cells_btn.text() == "cells.h5ad" and not section.unit_size.isVisible()
    section.run_btn.click()
    qtbot.waitUntil(lambda: section.result.unit == "cells", timeout=TIMEOUT_MS)
    assert set(section.table.visible_genes()[:3]) == STROMA
    assert len(errors) == 2
