"""Wall time and peak memory of ``stmap predict``: the old defaults against the automatic choice.

Runs ``stmap predict`` as a process (nothing of it is imported here) on HER2ST section C2 and
on a 4× larger slide made of it (2 × 2 mirrored copies, same µm/px, written once as a
pyramidal OME-TIFF into the work folder), three ways in one run, interleaved:
``--batch-size 8`` (the old default), ``--batch-size 1`` and no option (the batch and tile
chosen from the device and the memory budget, ``core/predict/budget.py``). Wall time is the
median of ``--repeats`` runs on the section (one run on the large slide); peak RSS is the
largest of the child's ``ru_maxrss`` and the summed RSS of its process tree (psutil, polled
every 20 ms). Prints a markdown table with the ratios of this run.

The model is ``--model`` or, by default, a random-init PixNet with the architecture
``stmap train`` builds for 100 µm spots (resnet10t encoder, decoder 64/32/32, 64-channel context,
2 µm/px, stride 4, 250 genes): weights do not change time or memory.

Usage::

    .venv/bin/python benchmarks/bench_predict_memory.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_predict_memory.py --repeats 1 --no-large   # quick look

Memory is in GB (10⁹ bytes); slides in level-0 px.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = REPO.parent / "shared" / "data" / "her2st" / "C2" / "he.ome.tif"
STMAP = [sys.executable, "-m", "napari_stmap.cli"]
SETTINGS = {
    "--batch-size 8 (old default)": ["--batch-size", "8"],
    "--batch-size 1": ["--batch-size", "1"],
    "automatic (new default)": [],
}
GB = 1e9


def default_model(path: Path, n_genes: int = 250) -> Path:
    """A random-init PixNet as ``stmap train`` builds it for spots >= 55 µm, saved to ``path``."""
    import numpy as np
    import torch

    from napari_stmap.core.model import create_model, save_model
    from napari_stmap.core.training.config import TrainConfig
    from napari_stmap.core.training.loop import _model_kwargs  # the defaults of `stmap train`

    torch.manual_seed(0)
    cfg = TrainConfig(mpp=2.0, stride=4, tile_px=256)  # its defaults for 100 µm spots
    kwargs = _model_kwargs(cfg, np.full(n_genes + 1, 1e-3), ref_area_um2=7854.0)
    model = create_model("pixnet", genes=[f"GENE{i}" for i in range(n_genes)], **kwargs)
    save_model(model.eval(), path)
    return path


def mirrored_slide(section: Path, out: Path) -> Path:
    """2 × 2 mirrored copies of ``section`` as a pyramidal OME-TIFF (same µm/px), made once."""
    if out.exists():
        return out
    import numpy as np
    import tifffile

    with tifffile.TiffFile(section) as tif:
        image = tif.series[0].levels[0].asarray()
        mpp = float(re.search(r'PhysicalSizeX="([\d.]+)"', tif.ome_metadata).group(1))
    top = np.concatenate([image, image[:, ::-1]], axis=1)
    big = np.concatenate([top, top[::-1]], axis=0)
    del image, top
    levels = [big]
    while max(levels[-1].shape[:2]) >= 2048:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    opts = {
        "tile": (512, 512),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
        "resolutionunit": "CENTIMETER",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        meta = {
            "axes": "YXS",
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
        res = 1e4 / mpp
        tif.write(levels[0], subifds=len(levels) - 1, resolution=(res, res), metadata=meta, **opts)
        for k, level in enumerate(levels[1:], start=1):
            res = 1e4 / (mpp * 2**k)
            tif.write(level, subfiletype=1, resolution=(res, res), **opts)
    tmp.rename(out)
    return out


def run_stmap(argv: list[str]) -> dict:
    """One ``stmap`` process: wall s, peak RSS bytes of its process tree (psutil, every 20 ms),
    its ``ru_maxrss`` in bytes, stdout and stderr; a failure raises with its stderr."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        [*STMAP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    tree_peak, done = [0], threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                tree_peak[0] = max(tree_peak[0], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            done.wait(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"stmap {' '.join(argv)} failed:\n{stderr}")
    return {
        "wall": wall,
        "rss": tree_peak[0],
        "maxrss": usage.ru_maxrss * 1024,
        "stdout": stdout,
        "stderr": stderr,
    }


def run_predict(model: Path, slide: Path, out: Path, extra: list[str]) -> dict:
    """One ``stmap predict`` process: wall s, peak RSS bytes, its plan line and tile counts."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["predict", "--model", str(model), "--slide", str(slide), "--out", str(out), *extra]
    r = run_stmap(argv)
    plan = next((ln for ln in r["stderr"].splitlines() if ln.startswith("stmap: batch")), "")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall": r["wall"],
        "rss": max(r["maxrss"], r["rss"]),
        "plan": plan,
        "tiles": r["stdout"].strip().split(": ", 1)[-1],
    }


def measure(model: Path, slides: dict[str, Path], repeats: dict[str, int], work: Path) -> dict:
    """Runs interleaved (setting after setting, then the next repeat): {(slide, setting): runs}."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for name, slide in slides.items():
        for rep in range(repeats[name]):
            for setting, extra in SETTINGS.items():
                r = run_predict(model, slide, work / "pred.zarr", extra)
                runs.setdefault((name, setting), []).append(r)
                print(
                    f"  {name} | {setting} | run {rep + 1}: {r['wall']:.1f} s, "
                    f"{r['rss'] / GB:.2f} GB  {r['plan']}",
                    flush=True,
                )
    return runs


def table(runs: dict, slides: dict[str, Path]) -> str:
    """Markdown: per slide and setting the median wall, peak RSS and ratios to batch 8."""
    rows = [
        "| slide | tiles run / off tissue | setting | wall s | peak RSS GB | wall ÷ batch 8 "
        "| RSS ÷ batch 8 | RSS ÷ section's |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    base, first = next(iter(SETTINGS)), next(iter(slides))
    for name in slides:
        ref_wall = statistics.median(r["wall"] for r in runs[(name, base)])
        ref_rss = max(r["rss"] for r in runs[(name, base)])
        for setting in SETTINGS:
            rs = runs[(name, setting)]
            wall, rss = statistics.median(r["wall"] for r in rs), max(r["rss"] for r in rs)
            sec_rss = max(r["rss"] for r in runs[(first, setting)])
            walls = "/".join(f"{r['wall']:.1f}" for r in rs)
            shown = f"**{wall:.1f}** ({walls})" if len(rs) > 1 else f"{wall:.1f}"
            tiles = re.sub(r"(\d+) tiles done, (\d+) off tissue.*", r"\1 / \2", rs[0]["tiles"])
            ratios = f"{wall / ref_wall:.2f} | {rss / ref_rss:.2f} | {rss / sec_rss:.2f}"
            rows.append(f"| {name} | {tiles} | {setting} | {shown} | {rss / GB:.2f} | {ratios} |")
    return "\n".join(rows)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", type=Path, default=SECTION, help="HER2ST C2 he.ome.tif")
    parser.add_argument(
        "--model", type=Path, default=None, help="model file (default: random-init default PixNet)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting on the section")
    parser.add_argument("--no-large", action="store_true", help="skip the 4× mirrored slide")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the model, the 4× slide and stores (kept); default a temporary one",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.section.exists():
        print(
            f"skipped: {args.section} is absent (HER2ST section C2; see ../shared/data/README.md)"
        )
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="stmap-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model or default_model(work / "pixnet_default_random.safetensors")
        slides = {"C2 (9,911 × 9,274 px)": args.section}
        repeats = {next(iter(slides)): args.repeats}
        if not args.no_large:
            big = mirrored_slide(args.section, work / "C2_mirrored_2x2.ome.tif")
            slides["C2 mirrored 2 × 2 (19,822 × 18,548 px)"] = big
            repeats[next(reversed(slides))] = 1
        print(f"model {model}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
        runs = measure(model, slides, repeats, work)
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
        print(table(runs, slides))
        plan = runs[(next(iter(slides)), "automatic (new default)")][0]["plan"]
        print(f"\nautomatic choice on the section: `{plan}`")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
