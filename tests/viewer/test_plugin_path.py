"""The user's path through napari: reader, Plugins menu docks, the whole journey.

Everything here goes through napari's own plugin machinery (``viewer.open(...,
plugin="napari-stmap")``, ``viewer.window.add_plugin_dock_widget``), so the docks receive the
``PublicOnlyProxy`` of the viewer that napari gives plugins. napari's private-attribute
``FutureWarning`` is an error in this module: any private access by the plugin fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("error:Private attribute access:FutureWarning")

PLUGIN = "napari-stmap"
TIMEOUT_MS = 60_000


def _display_names() -> list[str]:
    """Widget display names from the installed manifest (what the Plugins menu lists)."""
    import npe2

    manifest = npe2.PluginManifest.from_distribution(PLUGIN)  # the installed entry point
    return [w.display_name for w in manifest.contributions.widgets]


@pytest.fixture(autouse=True)
def no_private_access(monkeypatch):
    """Fail on any private attribute the plugin reads through napari's viewer proxy.

    The ``filterwarnings`` mark alone is not enough: napari's thread workers switch warnings
    to "always" process-wide while they run, so a private access during a worker would only
    warn. This records every access however the filters stand.
    """
    from napari.utils._proxies import PublicOnlyProxy

    seen: list[str] = []
    real = PublicOnlyProxy._private_attr_warning

    def record(name: str, typ: str) -> None:
        seen.append(f"{typ}.{name}")
        real(name, typ)

    monkeypatch.setattr(PublicOnlyProxy, "_private_attr_warning", staticmethod(record))
    yield
    assert not seen, f"private napari attributes used by the plugin: {sorted(set(seen))}"


@pytest.fixture(scope="module")
def tiny_model(make_model_file):
    """A random-init pixnet_tiny on 6 of the sample's genes, saved as a model file."""
    return make_model_file(6)


@pytest.fixture
def errors(monkeypatch):
    """Messages passed to napari's ``show_error``."""
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    """A napari viewer; prediction stores go under ``tmp_path`` (``$STMAP_CACHE``)."""
    monkeypatch.setenv("STMAP_CACHE", str(tmp_path / "cache"))
    return make_napari_viewer()


def _add(viewer, name: str):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _wait_worker(qtbot, worker) -> None:
    if worker is not None:
        qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT_MS)


def test_manifest_lists_six_docks():
    assert _display_names() == ["Slide & data", "Predict", "Genes", "Regions", "Compare", "Cells"]


def test_every_dock_opens_from_the_plugins_menu_in_any_order(viewer, qtbot, errors):
    names = _display_names()
    widgets = {name: _add(viewer, name) for name in reversed(names)}
    sessions = {id(w.session) for w in widgets.values()}
    assert len(sessions) == 1, "the docks of one viewer share one session"
    # close one and open it again: the new dock joins the same session and sees its state
    session = widgets["Genes"].session
    viewer.window.remove_dock_widget(widgets["Genes"])
    again = _add(viewer, "Genes")
    assert again.session is session and not session.closed
    assert not errors


def test_plugins_menu_entries_open_the_docks(viewer, qtbot, errors):
    """Click (trigger) each entry of Plugins → napari-stmap, as the user does."""
    menu = viewer.window.plugins_menu
    menu.aboutToShow.emit()  # napari fills the menu when it is about to show
    (sub,) = [a.menu() for a in menu.actions() if a.menu() and a.text() == PLUGIN]
    sub.aboutToShow.emit()
    entries = [a for a in sub.actions() if a.text()]
    assert [a.text().replace("&&", "&") for a in entries] == _display_names()
    for entry in entries:
        entry.trigger()
    widgets = list(viewer.window.dock_widgets.values())
    assert len(widgets) == 6
    assert len({id(w.session) for w in widgets}) == 1
    entries[0].trigger()  # a second click does not open a second copy
    assert len(viewer.window.dock_widgets) == 6
    assert not errors


def test_session_closes_with_the_window(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _add(viewer, "Predict")
    session = widget.session
    assert not session.closed
    viewer.close()
    assert session.closed


def test_journey_from_the_plugins_menu(viewer, qtbot, small_sample, tiny_model, tmp_path, errors):
    """Open slide + Space Ranger folder, docks, model, predict, heatmaps, region, export, compare."""
    import anndata as ad

    slide_layers = viewer.open(small_sample.slide, plugin=PLUGIN)
    assert len(slide_layers) == 1 and slide_layers[0].rgb
    measured = viewer.open(str(small_sample.outs), plugin=PLUGIN)
    assert measured and (measured[-1].metadata["stmap"]["kind"] == "spots")
    docks = {name: _add(viewer, name) for name in _display_names()}
    data, predict, genes = docks["Slide & data"], docks["Predict"], docks["Genes"]
    regions, compare = docks["Regions"], docks["Compare"]
    session = data.session

    # the dock takes the slide and the bins that napari's reader opened
    qtbot.waitUntil(
        lambda: session.slide is not None and session.spots is not None, timeout=TIMEOUT_MS
    )
    assert session.slide.mpp == 0.5
    assert data.load_model(tiny_model)
    viewer.reset_view()

    # predict what is in view
    predict.predict_view()
    qtbot.waitUntil(
        lambda: session.predictor is not None and bool(session.goal), timeout=TIMEOUT_MS
    )

    def finished():
        done, total = session.progress()
        return session.predictor.pending == 0 and done == total > 0

    qtbot.waitUntil(finished, timeout=TIMEOUT_MS)

    # two gene heatmaps that fill in
    picked = session.model_genes[:2]
    for gene in picked:
        genes.add_gene(gene)
    for gene in picked:
        qtbot.waitUntil(lambda g=gene: f"stmap: {g}" in viewer.layers, timeout=TIMEOUT_MS)
        layer = viewer.layers[f"stmap: {gene}"]
        qtbot.waitUntil(
            lambda ly=layer: np.isfinite(np.asarray(ly.data[0])).any(), timeout=TIMEOUT_MS
        )

    # draw a polygon (level-0 px, (y, x)) -> a table row, then export .h5ad
    regions.draw_btn.click()
    shapes = regions.regions_layer(create=False)
    assert shapes is not None and shapes.mode == "add_rectangle"
    poly = np.array([[60.0, 60.0], [60.0, 400.0], [500.0, 400.0], [500.0, 60.0]])
    shapes.add_polygons([poly])
    qtbot.waitUntil(lambda: regions.table_data is not None, timeout=TIMEOUT_MS)
    assert regions.table.rowCount() == 1
    assert regions.table.columnCount() > 2
    assert float(regions.table.item(0, 2).text()) >= 0.0
    out = regions.export(tmp_path / "regions.h5ad")
    assert out is not None
    back = ad.read_h5ad(out)
    assert back.n_obs == 1 and back.n_vars == len(session.model_genes)
    np.testing.assert_allclose(back.X, regions.table_data.counts[:, :-1], rtol=1e-6)
    np.testing.assert_allclose(back.obs["area_um2"], [440 * 340 * 0.25])

    # Compare at 8 and 16 µm against the measured bins
    compare.set_scales([8.0, 16.0])
    _wait_worker(qtbot, compare.run())
    qtbot.waitUntil(lambda: compare.data is not None, timeout=TIMEOUT_MS)
    assert set(compare.data.result["scales"]) == {"8", "16"}
    assert compare.table.rowCount() == len(session.model_genes)
    assert not errors, errors


def test_reading_measured_data_twice_keeps_one_layer(viewer, qtbot, small_sample, errors):
    data = _add(viewer, "Slide & data")
    for bin_um in (8.0, 16.0):
        worker = data.load_spots(small_sample.outs, bin_um=bin_um)
        _wait_worker(qtbot, worker)
        qtbot.waitUntil(lambda b=bin_um: getattr(data.session.spots, "bin_um", None) == b)
    names = [ly.name for ly in viewer.layers if ly.name.startswith("stmap: measured")]
    assert names == ["stmap: measured total counts"]
    assert not errors
