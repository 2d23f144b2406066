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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--only", choices=["synthetic", "her2st"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    display = _display()
    try:
        if args.only in (None, "synthetic"):
            render_synthetic(args.out)
        if args.only in (None, "her2st"):
            render_her2st(args.out, args.shared)
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
