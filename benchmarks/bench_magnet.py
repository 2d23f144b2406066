"""Throughput of MagNet bin prediction next to the dense engine and the spot-crop baseline.

Every 8 µm bin of a square region of a mirror-tiled synthetic slide (as in
``bench_engine.py``), all models with the same ResNet-18 encoder, random init, 50 genes:

- ``dense``: PixNet through the engine (``predict_slide``) + summing the 2 µm map into 8 µm bins;
- ``magnet``: :func:`~napari_stmap.core.predict.bins.predict_bins` at the bin centres, context
  tiles encoded once per chunk (the default; HD views 56 / 112 / 256 µm: bin view 112 px at
  0.5 µm/px, context views 64 px at 1.75 and 4 µm/px);
- ``magnet, per-bin context crops``: the same network with three crops per bin
  (``shared_context=False``, the paper's way), on a subset of the bins;
- ``spot-crop``: SpotNet, one 112 µm crop per bin, on a subset of the bins.

Bins/s and model GFLOP per bin (``FlopCounterMode``); medians of ``--repeat`` interleaved runs.

Usage::

    .venv/bin/python benchmarks/bench_magnet.py [--region-px 1024] [--subset 256] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402
    GENES,
    _flops_per_crop,
    _flops_per_window,
    _models,
    _source_rgb,
    bench_dense,
    bench_spot,
    make_slide,
)

log = logging.getLogger("bench_magnet")


def bin_centres(slide, region_px: int, bin_um: float = 8.0) -> np.ndarray:
    """Centres (level-0 px) of the ``bin_um`` bins tiling ``[0, region_px)²``."""
    side = bin_um / slide.mpp
    g = np.arange(side / 2, region_px, side)
    return np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)


def bench_magnet(model, slide, centres: np.ndarray, shared: bool, batch: int) -> dict:
    from napari_stmap.core.predict import predict_bins

    predict_bins(model, slide, centres[:8], shared_context=shared, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    predict_bins(model, slide, centres, shared_context=shared, batch_size=batch)
    return {"n_bins": len(centres), "t": time.perf_counter() - t0}


def magnet_flops(model, n_side: int = 16) -> dict[str, float]:
    """GFLOP per bin: bin view, and context per bin (shared tile of n_side² bins vs crops)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_stmap.core.model.magnet import tile_box

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
        return counter.get_total_flops() / 1e9

    v = torch.rand(1, 3, model.view_px, model.view_px)
    out = {"bin view": count(lambda: model.bin_features(v))}
    bins_px = 8.0 / model.mpp  # 8 µm bins at the bin-view µm/px
    g = (np.arange(n_side) + 0.5) * bins_px
    centres = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    shared = crops = 0.0
    for level, mpp in enumerate(model.context_mpp):
        p = model.context_px[level]
        pos = centres * model.mpp / mpp
        _, side = tile_box(pos, p, model.context_margin_px(level), model.context_stride)
        tile = torch.rand(1, 3, side, side)
        shared += count(lambda t=tile: model.context_map(t)) / len(centres)
        crop = torch.rand(1, 3, p, p)
        crops += count(lambda c=crop: model.context_map(c))
    out["context, shared tile"] = shared
    out["context, crops"] = crops
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--region-px", type=int, default=1024, help="side of the region (px)")
    p.add_argument("--subset", type=int, default=256, help="bins for the per-crop paths")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.region_px, args.subset, args.repeat = 256, 16, 1
    work = Path(tempfile.mkdtemp(prefix="bench_magnet_"))
    try:
        print(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> str:
    import torch

    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import create_model

    src = _source_rgb(work)
    pixnet, spotnet, paths = _models(work)
    torch.manual_seed(0)
    magnet = create_model("magnet", genes=GENES, encoder="resnet18").eval().to(args.device)
    slide_path = make_slide(work / "slide.ome.tif", max(args.region_px + 1024, 2048), src)
    slide = open_slide(slide_path)
    centres = bin_centres(slide, args.region_px)
    rng = np.random.default_rng(0)
    subset = centres[np.sort(rng.choice(len(centres), min(args.subset, len(centres)), False))]
    bench_dense(slide_path, paths["pixnet"], 16, None, args.device, 1)  # warm-up
    runs: dict[str, list] = {"dense": [], "magnet": [], "crops": [], "spot": []}
    for _ in range(args.repeat):  # interleaved: the same machine load for all
        d = bench_dense(slide_path, paths["pixnet"], args.region_px, None, args.device, 2)
        runs["dense"].append({"n_bins": d["n_bins"], "t": d["t_predict"] + d["t_bins"]})
        runs["magnet"].append(bench_magnet(magnet, slide, centres, True, 64))
        runs["crops"].append(bench_magnet(magnet, slide, subset, False, 64))
        runs["spot"].append(
            bench_spot(slide_path, spotnet, args.region_px, len(subset), args.device, 16)
        )
    fl = magnet_flops(magnet)
    dense_gf = _flops_per_window(pixnet, d["spec"].window_px, args.device) * d["n_tiles"]
    gflop = {
        "dense": dense_gf / d["n_bins"] / 1e9,
        "magnet": fl["bin view"] + fl["context, shared tile"],
        "crops": fl["bin view"] + fl["context, crops"],
        "spot": _flops_per_crop(spotnet, args.device) / 1e9,
    }
    return table(args, runs, gflop, fl)


def table(args, runs: dict, gflop: dict, parts: dict) -> str:
    names = {
        "dense": "dense PixNet (engine + 8 µm sums)",
        "magnet": "MagNet, shared context tiles",
        "crops": "MagNet, per-bin context crops",
        "spot": "spot-crop SpotNet (112 µm crops)",
    }
    rates = {k: [r["n_bins"] / r["t"] for r in v] for k, v in runs.items()}
    lines = [
        f"### MagNet throughput ({args.device}, {args.threads} thread(s), ResNet-18, fp32)",
        "",
        f"8 µm bins of a {args.region_px}² px region at 0.5 µm/px; medians of {args.repeat}.",
        "",
        "| model | bins | GFLOP/bin | bins/s | vs MagNet shared |",
        "|---|---:|---:|---:|---:|",
    ]
    ref = float(np.median(rates["magnet"]))
    for k, label in names.items():
        r = float(np.median(rates[k]))
        lines.append(
            f"| {label} | {runs[k][0]['n_bins']} | {gflop[k]:.3f} | {r:.1f} | {r / ref:.2f}× |"
        )
    lines += ["", "MagNet GFLOP per bin: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
