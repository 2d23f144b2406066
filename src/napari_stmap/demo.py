"""The README demo: napari with the synthetic sample, a model trained on it and every dock in use.

Run ``make demo`` (set-up included) or ``python -m napari_stmap.demo``. On first run a small
PixNet is trained on the sample by the project's own training code (a few minutes on 2 CPU
cores, with a progress bar) and cached in the sample cache folder. The viewer then shows the
slide, heatmaps of two marker genes, a grid of 55 µm spots with its table, and the Compare dock
filled in. With ``--screenshot PATH`` the viewer renders once everything is computed, saves a
PNG and exits (used by the docs).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: Small training run for the demo model (2-core CPU: a few minutes).
DEMO_TRAIN = {
    "arch": "pixnet_tiny",
    "genes": "top:24",
    "epochs": 2,
    "tile_px": 128,
    "batch_size": 4,
    "max_batches_per_epoch": 30,
    "bin_um": (8.0, 16.0),
    "seed": 0,
}
MARKERS = ("ERBB2", "CD3E", "COL1A1", "KRT5", "ADIPOQ", "PTPRC")
DOCKS = ("slide_data", "predict", "genes", "regions", "compare", "cells")


def demo_model_path() -> Path:
    """Where the demo model is cached."""
    from . import __version__
    from ._sample_data import cache_dir

    return cache_dir() / f"demo-model-v{__version__}.safetensors"


def ensure_demo_model(sample=None) -> Path:
    """Train the demo model on the synthetic sample once (progress bar); returns its path."""
    from napari.utils import progress

    from ._sample_data import ensure_sample
    from .core.training import TrainConfig, available_threads, train_model

    path = demo_model_path()
    if path.is_file():
        return path
    sample = sample or ensure_sample()
    cfg = TrainConfig(**DEMO_TRAIN, num_threads=available_threads())
    logger.info("training the demo model once (cached in %s)", path)
    tmp = path.with_name(path.stem + ".partial.safetensors")
    with progress(total=cfg.epochs * cfg.max_batches_per_epoch, desc="training demo model") as bar:
        train_model([(sample.slide, sample.outs)], tmp, cfg, progress=lambda info: bar.update(1))
    tmp.rename(path)
    return path


#: Display names of the docks in the manifest (what napari's Plugins menu lists), by key.
DOCK_TITLES = {
    "slide_data": "Slide & data",
    "predict": "Predict",
    "genes": "Genes",
    "regions": "Regions",
    "compare": "Compare",
    "cells": "Cells",
}


def add_docks(viewer) -> dict:
    """Open the six docks as napari's Plugins menu does; returns the widgets by key.

    The first dock sits on the right, the others are tabbed with it.
    """
    docks = {}
    for key in DOCKS:
        _dock, docks[key] = viewer.window.add_plugin_dock_widget(
            "napari-stmap", DOCK_TITLES[key], tabify=key != DOCKS[0]
        )
    return docks


def raise_dock(widget) -> None:
    """Bring the tab of a dock ``widget`` to the front (through its own Qt parents)."""
    from qtpy.QtWidgets import QDockWidget

    node = widget
    while node is not None and not isinstance(node, QDockWidget):
        node = node.parentWidget()
    if node is not None:
        node.raise_()


def wait_until(predicate, timeout: float = 600.0) -> bool:
    """Process Qt events until ``predicate()`` is true (or ``timeout`` seconds pass)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        QApplication.processEvents()
        time.sleep(0.02)
    return True


def fill_demo(viewer, docks, sample, model_path, *, wait: bool = False) -> None:
    """Load the sample and the model, predict, add heatmaps, a spot grid and Compare."""
    import numpy as np

    session = docks["predict"].session
    data = docks["slide_data"]
    # the sample's bins layer (napari's reader) is picked up by the dock; else read them
    if not wait_until(lambda: session.spots is not None and session.slide is not None, 60):
        data.load_spots(sample.outs, bin_um=8.0)
        wait_until(lambda: session.spots is not None and session.slide is not None, 120)
    data.load_model(model_path)
    viewer.reset_view()
    docks["predict"].predict_slide()
    genes = [g for g in MARKERS if g in session.model_genes][:2] or session.model_genes[:2]
    for gene in genes:
        docks["genes"].add_gene(gene)
    h, w = session.slide.shape_yx
    regions = docks["regions"]
    # napari ellipses from two points are (centre, radii), level-0 px here
    regions.regions_layer().add_ellipses(np.array([[0.5 * h, 0.5 * w], [0.2 * h, 0.2 * w]]))
    regions.regions_layer().selected_data = {0}
    regions.make_spot_grid()
    docks["compare"].run()
    if wait:
        wait_until(lambda: session.predictor is not None and session.predictor.pending == 0, 900)
        wait_until(lambda: docks["compare"].data is not None, 900)
        wait_until(lambda: regions.table_data is not None and regions._worker is None, 300)
        for layer in docks["genes"].gene_layers():
            docks["genes"].auto_contrast(layer)
        wait_until(lambda: not docks["genes"]._contrast_workers, 60)
    if docks["compare"].data is not None:
        compare = docks["compare"]
        compare.show_layers(gene=compare.selected_gene(), key=compare.scale_combo.currentText())
        for layer in viewer.layers:
            if layer.name.startswith("stmap: measured") or layer.name.startswith("stmap: residual"):
                layer.visible = False


def build_viewer(show: bool = True, *, wait: bool = False, with_docks: bool = False):
    """Open a napari viewer with the synthetic sample, the docks and the demo model.

    Returns the viewer, or ``(viewer, docks)`` with ``with_docks=True``.
    """
    import napari

    from ._layers import show_scale_bar
    from ._sample_data import ensure_sample

    sample = ensure_sample()
    model_path = ensure_demo_model(sample)
    viewer = napari.Viewer(title="napari-stmap demo", show=show)
    viewer.open_sample("napari-stmap", "synthetic")
    show_scale_bar(viewer)
    docks = add_docks(viewer)
    wait_until(lambda: docks["predict"].session.slide is not None, 120)
    fill_demo(viewer, docks, sample, model_path, wait=wait)
    viewer.reset_view()
    return (viewer, docks) if with_docks else viewer


def main(argv=None) -> int:
    """Command-line entry of the demo."""
    parser = argparse.ArgumentParser(prog="python -m napari_stmap.demo", description=__doc__)
    parser.add_argument("--screenshot", default=None, help="save a PNG of the window and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stmap: %(message)s")
    import napari

    viewer = build_viewer(show=True, wait=bool(args.screenshot))
    if args.screenshot:
        viewer.window.resize(1500, 950)
        wait_until(lambda: False, 1.0)
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
