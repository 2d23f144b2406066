"""Benchmarks of the prediction engine (not part of the test suite); prints a markdown table.

1. **Dense vs spot-crop**: every 8 µm bin of a square region predicted by PixNet through the
   engine (``predict_slide`` + summing the 2 µm map into 8 µm bins) vs SpotNet with one crop per
   bin (``predict.spots.predict_spots``), same ResNet-18 encoder, same device: bins/s and ratio.
2. **Efficiency**: model FLOPs per tile (``torch.utils.flop_counter.FlopCounterMode``) × tiles/s
   ÷ this machine's measured fp32 GEMM peak (``torch.mm``), for the network alone (windows
   already in memory) and end to end (read, resample, infer, write); and their ratio.
3. **Peak memory**: whole-slide ``predict_slide`` (tiny model) on slides of area A and 4A, each
   in a fresh subprocess; peak RSS (``VmHWM``) and its ratio.
4. **Gene switch**: time to produce a 1024 × 1024 output-px viewport of a new gene from cached
   embeddings (ResNet-18 PixNet head, D = 64), warm (embeddings in the LRU cache) and cold.

Slides are made by mirror-tiling a small synthetic H&E sample into a pyramidal JPEG OME-TIFF
(fast to write at any size). All ratios are measured in one run on one machine; the timed parts
of 1 and 2 are interleaved and repeated (``--repeat``) and medians reported, because a shared
machine's load changes between measurements. The FLOP ratio of dense to spot-crop per bin is
printed alongside the measured one (it is what the measured ratio tends to when both run at the
same efficiency).

Usage::

    .venv/bin/python benchmarks/bench_engine.py                # CPU, modest sizes (minutes)
    .venv/bin/python benchmarks/bench_engine.py --quick        # smaller, for a smoke run
    .venv/bin/python benchmarks/bench_engine.py --device cuda --region-px 6144
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_engine")
GENES = [f"GENE{i:03d}" for i in range(50)]


# ------------------------------------------------------------------------------- slides
def _source_rgb(work: Path) -> np.ndarray:
    """A small synthetic H&E image (y, x, 3) to tile from."""
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.synthetic import write_synthetic

    sample = write_synthetic(
        work / "source", size_um=(400.0, 300.0), mpp=0.5, n_genes=8, seed=7, overwrite=True
    )
    return np.asarray(open_slide(sample.slide).levels[0].compute())


def _mirror_tile(src: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Pixels [y0, y0+h) × [x0, x0+w) of the plane tiled with mirrored copies of ``src``."""
    sh, sw = src.shape[:2]
    ys = np.abs((np.arange(y0, y0 + h) + sh) % (2 * sh) - sh)
    xs = np.abs((np.arange(x0, x0 + w) + sw) % (2 * sw) - sw)
    return src[np.minimum(ys, sh - 1)][:, np.minimum(xs, sw - 1)]


def make_slide(path: Path, side_px: int, src: np.ndarray, mpp: float = 0.5) -> Path:
    """Pyramidal OME-TIFF (512 px JPEG tiles, levels by 2 to < 1024 px) of ``side_px``²."""
    import tifffile

    shapes = [side_px]
    while shapes[-1] >= 1024:
        shapes.append(shapes[-1] // 2)
    meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "axes": "YXS"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level, side in enumerate(shapes):
            small = src[:: 2**level, :: 2**level]
            tiles = (
                _mirror_tile(small, y, x, 512, 512)
                for y in range(0, side, 512)
                for x in range(0, side, 512)
            )
            tif.write(
                tiles,
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(512, 512),
                photometric="rgb",
                compression="jpeg",
                subifds=len(shapes) - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                metadata=meta if level == 0 else None,
            )
    return path


# ------------------------------------------------------------------------------ helpers
def _gemm_peak_gflops(device: str) -> float:
    """Measured fp32 GEMM throughput (GFLOP/s) of ``torch.mm`` on 2048² matrices."""
    import torch

    a = torch.rand(2048, 2048, device=device)
    torch.mm(a, a)
    reps = 20 if device.startswith("cuda") else 5
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, a)
    _sync(device)
    return 2 * 2048**3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _flops_per_window(model, window_px: int, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, window_px, window_px, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.embed(x.contiguous(memory_format=torch.channels_last))
    return float(counter.get_total_flops())


def _flops_per_crop(spotnet, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, spotnet.crop_px, spotnet.crop_px, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        spotnet.to(device)(x.contiguous(memory_format=torch.channels_last))
    return float(counter.get_total_flops())


def _models(work: Path):
    import torch

    from napari_stmap.core.model import create_model, save_model

    torch.manual_seed(0)
    pixnet = create_model("pixnet", genes=GENES, pretrained=False).eval()
    spotnet = create_model("spotnet", genes=GENES, pretrained=False).eval()
    tiny = create_model("pixnet_tiny", genes=GENES).eval()
    paths = {}
    for name, model in (("pixnet", pixnet), ("tiny", tiny)):
        paths[name] = work / f"{name}.safetensors"
        save_model(model, paths[name])
    return pixnet, spotnet, paths


# ----------------------------------------------------------------- 1 + 2: dense / efficiency
def bench_dense(slide_path: Path, model_path: Path, region_px: int, tile_px, device, batch):
    """Whole-region prediction through the engine + 8 µm bin sums; returns timings."""
    from napari_stmap.core.predict import pipeline as engine
    from napari_stmap.core.predict import predict_slide, region_map

    store_path = Path(tempfile.mkdtemp(dir=slide_path.parent)) / "dense.zarr"
    region = (0, 0, region_px, region_px)
    infer = [0.0]
    embed = engine.embed_windows

    def timed(*a, **k):  # time spent in the network inside the engine
        t = time.perf_counter()
        try:
            return embed(*a, **k)
        finally:
            infer[0] += time.perf_counter() - t

    engine.embed_windows = timed
    t0 = time.perf_counter()
    store = predict_slide(
        slide_path,
        model_path,
        store_path,
        device=device,
        batch_size=batch,
        region=region,
        tile_px=tile_px,
        tissue=False,
        num_workers=1,
    )
    t_predict = time.perf_counter() - t0
    engine.embed_windows = embed
    t0 = time.perf_counter()
    dense, grid = region_map(store, region)
    k = round(8.0 / (grid.pixel_px * store.spec.slide_mpp))  # output px per 8 µm bin side
    h, w = (n // k * k for n in dense.shape[1:])
    bins = dense[:, :h, :w].reshape(dense.shape[0], h // k, k, w // k, k).sum(axis=(2, 4))
    t_bins = time.perf_counter() - t0
    n_tiles = store.counts()["done"]
    return {
        "spec": store.spec,
        "n_bins": bins.shape[1] * bins.shape[2],
        "n_tiles": n_tiles,
        "t_predict": t_predict,
        "t_bins": t_bins,
        "t_infer": infer[0],
    }


def bench_spot(slide_path: Path, spotnet, region_px: int, n_bins: int, device, batch):
    """SpotNet, one 112 µm crop per 8 µm bin, over ``n_bins`` bins of the region."""
    from napari_stmap.core.geometry import squares
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.predict import predict_spots

    slide = open_slide(slide_path)
    side = 8.0 / slide.mpp
    g = np.arange(side / 2, region_px, side)
    centres = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)[:n_bins]
    spotnet.to(device)
    predict_spots(spotnet, slide, squares(centres[:batch], side), device=device, batch_size=batch)
    t0 = time.perf_counter()
    predict_spots(spotnet, slide, squares(centres, side), device=device, batch_size=batch)
    return {"n_bins": len(centres), "t": time.perf_counter() - t0}


def bench_network_only(pixnet, slide_path: Path, spec, device, batch, reps):
    """Tiles/s of the network alone on windows already read (same spec as the engine run)."""
    import torch

    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.predict import SlideReader, embed_windows

    reader = SlideReader(open_slide(slide_path), spec)
    images = np.stack([reader.window((0, j % spec.grid_shape[1])) for j in range(batch)])
    dev = torch.device(device)
    model = pixnet.to(dev).eval()
    embed_windows(model, images, spec, dev)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        embed_windows(model, images, spec, dev)
    _sync(device)
    return batch * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- 3: memory
def child_rss(slide: str, model: str, store: str) -> None:
    """(Subprocess) peak RSS of one whole-slide predict_slide; prints JSON."""
    import torch  # noqa: F401  (count imports in the base)

    from napari_stmap.core.model import load_model
    from napari_stmap.core.predict import predict_slide

    load_model(model)
    base = _peak_rss_mib()
    t0 = time.perf_counter()
    result = predict_slide(slide, model, store, batch_size=4)
    peak = _peak_rss_mib()
    counts = result.counts()
    print(json.dumps({"base_mib": base, "peak_mib": peak, "s": time.perf_counter() - t0, **counts}))


def _peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (``VmHWM``; ``ru_maxrss`` would include the
    parent's peak, which Linux carries over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_rss(work: Path, src: np.ndarray, model_path: Path, side_px: int) -> list[dict]:
    """Peak RSS of whole-slide runs on slides of area A and 4A, each in a fresh process.

    Each size runs twice: with the default glibc allocator settings, and with
    ``MALLOC_TRIM_THRESHOLD_=65536`` (what dask.distributed's nanny sets for its workers), which
    returns freed memory to the OS and so removes most of the allocator's run-to-run noise.
    """
    import os

    out = []
    for factor in (1, 2):  # area A and 4A
        side = side_px * factor
        slide = make_slide(work / f"rss_{side}.ome.tif", side, src)
        for trim in (False, True):
            env = {**os.environ, **({"MALLOC_TRIM_THRESHOLD_": "65536"} if trim else {})}
            store = work / f"rss_{side}_{int(trim)}.zarr"
            cmd = [sys.executable, __file__, "--child-rss", str(slide), str(model_path), str(store)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            stats = json.loads(res.stdout.strip().splitlines()[-1])
            out.append({"side": side, "trim": trim, **stats})
    return out


# ------------------------------------------------------------------------ 4: gene switch
def bench_gene_switch(work: Path, slide_path: Path, pixnet, viewport: int = 1024, genes: int = 5):
    """ms to compute a viewport of a new gene from cached (random-filled) embeddings."""
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.predict import gene_view
    from napari_stmap.core.store import open_store
    from napari_stmap.core.tiling import plan_tiles

    slide = open_slide(slide_path)
    spec = plan_tiles(slide, pixnet)
    path = work / "switch.zarr"
    store = open_store(path, pixnet, slide, spec, "w")
    s = spec.stride * spec.f
    box = (0.0, 0.0, viewport * s, viewport * s)  # level-0 px of the viewport
    rng = np.random.default_rng(0)
    for tile in spec.tiles_in_bbox(box):
        rows, cols = spec.output_slices(tile)
        emb = rng.standard_normal((store.embed_dim, rows.stop - rows.start, cols.stop - cols.start))
        store.write_tile(tile, emb.astype(np.float32))

    def viewport_of(st, gene: str) -> float:
        t0 = time.perf_counter()
        arr = gene_view(st, gene)[:viewport, :viewport].compute()
        assert arr.shape == (viewport, viewport) and not np.isnan(arr).any()
        return (time.perf_counter() - t0) * 1e3

    cold_store = open_store(path, mode="r")
    cold = viewport_of(cold_store, GENES[0])  # reads and decodes every chunk
    warm = [viewport_of(cold_store, g) for g in GENES[1 : 1 + genes]]
    return {
        "cold_ms": cold,
        "warm_ms": warm,
        "chunks": len(spec.tiles_in_bbox(box)),
        "D": store.embed_dim,
    }


# -------------------------------------------------------------------------------- main
def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--region-px",
        type=int,
        default=4608,
        help="side of the dense region (px); a multiple of both tile sizes",
    )
    p.add_argument("--big-tile-px", type=int, default=1536, help="second, larger tile size")
    p.add_argument("--spot-bins", type=int, default=48, help="bins the spot-crop model runs on")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="alternating e2e / network runs")
    p.add_argument("--rss-px", type=int, default=4096, help="side of slide A (px) for memory")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    p.add_argument("--child-rss", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.child_rss:
        child_rss(*args.child_rss)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if args.quick:
        args.region_px, args.spot_bins, args.rss_px, args.big_tile_px = 768, 16, 2048, 768
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    import torch

    src = _source_rgb(work)
    pixnet, spotnet, paths = _models(work)
    side = max(args.region_px, 2048)
    slide = make_slide(work / "dense.ome.tif", side, src)
    peak = _gemm_peak_gflops(args.device)
    log.info("GEMM peak %.1f GFLOP/s; torch threads %d", peak, torch.get_num_threads())
    for tile_px in (None, args.big_tile_px):  # warm-up: first calls of each window size
        bench_dense(slide, paths["pixnet"], 16, tile_px, args.device, 1)
    runs: dict[str, list] = {"dense": [], "big": [], "net": [], "spot": []}
    for _ in range(args.repeat):  # interleaved, so all see the same machine load
        d = bench_dense(slide, paths["pixnet"], args.region_px, None, args.device, args.batch)
        reps = max(1, d["n_tiles"] // args.batch)
        runs["dense"].append(d)
        runs["net"].append(
            bench_network_only(pixnet, slide, d["spec"], args.device, args.batch, reps)
        )
        runs["big"].append(
            bench_dense(
                slide, paths["pixnet"], args.region_px, args.big_tile_px, args.device, args.batch
            )
        )
        runs["spot"].append(
            bench_spot(slide, spotnet, args.region_px, args.spot_bins, args.device, 16)
        )
    flops = {
        "dense": _flops_per_window(pixnet, runs["dense"][0]["spec"].window_px, args.device),
        "big": _flops_per_window(pixnet, runs["big"][0]["spec"].window_px, args.device),
        "spot": _flops_per_crop(spotnet, args.device),
    }
    rss = bench_rss(work, src, paths["tiny"], args.rss_px)
    switch = bench_gene_switch(work, rss_slide(work, args), pixnet)
    print(_table(args, peak, runs, flops, rss, switch))


def rss_slide(work: Path, args) -> Path:
    """The 4A slide of the memory benchmark (reused for the gene switch)."""
    return work / f"rss_{2 * args.rss_px}.ome.tif"


def _table(args, peak, runs, flops, rss, switch) -> str:
    med = np.median
    lines = [
        f"### Engine benchmark ({args.device}, fp32, GEMM peak {peak:.1f} GFLOP/s)",
        "",
        f"Medians of {args.repeat} interleaved repeats.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
    ]
    spot_rates = [r["n_bins"] / r["t"] for r in runs["spot"]]
    for name in ("dense", "big"):
        d = runs[name][0]
        rates = [r["n_bins"] / (r["t_predict"] + r["t_bins"]) for r in runs[name]]
        ratio = med([a / b for a, b in zip(rates, spot_rates, strict=True)])
        per_bin = flops[name] / d["n_bins"] * d["n_tiles"] / 1e9
        lines.append(
            f"| dense, {'default' if name == 'dense' else 'large'} tiles ({d['spec'].tile_px} px "
            f"core, {d['spec'].window_px} px window): {d['n_bins']} bins of 8 µm, "
            f"{per_bin:.3f} GFLOP/bin | {med(rates):.1f} bins/s, **{ratio:.0f}×** spot-crop "
            f"(FLOP ratio {flops['spot'] / 1e9 / per_bin:.0f}×) | ≥ 50× |"
        )
    lines.append(
        f"| spot-crop (SpotNet, 112 µm crops): {runs['spot'][0]['n_bins']} bins, "
        f"{flops['spot'] / 1e9:.2f} GFLOP/bin | {med(spot_rates):.2f} bins/s | |"
    )
    dense, gf = runs["dense"][0], flops["dense"] / 1e9
    net = float(med(runs["net"]))
    e2e = float(med([d["n_tiles"] / d["t_predict"] for d in runs["dense"]]))
    ratio = med(
        [d["n_tiles"] / d["t_predict"] / n for d, n in zip(runs["dense"], runs["net"], strict=True)]
    )
    busy = float(med([d["t_infer"] / d["t_predict"] for d in runs["dense"]]))
    lines += [
        f"| model FLOPs per tile ({dense['spec'].window_px}² px window) | {gf:.1f} GFLOP | |",
        f"| network only | {net:.3f} tiles/s = {gf * net:.1f} GFLOP/s "
        f"= {100 * gf * net / peak:.0f}% of GEMM peak | |",
        f"| end to end: read, resample, infer, write ({dense['n_tiles']} tiles) "
        f"| {e2e:.3f} tiles/s = {100 * gf * e2e / peak:.0f}% of peak | |",
        f"| end to end ÷ network only | **{ratio:.2f}** | ≥ 0.85 |",
        f"| share of the end-to-end wall time spent in the network | {busy:.2f} | |",
    ]
    for r in rss:
        size = "A" if r["side"] == rss[0]["side"] else "4A"
        how = "trimmed" if r["trim"] else "default malloc"
        lines.append(
            f"| peak RSS, slide {size} ({r['side']}² px, {r['done']} tiles, {r['s']:.0f} s), "
            f"{how} | {r['peak_mib']:.0f} MiB (imports + model: {r['base_mib']:.0f}) | |"
        )
    for trim in (False, True):
        a, b = (r["peak_mib"] for r in rss if r["trim"] == trim)
        how = "MALLOC_TRIM_THRESHOLD_=65536" if trim else "default malloc"
        lines.append(f"| peak RSS 4A ÷ A, {how} | **{b / a:.2f}** | ≤ 1.2 |")
    warm = switch["warm_ms"]
    lines += [
        f"| gene switch, 1024² output px, D={switch['D']} ({switch['chunks']} chunks), cold "
        f"(from disk) | {switch['cold_ms']:.0f} ms | |",
        f"| gene switch, warm embedding cache (median, max of {len(warm)}) "
        f"| **{np.median(warm):.0f}**, {max(warm):.0f} ms | ≤ 100 ms |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
