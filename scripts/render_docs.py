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
    viewer.window._qt_window.resize(1400, 900)
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


DOCK_SHOTS = {
    "Slide & data": "dock_slide_data.png",
    "Predict": "dock_predict.png",
    "Genes": "dock_genes.png",
    "Regions": "dock_regions.png",
    "Compare": "dock_compare.png",
}


def render_docks(out: Path) -> None:
    """Each dock in use on the synthetic sample (the demo: trained model, heatmaps, spot grid)."""
    from napari_stmap.demo import build_viewer, wait_until

    viewer = build_viewer(show=True, wait=True)
    viewer.window._qt_window.resize(1500, 950)
    wait_until(lambda: False, 0.5)
    for layer in viewer.layers:
        logger.info("layer %r: extent %s µm", layer.name, layer.extent.world.tolist())
    slide = viewer.layers["synthetic H&E"]
    (y0, x0), (y1, x1) = slide.extent.world
    viewer.camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
    viewer.camera.zoom = 0.9 * min(viewer.canvas.size) / max(y1 - y0, x1 - x0)
    for title, filename in DOCK_SHOTS.items():
        dock = viewer.window._dock_widgets.get(title)
        if dock is not None:
            dock.raise_()
        if title == "Compare":  # show the measured bins of the selected gene beside the heatmaps
            for layer in viewer.layers:
                if layer.name.startswith("stmap: measured "):
                    layer.visible = True
        wait_until(lambda: False, 0.5)
        _save(viewer, out / filename)
    viewer.close()


def render_her2st_docks(out: Path, shared: Path) -> None:
    """HER2ST C2 with a model trained on other sections, when such a model exists."""
    models = (
        sorted((shared / "models").glob("her2st*.safetensors"))
        if (shared / "models").is_dir()
        else []
    )
    if not (shared / "her2st" / "C2").is_dir() or not models:
        logger.warning("skipping HER2ST dock screenshots: no model trained on other sections found")
        return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", choices=["synthetic", "her2st", "docks"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    display = _display()
    try:
        if args.only in (None, "synthetic"):
            render_synthetic(args.out)
        if args.only in (None, "her2st"):
            render_her2st(args.out, args.shared)
        if args.only in (None, "docks"):
            render_docks(args.out)
            render_her2st_docks(args.out, args.shared)
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
