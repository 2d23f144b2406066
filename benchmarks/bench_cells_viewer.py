"""Is the Cells dock fluid with ~100,000 cells? Load, colour by a gene, navigate, in the real viewer.

Usage::

    .venv/bin/python benchmarks/bench_cells_viewer.py [--work DIR] [--screenshot PNG]

The slide is the 2 × 2 mirrored copy of HER2ST section C2 (19,822 × 18,548 px at 0.687 µm/px,
built by ``bench_predict_memory.mirrored_slide``), its cells a label image of ~93,000 nuclei
(``stmap cells --segment`` keeps it as ``OUT.labels.zarr``) and its prediction store made by
``stmap predict`` with a random-init default PixNet (``bench_predict_memory.default_model``;
weights do not change the cost). Inputs given by ``--slide``/``--model``/``--labels``/``--store``
are reused when they exist (a store only when ``stmap info`` names this slide and model and has
no tile to do); missing ones are built in ``--work`` (~15 min on 2 cores).

napari runs with ``show=True`` under Xvfb (napari renders only when shown) in a 1400 × 900
window, with the Slide & data and Cells docks opened as the Plugins menu opens them. The slide
and the model are loaded through Slide & data (the store is the one the viewer names for them,
a link to the given store) and the label image is chosen as the cells' source for the whole
slide. Measured, with a 10 ms QTimer on the Qt thread (its longest tick gap is the longest time
the Qt thread was blocked):

- "Find cells + expression" → the ``stmap: cells`` Labels layer shown (predictor built, every
  cell's sums read from the store, the label pyramid written for display, in a worker);
- gene chosen in "colour by" → ``stmap: cells GENE`` (per-cell values, looked up lazily from
  the labels) drawn; a second gene (switch);
- navigation: 20 zoom steps from the whole slide to ~0.5 mm across, then 20 pan steps of half
  a view (5 mm) across tissue; each step sets the camera and processes Qt events until the
  canvas swapped a frame and no further frame came for 50 ms. Per step: camera set → last frame
  swapped (``QOpenGLWidget.frameSwapped``). The same path in the mirrored quadrant (same tissue,
  pixels not yet cached) with the cell layers hidden gives the slide-only baseline.

Prints a markdown table with the cell count and the 1-minute load average before / after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict_memory import (  # noqa: E402
    SECTION,
    STMAP,
    default_model,
    mirrored_slide,
    run_stmap,
)
from bench_viewer import virtual_display  # noqa: E402

DEV = Path("/tmp/cells_dev")
QUIET_S = 0.05  # a step ends when no frame came for this long


def _store_matches(store: Path, slide: Path, model: Path) -> bool:
    if not store.exists():
        return False
    out = subprocess.run([*STMAP, "info", "--json", str(store)], capture_output=True, text=True)
    if out.returncode != 0:
        return False
    info = json.loads(out.stdout)
    same = Path(info.get("slide", "")).resolve() == slide.resolve()
    same &= Path(info.get("model", "")).resolve() == model.resolve()
    return same and info.get("tiles", {}).get("todo", 1) == 0


def ensure_inputs(args) -> tuple[Path, Path, Path, Path]:
    """Slide, model, labels and store: the given ones when usable, else built in ``--work``."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    slide, model = args.slide, args.model
    if not slide.exists():
        if not SECTION.exists():
            raise SystemExit(f"skipped: {SECTION} is absent (HER2ST C2; ../shared/data/README.md)")
        print(f"building the 2 × 2 mirrored slide in {work}…", flush=True)
        slide = mirrored_slide(SECTION, work / "C2_mirrored_2x2.ome.tif")
    if not model.exists():
        model = default_model(work / "pixnet_default_random.safetensors")
    store = args.store
    if not _store_matches(store, slide, model):
        store = work / "pred.zarr"
        if not _store_matches(store, slide, model):
            print(f"stmap predict → {store}…", flush=True)
            argv = ["--model", str(model), "--slide", str(slide), "--out", str(store)]
            run_stmap(["predict", *argv])  # resumable: continues a partial store
    labels = args.labels
    if not labels.exists():
        out = work / "cells.h5ad"
        labels = out.with_suffix(".labels.zarr")
        if not labels.exists():
            print(f"stmap cells --segment → {labels}…", flush=True)
            run_stmap(
                ["cells", "--pred", str(store), "--segment", "--out", str(out), "--overwrite"]
            )
    return slide, model, labels, store


class Clock:
    """A 10 ms QTimer (Qt thread blocked = longest gap between ticks) and the canvas' frames."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication, QOpenGLWidget

        self.ticks: list[float] = []
        self.frames: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))
        gl = [w for top in QApplication.topLevelWidgets() for w in top.findChildren(QOpenGLWidget)]
        for w in gl:  # napari's canvas (vispy) is the window's OpenGL widget
            w.frameSwapped.connect(lambda: self.frames.append(time.perf_counter()))
        self.has_canvas = bool(gl)

    def start(self) -> float:
        self.ticks.clear()
        self.timer.start()
        return time.perf_counter()

    def longest_gap_ms(self, t0: float) -> float:
        """Longest Qt gap since ``t0`` (the end counts: a blocked tail is a gap too)."""
        self.timer.stop()
        return float(
            np.diff([t0, *[t for t in self.ticks if t >= t0], time.perf_counter()]).max() * 1e3
        )


def _process(seconds: float, predicate=lambda: False) -> bool:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


def _frame_after(clock: Clock, t: float, timeout: float = 60.0) -> float:
    """Process events until a frame swapped after ``t`` and none for QUIET_S; the last one's time."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        QApplication.processEvents()
        last = clock.frames[-1] if clock.frames else 0.0
        if last > t and time.perf_counter() - last > QUIET_S:
            return last
        time.sleep(0.001)
    return float("nan")


def navigate(viewer, clock: Clock, centre_yx, start_zoom: float, steps: int = 20) -> dict:
    """Zoom whole slide → ~0.5 mm across, then pan 5 mm in half-view steps; per-step ms."""
    camera = viewer.scene.camera
    w_px = float(viewer.canvas.size[1])
    end_zoom = w_px / 500.0  # canvas px per µm: 0.5 mm across
    zooms = np.geomspace(start_zoom, end_zoom, steps + 1)[1:]
    per_step, t0 = [], clock.start()
    camera.center = centre_yx
    for z in zooms:
        t = time.perf_counter()
        camera.zoom = float(z)
        per_step.append((_frame_after(clock, t) - t) * 1e3)
    cy, cx = centre_yx
    for k in range(1, steps + 1):  # half a view per step, 5 mm in all, across the centre
        t = time.perf_counter()
        camera.center = (cy, cx - 2500.0 + k * 250.0)
        per_step.append((_frame_after(clock, t) - t) * 1e3)
    gap = clock.longest_gap_ms(t0)
    a = np.asarray(per_step)
    return {
        "zoom": a[:steps],
        "pan": a[steps:],
        "all": a,
        "gap": gap,
    }


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "stmap-bench-cells-viewer"
    )
    parser.add_argument("--slide", type=Path, default=DEV / "bench" / "C2_mirrored_2x2.ome.tif")
    parser.add_argument(
        "--model", type=Path, default=DEV / "bench" / "pixnet_default_random.safetensors"
    )
    parser.add_argument("--labels", type=Path, default=DEV / "big" / "labels.zarr")
    parser.add_argument("--store", type=Path, default=DEV / "big" / "pred.zarr")
    parser.add_argument("--genes", nargs=2, default=["GENE7", "GENE42"])
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of the viewer, mid zoom")
    parser.add_argument(
        "--profile", action="store_true", help="profile the Qt thread while navigating (cells)"
    )
    args = parser.parse_args(argv)
    slide_path, model_path, labels_path, store = ensure_inputs(args)

    load_before = os.getloadavg()[0]
    display = virtual_display()
    logging.basicConfig(level=logging.WARNING)
    import napari

    from napari_stmap._widgets._session import get_session
    from napari_stmap._widgets.cells import CELLS_LAYER
    from napari_stmap.core.store import store_path_for
    from napari_stmap.demo import raise_dock

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    camera = viewer.scene.camera
    _dock, data = viewer.window.add_plugin_dock_widget("napari-stmap", "Slide & data")
    _dock, cells = viewer.window.add_plugin_dock_widget("napari-stmap", "Cells", tabify=True)
    raise_dock(cells)
    session = get_session(viewer)
    root = args.work / "viewer-stores"
    root.mkdir(parents=True, exist_ok=True)
    link = store_path_for(slide_path, model_path, root)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(store.resolve(), target_is_directory=True)  # the viewer finds the store
    session.store_root = root
    _process(2.0)
    clock = Clock()
    assert clock.has_canvas, "no OpenGL canvas found: napari is not shown"

    t0 = time.perf_counter()
    worker = data.load_slide(slide_path)
    _process(300, lambda: session.slide is not None and (worker is None or not worker.is_running))
    data.load_model(model_path)
    viewer.reset_view()
    _frame_after(clock, t0)
    t_slide = time.perf_counter() - t0

    cells.set_source("labels", path=labels_path)
    cells.extent.setCurrentIndex(1)  # whole slide
    ready: dict[str, float] = {}
    session.changed.connect(
        lambda what: (
            ready.setdefault("predictor", time.perf_counter()) if what == "predictor" else None
        )
    )
    t0 = clock.start()
    cells.run()
    _process(1800, lambda: CELLS_LAYER in viewer.layers and cells.run_btn.isEnabled())
    shown = _frame_after(clock, t0)
    gap_run = clock.longest_gap_ms(t0)
    t_run = shown - t0
    t_pred = ready.get("predictor", t0) - t0
    n = cells.cells.table.n
    labels_layer = viewer.layers[CELLS_LAYER]

    colour = []
    for gene in args.genes:  # the run showed the combo's first gene: another one, then a switch
        name = f"{CELLS_LAYER} {gene}"
        t0 = clock.start()
        cells.gene.setCurrentText(gene)  # as a user picks it: the combo's "activated" signal
        cells.gene.activated.emit(cells.gene.currentIndex())
        _process(120, lambda nm=name: nm in viewer.layers)
        shown = _frame_after(clock, t0)
        colour.append(((shown - t0) * 1e3, clock.longest_gap_ms(t0)))
        layer = viewer.layers[name]
        top = np.asarray(layer.data[-1] if layer.multiscale else layer.data)
        assert np.isfinite(top).any(), f"{name} shows no values"

    h, w = session.slide.shape_yx
    mpp = session.mpp
    viewer.reset_view()
    _frame_after(clock, time.perf_counter())
    whole_zoom = float(camera.zoom)
    # tissue centre of the top-left copy; its mirror image in the bottom-right copy for the baseline
    centre = (0.25 * h * mpp, 0.27 * w * mpp)
    mirror = ((h - 1) * mpp - centre[0], (w - 1) * mpp - centre[1])
    profile = None
    if args.profile:  # where the Qt thread's time goes while navigating with the cells
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    nav_cells = navigate(viewer, clock, centre, whole_zoom)
    if profile is not None:
        import pstats

        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
    if args.screenshot is not None:
        camera.center = centre
        camera.zoom = float(viewer.canvas.size[1]) / 2500.0  # ~2.5 mm across
        _frame_after(clock, time.perf_counter())
        _process(1.0)
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.screenshot), canvas_only=False)
    hidden = [ly for ly in viewer.layers if ly.name.startswith(CELLS_LAYER)]
    for ly in hidden:
        ly.visible = False
    viewer.reset_view()
    _frame_after(clock, time.perf_counter())
    nav_slide = navigate(viewer, clock, mirror, whole_zoom)
    load_after = os.getloadavg()[0]

    def stats(a) -> str:
        return f"{np.median(a):.0f} / {np.percentile(a, 99):.0f} / {a.max():.0f}"

    print(f"\nslide {slide_path.name} ({h:,} × {w:,} px at {mpp} µm/px), labels {labels_path}")
    print(
        f"cells: {n:,}; Labels layer levels: {len(cells.cells.levels)} (level 0 {labels_layer.data[0].shape})"
    )
    print("\n| measure | with cells | slide only (baseline) |\n|---|---:|---:|")
    rows = [
        ("cells", f"{n:,}", ""),
        ("slide + model loaded (Slide & data) → slide drawn", f"{t_slide:.1f} s", ""),
        ("'Find cells + expression' (whole slide) → Labels layer drawn", f"{t_run:.1f} s", ""),
        ("… of which building the predictor", f"{t_pred:.1f} s", ""),
        ("longest Qt gap meanwhile", f"{gap_run:.0f} ms", ""),
        (f"colour by {args.genes[0]} → values drawn", f"{colour[0][0]:.0f} ms", ""),
        (f"switch to {args.genes[1]} → values drawn", f"{colour[1][0]:.0f} ms", ""),
        (
            "longest Qt gap while colouring / switching",
            f"{max(colour[0][1], colour[1][1]):.0f} ms",
            "",
        ),
        (
            "zoom steps: camera → frame, median / p99 / max ms",
            stats(nav_cells["zoom"]),
            stats(nav_slide["zoom"]),
        ),
        (
            "pan steps: camera → frame, median / p99 / max ms",
            stats(nav_cells["pan"]),
            stats(nav_slide["pan"]),
        ),
        ("all 40 steps, median / p99 / max ms", stats(nav_cells["all"]), stats(nav_slide["all"])),
        (
            "steps over 200 ms",
            f"{int((nav_cells['all'] > 200).sum())} of 40",
            f"{int((nav_slide['all'] > 200).sum())} of 40",
        ),
        (
            "longest Qt gap while navigating",
            f"{nav_cells['gap']:.0f} ms",
            f"{nav_slide['gap']:.0f} ms",
        ),
        ("1-min load average before / after", f"{load_before:.2f} / {load_after:.2f}", ""),
    ]
    for row in rows:
        print("| " + " | ".join(row) + " |")
    ratio = np.median(nav_cells["all"]) / np.median(nav_slide["all"])
    print(f"\nratio median step with cells / slide only: {ratio:.2f}")
    session.close()
    viewer.close()
    if display is not None:
        display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
