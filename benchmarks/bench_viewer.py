"""Viewer responsiveness while the network runs, and the cost of switching genes.

Usage::

    .venv/bin/python benchmarks/bench_viewer.py [--timeout 600]

Opens napari (under Xvfb when no display is set) with the Slide & data, Predict and Genes docks
on the synthetic sample and a random-init ``pixnet_tiny`` (the network's speed does not matter
here, only that it runs), then measures:

- the longest gap between ticks of a 10 ms QTimer on the Qt thread while the whole slide is
  predicted in the predictor's threads with a heatmap layer on screen (goal: at most 100 ms);
- the time from asking for another gene to its heatmap layer showing the gene's values: layer
  added, its visible blocks computed off the Qt thread from the cached embeddings (the network
  does not rerun) and the layer refreshed with them; and the longest Qt gap meanwhile;
- the time one refresh of a heatmap layer takes on the Qt thread.

With ``--first-pixels`` it measures instead the time from "Predict view" to the first non-NaN
heatmap pixel handed to napari to draw, with the default PixNet architecture (ResNet-18,
random init: the speed does not depend on the weights) on HER2ST C2 (``../shared/data``; the
synthetic sample when absent), zoomed to ~1.2 mm of tissue at the slide's centre, the predictor
already built (a gene layer was added, as a user does), each run on a fresh store. A/B in one
run, alternating: small preview tiles first (the default on a CPU) against regular tiles only
(``DEFAULT_PREVIEW_TILES = 0``, the behaviour before issue 14)::

    .venv/bin/python benchmarks/bench_viewer.py --first-pixels [--repeats 3]

The CPU is often shared: the 1-minute load average before and after is printed with the table.
The script also runs on a checkout from before issue #5 (heatmaps as dask arrays computed on the
Qt thread), for a before/after in the same conditions::

    git archive <commit> src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_viewer.py
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def virtual_display():
    """A started virtual X display (Xvfb) when there is no display, else None (napari needs
    OpenGL, and draws only when shown; ``QT_QPA_PLATFORM=offscreen`` has none)."""
    if os.environ.get("DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(1600, 1000), color_depth=24)
    display.start()
    return display


def _run(seconds_max: float, predicate) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds_max
    while not predicate() and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.001)


def main(argv=None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--first-pixels", action="store_true", help="time click -> first pixel")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.first_pixels:
        return first_pixels(args.repeats)
    load_before = os.getloadavg()[0]
    display = virtual_display()
    logging.basicConfig(level=logging.WARNING)
    import napari
    import torch
    from qtpy.QtCore import QTimer

    from napari_stmap._sample_data import ensure_sample
    from napari_stmap._widgets._session import get_session
    from napari_stmap._widgets.genes import GenesWidget
    from napari_stmap._widgets.predict import PredictWidget
    from napari_stmap._widgets.slide_data import SlideDataWidget
    from napari_stmap.core.model import create_model, save_model

    sample = ensure_sample()
    tmp = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(sample.genes[:24]))
    save_model(model, tmp / "tiny.safetensors")

    viewer = napari.Viewer(show=False)
    session = get_session(viewer)
    session.store_root = tmp / "stores"
    data, predict, genes = SlideDataWidget(viewer), PredictWidget(viewer), GenesWidget(viewer)
    worker = data.load_slide(sample.slide) if session.slide is None else None
    _run(180, lambda: session.slide is not None and (worker is None or not worker.is_running))
    data.load_model(tmp / "tiny.safetensors")
    viewer.reset_view()

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    genes.add_gene(sample.genes[0])
    _run(60, lambda: bool(genes.gene_layers()))
    _run(0.5, lambda: False)  # the new layer settles (contrast, colour bar)
    t0 = time.perf_counter()
    predict.predict_slide()
    _run(300, lambda: session.predictor is not None and bool(session.goal))
    _run(
        args.timeout,
        lambda: session.predictor.pending == 0 and session.progress()[0] == session.progress()[1],
    )
    t_pred = time.perf_counter() - t0
    _run(0.5, lambda: False)
    timer.stop()
    gaps = np.diff([t for t in ticks if t >= t0]) * 1e3
    n_tiles = session.progress()[1]

    live = hasattr(genes, "views")  # False: a checkout from before issue #5 (dask layers)

    def shown(gene: str) -> bool:  # layer added, its blocks computed and refreshed with them
        name = f"stmap: {gene}"
        if not live:  # the refresh computes the dask chunks on this thread
            if name in viewer.layers:
                viewer.layers[name].refresh()
            return name in viewer.layers
        return (
            name in viewer.layers
            and session.view_worker().pending == 0
            and name not in genes._stale
            and genes._last_refresh.get(name, 0) > 0
            and not genes.views[name]._updated
        )

    switch, switch_gaps = [], []
    for gene in sample.genes[1:6]:
        ticks.clear()
        timer.start()
        t = time.perf_counter()
        genes.add_gene(gene)
        _run(30, lambda g=gene: shown(g))
        switch.append((time.perf_counter() - t) * 1e3)
        timer.stop()
        switch_gaps.append(np.diff([t, *ticks, time.perf_counter()]).max() * 1e3)
        data = viewer.layers[f"stmap: {gene}"].data
        assert np.isfinite(np.asarray(data[-1])).any(), "heatmap shows no values"
    in_place = []  # (ms, longest Qt gap ms): the selected heatmap shows another gene
    for gene in sample.genes[6:11] if hasattr(genes, "switch_gene") else []:
        ticks.clear()
        timer.start()
        t = time.perf_counter()
        genes.switch_gene(gene)
        _run(30, lambda g=gene: shown(g))
        t1 = time.perf_counter()
        timer.stop()
        in_place.append(((t1 - t) * 1e3, np.diff([t, *ticks, t1]).max() * 1e3))
    refresh = []
    for layer in genes.gene_layers():
        t = time.perf_counter()
        layer.refresh()
        refresh.append((time.perf_counter() - t) * 1e3)
    load_after = os.getloadavg()[0]

    rows = [
        ("tiles predicted (whole slide, viewport first)", f"{n_tiles}"),
        ("prediction wall time", f"{t_pred:.1f} s"),
        ("Qt timer ticks (10 ms) during prediction", f"{len(gaps)}"),
        ("longest gap between ticks (goal ≤ 100 ms)", f"{gaps.max():.0f} ms"),
        ("99th percentile gap", f"{np.percentile(gaps, 99):.0f} ms"),
        ("median gap", f"{np.median(gaps):.0f} ms"),
        ("gene added → its heatmap shows the gene (median of 5)", f"{np.median(switch):.0f} ms"),
        ("gene added (max of 5)", f"{max(switch):.0f} ms"),
        ("longest Qt gap while adding a gene", f"{max(switch_gaps):.0f} ms"),
    ]
    if in_place:
        rows += [
            (
                "gene switch in place → heatmap shows the gene (median of 5)",
                f"{np.median([a for a, _ in in_place]):.0f} ms",
            ),
            ("gene switch in place (max of 5)", f"{max(a for a, _ in in_place):.0f} ms"),
            ("longest Qt gap during an in-place switch", f"{max(b for _, b in in_place):.0f} ms"),
        ]
    rows += [
        ("refresh of one heatmap layer (median)", f"{np.median(refresh):.0f} ms"),
        ("1-min load average before / after", f"{load_before:.2f} / {load_after:.2f}"),
    ]
    print("| measure | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    session.close()
    viewer.close()
    if display is not None:
        display.stop()
    return 0


def _her2st_c2() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    path = here.parent / "shared" / "data" / "her2st" / "C2" / "he.ome.tif"
    return path if path.is_file() else None


def first_pixels(repeats: int) -> int:
    """Click "Predict view" -> first non-NaN heatmap pixel napari gets, previews on vs off."""
    load_before = os.getloadavg()[0]
    display = virtual_display()
    logging.basicConfig(level=logging.WARNING)
    import napari
    import torch

    import napari_stmap.core.predict.predictor as predictor_module
    from napari_stmap._sample_data import ensure_sample
    from napari_stmap._widgets._session import get_session
    from napari_stmap._widgets.genes import GenesWidget
    from napari_stmap._widgets.predict import PredictWidget
    from napari_stmap._widgets.slide_data import SlideDataWidget
    from napari_stmap.core.model import create_model, save_model
    from napari_stmap.core.predict import live_view

    slide_path = _her2st_c2()
    genes = [f"GENE{i}" for i in range(250)]
    if slide_path is None:
        sample = ensure_sample()
        slide_path = Path(sample.slide)
    tmp = Path(tempfile.mkdtemp(prefix="bench_first_"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_predict_memory import default_model

    models = {  # what `stmap train` builds for 100 µm spots, and create_model's default
        "stmap train's PixNet (resnet10t, 2 µm/px)": default_model(tmp / "train.safetensors"),
        "create_model('pixnet') (resnet18, 1 µm/px)": tmp / "resnet18.safetensors",
    }
    torch.manual_seed(0)
    save_model(create_model("pixnet", genes=genes).eval(), models[list(models)[1]])

    first: dict[str, float] = {}
    original = live_view._LiveArray.__getitem__

    def recording(self, key):
        out = original(self, key)
        if "t" not in first and np.isfinite(out).any():
            first["t"] = time.perf_counter()
        return out

    live_view._LiveArray.__getitem__ = recording
    viewer = napari.Viewer(show=False)
    session = get_session(viewer)
    data, predict, genes_dock = SlideDataWidget(viewer), PredictWidget(viewer), GenesWidget(viewer)
    worker = data.load_slide(slide_path)
    _run(180, lambda: session.slide is not None and (worker is None or not worker.is_running))
    h, w = session.slide.shape_yx
    viewer.camera.center = (h * session.mpp / 2, w * session.mpp / 2)
    viewer.camera.zoom = float(viewer.canvas.size[1]) / 1200.0  # ~1.2 mm across

    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    arms = ("regular tiles only (before)", "preview tiles first")
    results: dict[tuple[str, str], list[float]] = {}
    gaps: dict[tuple[str, str], list[float]] = {}
    tiles: dict[str, str] = {}
    runs = [(m, arm) for m in models for _ in range(repeats) for arm in arms]
    for k, (name, arm) in enumerate(runs):
        if session.model_path != models[name]:
            data.load_model(models[name])
            _run(60, lambda n=name: session.model_path == models[n])
        predictor_module.DEFAULT_PREVIEW_TILES = 4 if arm == arms[1] else 0
        session.drop_predictor()
        session.store_root = tmp / f"stores{k}"  # a fresh store: nothing predicted yet
        for layer in list(genes_dock.gene_layers()):
            viewer.layers.remove(layer)
        genes_dock.add_gene(genes[0])  # builds the predictor, as a user's first gene does
        _run(300, lambda: session.predictor is not None and bool(genes_dock.gene_layers()))
        _run(1.0, lambda: False)  # the new layer settles
        pred = session.predictor
        tiles[name] = f"tile {pred.spec.tile_px} px, window {pred.spec.window_px} px"
        first.clear()
        ticks.clear()
        timer.start()
        t0 = time.perf_counter()
        predict.predict_view()
        _run(120, lambda: "t" in first)
        results.setdefault((name, arm), []).append(first.get("t", float("nan")) - t0)
        _run(3.0, lambda: False)  # the Qt thread while previews and the first tiles run
        timer.stop()
        gaps.setdefault((name, arm), []).append(np.diff([t0, *ticks]).max() * 1e3)
        pred.cancel()
        pred.wait(120)
    load_after = os.getloadavg()[0]
    live_view._LiveArray.__getitem__ = original
    print(f"slide: {slide_path.name}, {repeats} runs each, interleaved")
    print("| model | click → first heatmap pixel | median | runs | longest Qt gap, first 3 s |")
    print("|---|---|---:|---|---:|")
    for (name, arm), times in results.items():
        cells = ", ".join(f"{t:.2f}" for t in times)
        gap = max(gaps[name, arm])
        label = f"{name}; {tiles[name]}"
        print(f"| {label} | {arm} | {np.median(times):.2f} s | {cells} | {gap:.0f} ms |")
    for name in models:
        a, b = (np.median(results[name, arm]) for arm in arms)
        print(f"ratio preview / before, {name}: {b / a:.2f}")
    print(f"1-min load average before / after: {load_before:.2f} / {load_after:.2f}")
    session.close()
    viewer.close()
    if display is not None:
        display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
