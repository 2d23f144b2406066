"""The napari docks on a tiny synthetic sample with a tiny random-init model (pytest-qt)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
torch = pytest.importorskip("torch")

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def tiny_model(small_sample, tmp_path_factory):
    """A random-init pixnet_tiny on 6 of the sample's genes, saved as a model file."""
    from napari_stmap.core.model import create_model, save_model

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:6]))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture
def docks(qtbot, tmp_path):
    """A viewer with the five docks sharing one session (stores under ``tmp_path``)."""
    import napari

    from napari_stmap._widgets._session import get_session
    from napari_stmap._widgets.compare import CompareWidget
    from napari_stmap._widgets.genes import GenesWidget
    from napari_stmap._widgets.predict import PredictWidget
    from napari_stmap._widgets.regions import RegionsWidget
    from napari_stmap._widgets.slide_data import SlideDataWidget

    viewer = napari.Viewer(show=False)
    session = get_session(viewer)
    session.store_root = tmp_path / "stores"
    out = {"viewer": viewer, "session": session}
    for key, cls in [
        ("data", SlideDataWidget),
        ("predict", PredictWidget),
        ("genes", GenesWidget),
        ("regions", RegionsWidget),
        ("compare", CompareWidget),
    ]:
        out[key] = cls(viewer)
        viewer.window.add_dock_widget(out[key], name=key)
    yield out
    session.close()
    if hasattr(viewer.window, "_qt_window"):
        viewer.close()


def _wait_worker(qtbot, worker) -> None:
    if worker is not None:
        with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS, raising=False):
            pass
        qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT_MS)


def _load(qtbot, docks, small_sample, tiny_model) -> None:
    data, session = docks["data"], docks["session"]
    _wait_worker(qtbot, data.load_slide(small_sample.slide))
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    _wait_worker(qtbot, data.load_spots(small_sample.outs, bin_um=8.0))
    qtbot.waitUntil(lambda: session.spots is not None, timeout=TIMEOUT_MS)
    assert data.load_model(tiny_model)
    docks["viewer"].reset_view()


def _predict_view(qtbot, docks) -> None:
    session = docks["session"]
    docks["predict"].predict_view()
    qtbot.waitUntil(
        lambda: session.predictor is not None and bool(session.goal), timeout=TIMEOUT_MS
    )

    def finished():
        done, total = session.progress()
        return session.predictor.pending == 0 and done == total > 0

    qtbot.waitUntil(finished, timeout=TIMEOUT_MS)


@pytest.fixture
def errors(monkeypatch):
    """Messages passed to napari's ``show_error``."""
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


# ----------------------------------------------------------------------------- end to end
def test_load_predict_gene_regions_export_compare(
    docks, qtbot, small_sample, tiny_model, tmp_path, errors
):
    import anndata as ad

    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.engine import ensure_region, view_grid
    from napari_stmap.core.evaluate import evaluate_measured, load_measured
    from napari_stmap.core.geometry import Rectangle
    from napari_stmap.core.model import load_model

    viewer, session = docks["viewer"], docks["session"]
    _load(qtbot, docks, small_sample, tiny_model)
    assert session.slide.mpp == 0.5 and session.spots.bin_um == 8.0
    assert "6 of 6 model genes are measured" in docks["data"].info.text()
    _predict_view(qtbot, docks)
    pred = session.predictor
    assert pred.store.counts()["done"] > 0

    # a gene heatmap: multiscale, placed by the store's grid in µm, updated in place
    gene = session.model_genes[1]
    docks["genes"].add_gene(gene)
    docks["genes"].add_gene(gene.lower())
    qtbot.waitUntil(lambda: f"stmap: {gene}" in viewer.layers, timeout=TIMEOUT_MS)
    names = [ly.name for ly in viewer.layers]
    assert names.count(f"stmap: {gene}") == 1
    layer = viewer.layers[f"stmap: {gene}"]
    grid = view_grid(pred.store)
    np.testing.assert_allclose(layer.scale, [grid.pixel_px * 0.5] * 2)
    np.testing.assert_allclose(layer.translate, np.array(grid.translate_yx) * 0.5)
    assert layer.multiscale and np.isfinite(np.asarray(layer.data[0])).any()

    # a drawn rectangle (level-0 px) -> table equals the core aggregation
    regions = docks["regions"]
    shapes = regions.regions_layer()
    shapes.add_rectangles(np.array([[100.0, 120.0], [300.0, 360.0]]))
    qtbot.waitUntil(lambda: regions.table_data is not None, timeout=TIMEOUT_MS)
    table = regions.table_data
    dense, g = ensure_region(pred, (100.0, 120.0, 300.0, 360.0))
    want = aggregate(dense, g, [Rectangle(100.0, 120.0, 300.0, 360.0)])
    np.testing.assert_allclose(table.counts, want, rtol=1e-6)
    np.testing.assert_allclose(table.area_um2, [200 * 240 * 0.25])
    assert regions.table.rowCount() == 1
    cell = float(regions.table.item(0, 2).text())
    assert cell == pytest.approx(table.normalised()[0, 0], rel=1e-3)

    # export -> read back equals the table; never overwrite silently
    out = regions.export(tmp_path / "regions.h5ad")
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.X, table.counts[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(back.obs["total_counts"], table.total)
    np.testing.assert_allclose(back.obs["area_um2"], table.area_um2)
    assert regions.export(tmp_path / "regions.h5ad") is None and "already exists" in errors[-1]
    assert regions.export(tmp_path / "regions.csv") is not None

    # compare: the same numbers as the core evaluation on the same bins
    compare = docks["compare"]
    compare.set_scales([8.0, 16.0])
    assert compare.chosen_scales() == [8.0, 16.0]
    _wait_worker(qtbot, compare.run())
    qtbot.waitUntil(lambda: compare.data is not None, timeout=TIMEOUT_MS)
    model = load_model(tiny_model)
    measured = load_measured(small_sample.outs, scales_um=[8.0, 16.0], slide=session.slide)
    want = evaluate_measured(model, session.slide, measured, [8.0, 16.0])
    assert compare.data.result["scales"] == want["scales"]
    assert compare.per_gene("16") == want["genes"]["16"]
    assert compare.table.rowCount() == 6
    compare.show_layers(gene=compare.data.genes[0], key="16")
    compare.show_layers(gene=compare.data.genes[0], key="16")
    g0 = compare.data.genes[0]
    names = [ly.name for ly in viewer.layers]
    assert names.count(f"stmap: measured {g0}") == 1 and names.count(f"stmap: residual {g0}") == 1
    assert not errors[:-1], errors


def test_spot_grid_rows_sum_like_core(docks, qtbot, small_sample, tiny_model):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.engine import ensure_region
    from napari_stmap.core.geometry import disks

    _load(qtbot, docks, small_sample, tiny_model)
    regions = docks["regions"]
    regions.regions_layer().add_rectangles(np.array([[50.0, 50.0], [350.0, 450.0]]))
    regions.grid_size.setValue(20.0)
    regions.grid_pitch.setValue(40.0)
    n = regions.make_spot_grid()
    assert n > 4 and "stmap: spot grid" in docks["viewer"].layers
    qtbot.waitUntil(
        lambda: regions.table_data is not None and len(regions.table_data.names) == n + 1,
        timeout=TIMEOUT_MS,
    )
    centers = np.asarray(docks["viewer"].layers["stmap: spot grid"].data)
    dense, g = ensure_region(docks["session"].predictor, (50.0, 50.0, 350.0, 450.0))
    want = aggregate(dense, g, disks(centers, 40.0))
    np.testing.assert_allclose(regions.table_data.counts[1:], want, rtol=1e-6)


# ------------------------------------------------------------------------------ robustness
def test_bad_input_is_a_notification(docks, qtbot, tmp_path, errors):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a model")
    assert not docks["data"].load_model(bad)
    assert errors and "notes.safetensors" in errors[-1]
    docks["genes"].add_gene("ERBB2")
    assert "open a model" in errors[-1]
    docks["predict"].predict_view()
    assert "load a slide and a model" in errors[-1]


def test_worker_failure_reenables_buttons(docks, qtbot, tmp_path, errors):
    data = docks["data"]
    worker = data.load_slide(tmp_path / "missing.tif")
    assert not data.open_slide_btn.isEnabled()
    _wait_worker(qtbot, worker)
    qtbot.waitUntil(lambda: data.open_slide_btn.isEnabled(), timeout=TIMEOUT_MS)
    assert errors and "missing.tif" in errors[-1]


def test_failed_region_worker_reenables_update(
    docks, qtbot, small_sample, tiny_model, errors, monkeypatch
):
    from napari_stmap._widgets import regions as regions_mod

    def boom(*args, **kwargs):
        raise RuntimeError("boom: draw again")

    monkeypatch.setattr(regions_mod, "compute_regions", boom)
    _load(qtbot, docks, small_sample, tiny_model)
    regions = docks["regions"]
    regions.regions_layer().add_rectangles(np.array([[10.0, 10.0], [60.0, 60.0]]))
    qtbot.waitUntil(lambda: bool(errors) and "boom" in errors[-1], timeout=TIMEOUT_MS)
    qtbot.waitUntil(
        lambda: regions.update_btn.isEnabled() and regions._worker is None, timeout=TIMEOUT_MS
    )


def test_closing_the_viewer_joins_predictor_threads(docks, qtbot, small_sample, tiny_model):
    _load(qtbot, docks, small_sample, tiny_model)
    session = docks["session"]
    docks["predict"].predict_slide()
    qtbot.waitUntil(lambda: session.predictor is not None, timeout=TIMEOUT_MS)
    pred = session.predictor
    docks["viewer"].close()
    assert session.closed and session.predictor is None
    assert not pred._worker.is_alive()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("stmap-")]
    assert not alive, alive
