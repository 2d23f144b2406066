"""The napari docks on a tiny synthetic sample with a tiny random-init model (pytest-qt)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari")
from qtpy.QtCore import Qt  # noqa: E402 (after the skip)

torch = pytest.importorskip("torch")

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def tiny_model(make_model_file):
    """A random-init pixnet_tiny on 6 of the sample's genes, saved as a model file."""
    return make_model_file(6)


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


def _count_embedded(monkeypatch) -> list:
    """Tiles that go through the network from now on (one entry per tile and pass)."""
    from napari_stmap.core.predict import pipeline as engine

    seen: list = []
    real = engine._Pipeline._flush

    def flush(self, feed, batch, q_out):
        seen.extend(tile for tile, tag, _ in batch if feed.keep(tile, tag))
        return real(self, feed, batch, q_out)

    monkeypatch.setattr(engine._Pipeline, "_flush", flush)
    return seen


@pytest.fixture
def errors(monkeypatch):
    """Messages passed to napari's ``show_error``."""
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


# ----------------------------------------------------------------------------- end to end
def test_load_predict_gene_regions_export_compare(
    docks, qtbot, small_sample, tiny_model, tmp_path, errors, monkeypatch
):
    import anndata as ad

    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.compare import store_predictions as _store_predictions
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.geometry import Rectangle
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.model import load_model
    from napari_stmap.core.predict import ensure_region, view_grid
    from napari_stmap.core.predict import spots as predict_dense

    embedded = _count_embedded(monkeypatch)
    cli_predict_spots = predict_dense.predict_spots

    def no_second_network_pass(*args, **kwargs):
        raise AssertionError("the Compare dock ran the network outside the store")

    monkeypatch.setattr(predict_dense, "predict_spots", no_second_network_pass)
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
    assert layer.multiscale
    # blocks are computed off the Qt thread; on tissue they fill in
    qtbot.waitUntil(lambda: np.isfinite(np.asarray(layer.data[0])).any(), timeout=TIMEOUT_MS)

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

    # compare: the core evaluation (units, depth factor, metrics) scored on the store's
    # predictions; the network ran once per tile over viewer, regions and compare together
    compare = docks["compare"]
    compare.set_scales([8.0, 16.0])
    assert compare.chosen_scales() == [8.0, 16.0]
    _wait_worker(qtbot, compare.run())
    qtbot.waitUntil(lambda: compare.data is not None, timeout=TIMEOUT_MS)
    assert sorted(embedded) == sorted(set(embedded)), "a tile went through the network twice"
    assert len(embedded) == pred.store.counts()["done"]
    model = load_model(tiny_model)
    measured = load_measured(small_sample.outs, scales_um=[8.0, 16.0], slide=session.slide)

    def from_store(meas, units):
        return _store_predictions(pred, meas, units)

    want = evaluate_measured(model, session.slide, measured, [8.0, 16.0], predict=from_store)
    assert compare.data.result["scales"] == want["scales"]
    assert compare.per_gene("16") == want["genes"]["16"]
    assert compare.table.rowCount() == 6
    # ... which agree with `stmap evaluate` (its own tiled pass) up to float16 embeddings
    monkeypatch.setattr(predict_dense, "predict_spots", cli_predict_spots)
    cli = evaluate_measured(model, session.slide, measured, [8.0, 16.0])
    for key, metrics in cli["scales"].items():
        for name in ("pcc_f", "pcc_s", "pcc_m", "mse", "mae"):
            assert compare.data.result["scales"][key][name] == pytest.approx(
                metrics[name], rel=1e-3, abs=1e-4
            ), (key, name)
    compare.show_layers(gene=compare.data.genes[0], key="16")
    compare.show_layers(gene=compare.data.genes[0], key="16")
    g0 = compare.data.genes[0]
    names = [ly.name for ly in viewer.layers]
    assert names.count(f"stmap: measured {g0}") == 1 and names.count(f"stmap: residual {g0}") == 1
    assert not errors[:-1], errors


def test_spot_grid_rows_sum_like_core(docks, qtbot, small_sample, tiny_model):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.geometry import disks
    from napari_stmap.core.predict import ensure_region

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
    docks["genes"].add_gene(session.model_genes[0])  # starts the heatmap thread too
    qtbot.waitUntil(lambda: bool(docks["genes"].gene_layers()), timeout=TIMEOUT_MS)
    assert any(t.name == "stmap-views" for t in threading.enumerate())
    docks["viewer"].close()
    assert session.closed and session.predictor is None
    assert not pred._worker.is_alive()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("stmap-")]
    assert not alive, alive


# ---------------------------------------------------------------- responsiveness (issue #5)
def _shown(docks, gene: str) -> bool:
    """The heatmap of ``gene`` is on screen with every block it needs computed and drawn."""
    genes, session, name = docks["genes"], docks["session"], f"stmap: {gene}"
    return (
        name in docks["viewer"].layers
        and session.view_worker().pending == 0
        and name not in genes._stale
        and genes._last_refresh.get(name, 0) > 0
        and not genes.views[name]._updated
    )


def test_heatmaps_are_computed_off_the_qt_thread_without_the_network(
    docks, qtbot, small_sample, tiny_model, monkeypatch
):
    from napari_stmap.core import predict as engine
    from napari_stmap.core.predict import live_view

    viewer, session, genes = docks["viewer"], docks["session"], docks["genes"]
    _load(qtbot, docks, small_sample, tiny_model)
    _predict_view(qtbot, docks)
    embedded = _count_embedded(monkeypatch)
    on_qt_thread = []
    real = live_view._view_block

    def spy(*args, **kwargs):
        on_qt_thread.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(live_view, "_view_block", spy)
    g1, g2 = session.model_genes[:2]
    genes.add_gene(g1)
    qtbot.waitUntil(lambda: _shown(docks, g1), timeout=TIMEOUT_MS)
    layer = viewer.layers[f"stmap: {g1}"]
    full = np.asarray(engine.gene_pyramid(session.predictor, g1)[-1])
    with engine.ViewWorker(name="stmap-views-expected") as w:  # the same, glass hidden
        mask = session.predictor.display_mask()
        want = engine.LiveGeneView(session.predictor, g1, worker=w, mask=mask).level_data(-1)
    np.testing.assert_allclose(np.asarray(layer.data[-1]), want, rtol=1e-6, equal_nan=True)
    assert np.isfinite(want).any()
    ok = np.isfinite(want)
    np.testing.assert_allclose(want[ok], full[ok], rtol=1e-6)  # masking only hides
    assert layer.thumbnail[..., :3].max() > 0  # all NaN (not yet computed) would be black

    # the selected heatmap shows another gene: same layer, renamed, in place
    genes.switch_gene(g2)
    qtbot.waitUntil(lambda: _shown(docks, g2), timeout=TIMEOUT_MS)
    assert viewer.layers[f"stmap: {g2}"] is layer and f"stmap: {g1}" not in viewer.layers
    assert layer.metadata["stmap"]["gene"] == g2
    assert [it.text() for it in genes.layer_list.findItems("stmap", Qt.MatchFlag.MatchContains)]
    with engine.ViewWorker(name="stmap-views-expected") as w:
        want = engine.LiveGeneView(session.predictor, g2, worker=w, mask=mask).level_data(-1)
    np.testing.assert_allclose(np.asarray(layer.data[-1]), want, rtol=1e-6, equal_nan=True)
    assert on_qt_thread and not any(on_qt_thread), "a heatmap block was computed on the Qt thread"
    assert not embedded, "switching genes ran the network"
    assert genes.colorbar.limits == tuple(layer.contrast_limits) and g2 in genes.colorbar.label


def test_finished_tiles_refresh_layers_in_view_coalesced(docks, qtbot, small_sample, tiny_model):
    import time

    from napari_stmap._widgets._viewer import camera_of

    viewer, session, genes = docks["viewer"], docks["session"], docks["genes"]
    _load(qtbot, docks, small_sample, tiny_model)
    _predict_view(qtbot, docks)
    gene = session.model_genes[0]
    genes.add_gene(gene)
    qtbot.waitUntil(lambda: _shown(docks, gene), timeout=TIMEOUT_MS)
    rows, cols = np.nonzero(session.predictor.store.done == 1)
    done = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True)]
    assert genes.visible_tiles(done) == done

    # a storm of finished tiles (every 20 ms, 1 s): at most one refresh per REFRESH_MS
    before, t0 = genes.refreshes, time.monotonic()
    for _ in range(50):
        session.tiles_done.emit(done)
        qtbot.wait(20)
    qtbot.waitUntil(lambda: _shown(docks, gene), timeout=TIMEOUT_MS)
    n, elapsed_ms = genes.refreshes - before, (time.monotonic() - t0) * 1e3
    assert 1 <= n <= elapsed_ms / genes.REFRESH_MS + 1, (n, elapsed_ms)

    # tiles out of view: nothing recomputed, no refresh
    camera_of(viewer).center = (-1e6, -1e6)
    assert genes.visible_tiles(done) == []
    before = genes.refreshes
    session.tiles_done.emit(done)
    qtbot.wait(3 * genes.REFRESH_MS)
    assert genes.refreshes == before and session.view_worker().pending == 0


def test_shapes_and_spot_grid_stay_above_heatmaps(docks, qtbot, small_sample, tiny_model):
    viewer, session, genes, regions = (
        docks["viewer"],
        docks["session"],
        docks["genes"],
        docks["regions"],
    )
    _load(qtbot, docks, small_sample, tiny_model)
    regions.regions_layer().add_rectangles(np.array([[50.0, 50.0], [350.0, 450.0]]))
    regions.grid_size.setValue(40.0)
    regions.grid_pitch.setValue(80.0)
    assert regions.make_spot_grid() > 0
    for gene in session.model_genes[:2]:
        genes.add_gene(gene)
    heat = [f"stmap: {g}" for g in session.model_genes[:2]]

    def on_top() -> bool:
        names = [layer.name for layer in viewer.layers]
        if not all(h in names for h in heat):
            return False
        top = min(names.index("stmap: regions"), names.index("stmap: spot grid"))
        return all(names.index(h) < top for h in heat)

    qtbot.waitUntil(on_top, timeout=TIMEOUT_MS)
    assert viewer.layers[-1].name in ("stmap: regions", "stmap: spot grid")
    _wait_worker(qtbot, regions._worker)


def test_predict_shows_a_napari_progress_bar_that_cancels(docks, qtbot, small_sample, tiny_model):
    from napari.utils import cancelable_progress, progress

    session, predict = docks["session"], docks["predict"]
    _load(qtbot, docks, small_sample, tiny_model)
    paused = []
    session.with_predictor(lambda pred: (pred.pause(), paused.append(pred)))
    qtbot.waitUntil(lambda: bool(paused), timeout=TIMEOUT_MS)
    predict.predict_slide()
    qtbot.waitUntil(lambda: predict.pbar is not None, timeout=TIMEOUT_MS)
    pbar = predict.pbar
    assert isinstance(pbar, cancelable_progress) and pbar in progress._all_instances
    assert pbar.total == session.progress()[1] > 0 and pbar.n == session.progress()[0]
    assert predict.cancel_btn.isEnabled()
    pbar.cancel()  # napari's activity dock Cancel button
    qtbot.waitUntil(lambda: predict.pbar is None, timeout=TIMEOUT_MS)
    assert session.predictor.pending == 0 and pbar not in progress._all_instances
    assert "Stopped" in predict.status.text() and not predict.cancel_btn.isEnabled()


def test_a_slide_is_opened_once(docks, qtbot, small_sample, monkeypatch):
    from napari_stmap._widgets import slide_data

    opened = []
    real = slide_data._read_slide
    monkeypatch.setattr(slide_data, "_read_slide", lambda p: opened.append(p) or real(p))
    _wait_worker(qtbot, docks["data"].load_slide(small_sample.slide))
    qtbot.waitUntil(lambda: docks["session"].slide is not None, timeout=TIMEOUT_MS)
    qtbot.wait(500)
    assert len(opened) == 1, opened
