"""Render the documentation screenshots from the real napari viewer.

Usage::

    .venv/bin/python scripts/render_docs.py [--out docs/images] [--shared ../shared/data]

Starts a virtual X display (Xvfb, via pyvirtualdisplay) when no ``$DISPLAY`` is set; napari
renders only with ``show=True`` under Xvfb (``QT_QPA_PLATFORM=offscreen`` has no OpenGL).
HER2ST screenshots are skipped when ``../shared/data`` is absent.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger("render_docs")
REPO = Path(__file__).resolve().parents[1]


def _display():
    if os.environ.get("DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(1600, 1000), color_depth=24)
    display.start()
    return display


def _viewer():
    import napari

    from napari_stmap._layers import show_scale_bar

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    show_scale_bar(viewer)
    return viewer


def _save(viewer, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False)
    logger.info("wrote %s", path)


def render_synthetic(out: Path) -> None:
    """The synthetic sample: slide with its measured 8 µm bins (total counts)."""
    from napari_stmap._sample_data import ensure_sample

    ensure_sample()
    viewer = _viewer()
    viewer.open_sample("napari-stmap", "synthetic")
    viewer.reset_view()
    _save(viewer, out / "synthetic_bins_8um.png")
    bins = viewer.layers[-1]
    # zoom to a 300 µm window in the middle to show single bins
    cy, cx = (s / 2 for s in viewer.layers[0].extent.world[1])
    viewer.camera.center = (cy, cx)
    viewer.camera.zoom = viewer.camera.zoom * 5
    bins.opacity = 0.5
    _save(viewer, out / "synthetic_bins_8um_zoom.png")
    viewer.close()


def render_her2st(out: Path, shared: Path) -> None:
    """HER2ST section C2: the H&E with its 100 µm ST spots (total counts)."""
    c2 = shared / "her2st" / "C2"
    if not c2.is_dir():
        logger.warning("skipping HER2ST screenshot: %s not found", c2)
        return
    viewer = _viewer()
    viewer.open(str(c2 / "he.ome.tif"), plugin="napari-stmap")
    layers = viewer.open(str(c2 / "spots.h5ad"), plugin="napari-stmap")
    for layer in layers:  # the h5ad's own hires image duplicates the slide
        if "image" in layer.name:
            layer.visible = False
    viewer.reset_view()
    _save(viewer, out / "her2st_c2_spots.png")
    viewer.close()


def _pump(seconds: float) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def _plugin_submenu(viewer):
    """napari's Plugins menu and its napari-stmap submenu (public ``plugins_menu``)."""
    menu = viewer.window.plugins_menu
    menu.aboutToShow.emit()  # napari fills the menu when it is about to show
    action = next(a for a in menu.actions() if a.menu() is not None and a.text() == "napari-stmap")
    action.menu().aboutToShow.emit()
    return menu, action


def render_plugins_menu(out: Path) -> None:
    """The docks opened by clicking Plugins → napari-stmap → each entry, with the menu open."""
    from qtpy.QtWidgets import QApplication, QDockWidget

    from napari_stmap._sample_data import ensure_sample

    sample = ensure_sample()
    viewer = _viewer()
    viewer.open(str(sample.slide), plugin="napari-stmap")
    menu, action = _plugin_submenu(viewer)
    for entry in action.menu().actions():  # what a click on each entry does
        entry.trigger()
        _pump(0.3)
    docks = []
    for widget in viewer.window.dock_widgets.values():
        node = widget
        while node is not None and not isinstance(node, QDockWidget):
            node = node.parentWidget()
        if node is not None:
            docks.append(node)
    for dock in docks[1:]:  # one tab each, as a user would arrange them
        docks[0].parentWidget().tabifyDockWidget(docks[0], dock)
    docks[0].raise_()
    _pump(0.3)
    viewer.window.resize(1400, 900)
    _pump(0.3)
    viewer.reset_view()
    _pump(0.5)
    bar = viewer.window.main_menu
    menu.popup(bar.mapToGlobal(bar.actionGeometry(menu.menuAction()).bottomLeft()))
    menu.setActiveAction(action)
    _pump(0.3)
    action.menu().popup(menu.mapToGlobal(menu.actionGeometry(action).topRight()))
    _pump(0.8)
    g = bar.window().frameGeometry().intersected(QApplication.primaryScreen().geometry())
    shot = QApplication.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
    shot.save(str(out / "plugins_menu.png"))
    logger.info("wrote %s", out / "plugins_menu.png")
    action.menu().close()
    menu.close()
    viewer.close()


DOCK_SHOTS = {
    "slide_data": "dock_slide_data.png",
    "predict": "dock_predict.png",
    "genes": "dock_genes.png",
    "regions": "dock_regions.png",
    "compare": "dock_compare.png",
}


def render_docks(out: Path) -> None:
    """Each dock in use on the synthetic sample (the demo: trained model, heatmaps, spot grid)."""
    from napari_stmap.demo import build_viewer, raise_dock, wait_until

    viewer, docks = build_viewer(show=True, wait=True, with_docks=True)
    viewer.window.resize(1500, 950)
    wait_until(lambda: False, 0.5)
    for layer in viewer.layers:
        logger.info("layer %r: extent %s µm", layer.name, layer.extent.world.tolist())
    slide = viewer.layers["synthetic H&E"]
    (y0, x0), (y1, x1) = slide.extent.world
    viewer.camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
    viewer.camera.zoom = 0.9 * min(viewer.canvas.size) / max(y1 - y0, x1 - x0)
    for key, filename in DOCK_SHOTS.items():
        raise_dock(docks[key])
        if key == "compare":  # show the measured bins of the selected gene beside the heatmaps
            for layer in viewer.layers:
                if layer.name.startswith("stmap: measured "):
                    layer.visible = True
        wait_until(lambda: False, 0.5)
        _save(viewer, out / filename)
    viewer.close()


def _truth_outline(sample, cell_type: str, level: float):
    """Outline (n, 2) level-0 px (y, x) of the largest patch where ``cell_type``'s smoothed
    truth abundance exceeds ``level`` (a region drawn from the synthetic truth)."""
    import numpy as np
    import zarr
    from scipy import ndimage
    from skimage.measure import find_contours

    from napari_stmap.core.synthetic import CELL_TYPES, TRUTH_GRID_UM

    k = CELL_TYPES.index(cell_type)
    abundance = np.asarray(zarr.open_group(str(sample.truth), mode="r")["abundance"][k], float)
    smooth = ndimage.gaussian_filter(abundance, 8.0 / TRUTH_GRID_UM)
    ring = max(find_contours(np.pad(smooth, 1), level), key=len)
    return (ring[:-1] - 0.5) * TRUTH_GRID_UM / sample.mpp


def render_contrast(out: Path) -> None:
    """Regions dock, "Compare two regions": tumour nests vs stroma of the synthetic sample
    (regions drawn from its truth), demo model, 16 µm squares; ranked table and volcano."""
    from napari_stmap._sample_data import ensure_sample
    from napari_stmap.demo import add_docks, ensure_demo_model, raise_dock, wait_until

    sample = ensure_sample()
    viewer = _viewer()
    viewer.window.resize(1500, 1350)  # the Regions dock with its comparison is tall
    viewer.open_sample("napari-stmap", "synthetic")
    docks = add_docks(viewer)
    session = docks["predict"].session
    wait_until(lambda: session.slide is not None, 120)
    docks["slide_data"].load_model(ensure_demo_model(sample))
    regions = docks["regions"]
    layer = regions.regions_layer()
    for cell_type, level, name in (("tumour", 0.5, "Tumour nests"), ("fibroblast", 0.2, "Stroma")):
        layer.add_polygons([_truth_outline(sample, cell_type, level)])
        layer.features.loc[layer.nshapes - 1, "name"] = name
    layer.edge_width = 8.0  # level-0 px: the outlines show over the heatmap
    section = regions.contrast
    section.setChecked(True)  # unfold "Compare two regions"
    section.refresh_regions()
    section.a_combo.setCurrentText("Tumour nests")
    section.b_combo.setCurrentText("Stroma")
    section.unit_size.setValue(16.0)
    section.run()
    wait_until(lambda: section.result is not None and section.run_btn.isEnabled(), 900)
    if section.result is None:
        logger.warning("skipping the contrast screenshot: the comparison did not finish")
        viewer.close()
        return
    section.show_gene(section.table.gene_at(0))
    wait_until(lambda: not docks["genes"]._contrast_workers, 60)
    for key in ("spots", "bins"):
        for ly in viewer.layers:
            if key in ly.name and "stmap" not in ly.name:
                ly.visible = False
    viewer.reset_view()
    raise_dock(regions)
    wait_until(lambda: False, 1.0)
    _save(viewer, out / "dock_contrast.png")
    viewer.close()


#: Genes shown on HER2ST when the model has them (ERBB2 first: the tumour should light up).
HER2ST_GENES = ("ERBB2", "MUC1", "COL1A1", "CD74", "KRT19", "FASN")


def her2st_model(shared: Path, given: Path | None) -> Path | None:
    """A model trained on HER2ST sections other than C2 (``--her2st-model`` first)."""
    candidates = [given] if given else []
    candidates += [
        # benchmarks/her2st_loso.py --folds C2 --out ../bench_her2st…: trained on C3–C5
        *sorted(
            REPO.parent.glob("bench_her2st*/test_C2/pixnet.safetensors"),
            key=lambda p: p.stat().st_mtime,
            reverse=True,  # the newest finished run
        ),
        *sorted((shared / "models").glob("her2st*.safetensors")),
    ]
    return next((p for p in candidates if p is not None and Path(p).is_file()), None)


def render_her2st_docks(out: Path, shared: Path, model: Path | None = None) -> None:
    """HER2ST C2 in every dock, with a PixNet trained on C3–C5 (C2 never seen in training).

    The model comes from ``--her2st-model`` or the leave-one-section-out benchmark's fold C2
    (``benchmarks/her2st_loso.py --folds C2 --out ../bench_her2st``, file
    ``test_C2/pixnet.safetensors``).
    """
    import numpy as np

    from napari_stmap.demo import add_docks, raise_dock, wait_until

    c2 = shared / "her2st" / "C2"
    model = her2st_model(shared, model)
    if not c2.is_dir() or model is None:
        logger.warning("skipping HER2ST dock screenshots: no slide or no model trained on C3–C5")
        return
    logger.info("HER2ST docks with model %s", model)
    viewer = _viewer()
    viewer.window.resize(1500, 950)
    docks = add_docks(viewer)
    session = docks["predict"].session
    docks["slide_data"].load_slide(c2 / "he.ome.tif")
    wait_until(lambda: session.slide is not None, 120)
    docks["slide_data"].load_spots(c2 / "spots.h5ad")
    wait_until(lambda: session.spots is not None, 120)
    docks["slide_data"].load_model(model)
    viewer.reset_view()
    docks["predict"].predict_slide()
    wait_until(lambda: session.predictor is not None and session.predictor.pending == 0, 1800)
    genes = [g for g in HER2ST_GENES if g in session.model_genes][:2]
    for gene in genes:
        docks["genes"].add_gene(gene)
    for layer in docks["genes"].gene_layers():
        docks["genes"].auto_contrast(layer)
    wait_until(lambda: not docks["genes"]._contrast_workers, 120)
    # a region over the middle of the measured spots, and a 55 µm spot grid inside it
    centres = session.spots.centers_yx
    lo, hi = np.percentile(centres, 30, axis=0), np.percentile(centres, 70, axis=0)
    regions = docks["regions"]
    layer = regions.regions_layer()
    layer.add_ellipses(np.array([(lo + hi) / 2, (hi - lo) / 2]))
    layer.selected_data = {0}
    regions.make_spot_grid()
    wait_until(lambda: regions.table_data is not None and regions._worker is None, 600)
    compare = docks["compare"]
    compare.run()
    wait_until(lambda: compare.data is not None, 900)
    if compare.data is not None:
        compare.show_layers(gene=genes[0] if genes else None, key=compare.scale_combo.currentText())
    for layer in viewer.layers:  # measured spots beside the heatmaps only in the Compare shot
        if layer.name.startswith(("stmap: measured", "stmap: residual")):
            layer.visible = False
    viewer.reset_view()
    for key, filename in DOCK_SHOTS.items():
        raise_dock(docks[key])
        if key == "compare":
            for layer in viewer.layers:
                if layer.name.startswith("stmap: measured "):
                    layer.visible = True
        wait_until(lambda: False, 0.5)
        _save(viewer, out / f"her2st_{filename}")
    viewer.close()


#: Genes shown from the SpatialData export (napari-spatialdata screenshot).
SPATIALDATA_GENE = "COL1A1"


def _stmap_cli(*argv) -> None:
    """Run ``stmap`` as a process (the commands the user guide shows)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "napari_stmap.cli", *map(str, argv)], check=True)


def render_spatialdata(out: Path) -> None:
    """napari-spatialdata showing our gene map over the H&E, both read from the file that
    ``stmap export --format spatialdata`` wrote (demo model on the synthetic sample)."""
    import tempfile

    import numpy as np
    import spatialdata as sd
    from napari_spatialdata import Interactive

    from napari_stmap._sample_data import ensure_sample
    from napari_stmap.demo import ensure_demo_model, wait_until

    sample = ensure_sample()
    model = ensure_demo_model(sample)
    work = Path(tempfile.mkdtemp(prefix="stmap-spatialdata-"))
    _stmap_cli("predict", "--model", model, "--slide", sample.slide, "--out", work / "pred.zarr")
    export = work / "pred_sd.zarr"
    _stmap_cli(
        "export", "--pred", work / "pred.zarr", "--format", "spatialdata", export,
        "--genes", f"{SPATIALDATA_GENE},GRB7,CD3E",
    )  # fmt: skip
    viewer = _viewer()
    interactive = Interactive(sd.read_zarr(export), headless=True)
    for element in ("he_image", "gene_maps"):
        n = len(viewer.layers)
        interactive.add_element(element, "global")
        wait_until(lambda n=n: len(viewer.layers) > n, 120)
    for layer in viewer.layers:
        logger.info("layer %r: extent %s", layer.name, layer.extent.world.tolist())
    genes = viewer.layers[-1]
    if genes.ndim == 3:  # the channel axis (genes) is a slider: show the first gene
        viewer.dims.set_current_step(0, 0)
    coarse = genes.data[-1] if genes.multiscale else genes.data
    values = np.asarray(coarse[0], dtype=float)
    lo, hi = np.nanpercentile(values, [2, 99.5])
    genes.contrast_limits = (float(lo), float(hi))
    genes.colormap, genes.blending, genes.opacity = "magma", "translucent", 0.6
    logger.info("%s (normalised) shown from %.2f to %.2f", SPATIALDATA_GENE, lo, hi)
    viewer.reset_view()
    wait_until(lambda: False, 1.0)
    _save(viewer, out / "spatialdata_napari.png")
    viewer.close()


def render_cells(out: Path) -> None:
    """Cells dock: built-in nuclei grown by 3 µm in a zoomed view of the synthetic sample,
    coloured by a marker gene's per-cell predicted expression (demo model), outlines on top."""
    from napari_stmap._sample_data import ensure_sample
    from napari_stmap.demo import add_docks, ensure_demo_model, raise_dock, wait_until

    sample = ensure_sample()
    viewer = _viewer()
    viewer.window.resize(1500, 950)
    viewer.open_sample("napari-stmap", "synthetic")
    docks = add_docks(viewer)
    session = docks["predict"].session
    wait_until(lambda: session.slide is not None, 120)
    docks["slide_data"].load_model(ensure_demo_model(sample))
    for layer in viewer.layers:
        if "bins" in layer.name or "spots" in layer.name:
            layer.visible = False
    cells = docks["cells"]
    raise_dock(cells)
    slide = viewer.layers["synthetic H&E"]
    (y0, x0), (y1, x1) = slide.extent.world
    viewer.camera.center = (y0 + 0.45 * (y1 - y0), x0 + 0.45 * (x1 - x0))
    viewer.camera.zoom = min(viewer.canvas.size) / 320.0  # about 320 µm across
    cells.set_source("segment")
    cells.expand.setValue(3.0)
    cells.run()
    wait_until(lambda: cells.cells is not None and cells.run_btn.isEnabled(), 900)
    if cells.cells is None:
        logger.warning("skipping the cells screenshot: the run did not finish")
        viewer.close()
        return
    markers = [g for g in ("ERBB2", "KRT5", "CD3E", "COL1A1") if g in session.model_genes]
    gene = (markers or session.model_genes)[0]
    cells.gene.setCurrentText(gene)
    cells.show_gene(gene)
    wait_until(lambda: False, 1.5)
    _save(viewer, out / "dock_cells.png")
    viewer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--only",
        choices=["synthetic", "her2st", "docks", "menu", "cells", "contrast", "spatialdata"],
        default=None,
    )
    parser.add_argument(
        "--her2st-model", type=Path, default=None, help="PixNet trained on HER2ST C3–C5"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    display = _display()
    try:
        if args.only in (None, "synthetic"):
            render_synthetic(args.out)
        if args.only in (None, "her2st"):
            render_her2st(args.out, args.shared)
            render_her2st_docks(args.out, args.shared, args.her2st_model)
        if args.only in (None, "menu"):
            render_plugins_menu(args.out)
        if args.only in (None, "docks"):
            render_docks(args.out)
        if args.only in (None, "cells"):
            render_cells(args.out)
        if args.only in (None, "contrast"):
            render_contrast(args.out)
        if args.only in (None, "spatialdata"):
            render_spatialdata(args.out)
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
