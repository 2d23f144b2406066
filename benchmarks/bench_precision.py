"""Precision by device (issue 14): bf16 autocast against fp32, same network, same section.

On HER2ST C2 (``../shared/data/her2st/C2``; skipped cleanly when absent), with a PixNet trained
on C3-C5 (``--model``, default ``/tmp/her2st_c345.safetensors``; skipped when absent):

(a) whole-section ``stmap predict`` wall time (a fresh store each run, each run its own
    process, fp32 and bf16 alternating), median of ``--repeats``;
(b) ``stmap evaluate --json`` with ``--precision fp32`` and ``--precision bf16``: PCC@M of each,
    their difference and the largest change of a gene's r.

``"auto"`` may turn bf16 on (``AUTO_BF16`` in ``core/predict/device.py``) only where (a) is at
least 1.5x faster and (b) changes PCC@M by less than 0.002 and no gene's r by more than 0.01;
the last line says whether this machine meets both. Prints markdown tables.

Run (about 5 min on a 2-core CPU)::

    .venv/bin/python benchmarks/bench_precision.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STMAP_SHARED_DATA", REPO.parent / "shared" / "data"))
STMAP = [sys.executable, "-m", "napari_stmap.cli"]
PRECISIONS = ("fp32", "bf16")
MIN_SPEEDUP, MAX_DPCC, MAX_DR = 1.5, 0.002, 0.01


def _busy_s() -> float:
    """CPU seconds this machine has been busy, all cores (``/proc/stat``; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _runnable() -> int:
    """Processes running or ready to run now (``/proc/loadavg``; 0 elsewhere)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0


def _wait_quiet(limit_s: float) -> None:
    """Wait (at most ``limit_s``) until nothing else runs for 3 s in a row."""
    end, calm = time.monotonic() + limit_s, 0
    while time.monotonic() < end and calm < 3:
        calm = calm + 1 if _runnable() <= 1 else 0
        time.sleep(1.0)


def _run(argv: list[str]) -> tuple[float, float, float]:
    """Run ``stmap argv`` as its own process: (wall s, its CPU s, other processes' CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, t0 = _busy_s(), time.perf_counter()
    proc = subprocess.run([*STMAP, *argv], capture_output=True, text=True)
    wall, busy = time.perf_counter() - t0, _busy_s() - busy0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"stmap {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, max(0.0, busy - cpu)


def _network_s(model_path: Path, device: str, repeats: int) -> dict[str, float]:
    """In-process: median seconds of one forward pass over one default window, per precision."""
    import torch

    from napari_stmap.core.model import load_model
    from napari_stmap.core.predict.device import autocast, ready_model, torch_device
    from napari_stmap.core.tiling import default_tile_px

    dev = torch_device(device)
    model = ready_model(load_model(model_path), dev)
    w = default_tile_px(model) + 2 * model.halo_px
    x = torch.rand(1, 3, w, w, device=dev).contiguous(memory_format=torch.channels_last)
    out: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    with torch.inference_mode():
        for k in range(repeats + 1):  # the first round warms up
            for p in PRECISIONS:
                with autocast(dev, p):
                    t0 = time.perf_counter()
                    model.embed(x).float().cpu()
                    if k:
                        out[p].append(time.perf_counter() - t0)
    return {p: statistics.median(v) for p, v in out.items()} | {"window_px": w}


def _cpu_flags() -> set[str]:
    from napari_stmap.core.predict.device import BF16_CPU_FLAGS, cpu_flags

    return set(cpu_flags() & BF16_CPU_FLAGS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/her2st_c345.safetensors"))
    ap.add_argument("--section", default="C2", help="HER2ST section to predict and score")
    ap.add_argument("--repeats", type=int, default=3, help="predict runs per precision")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--quiet-s",
        type=float,
        default=60.0,
        help="before each run, wait up to this long for other processes to finish",
    )
    args = ap.parse_args()

    section = SHARED / "her2st" / args.section
    slide, spots = section / "he.ome.tif", section / "spots.h5ad"
    if not (slide.is_file() and spots.is_file()):
        print(f"skipped: HER2ST {args.section} not present at {section}")
        return 0
    if not args.model.is_file():
        print(f"skipped: no model at {args.model}; train one on C3-C5 (docs/benchmarks.md)")
        return 0

    _wait_quiet(args.quiet_s)
    net = _network_s(args.model, args.device, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    runs: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PRECISIONS}
    for k in range(args.repeats):
        for p in PRECISIONS if k % 2 == 0 else PRECISIONS[::-1]:
            _wait_quiet(args.quiet_s)
            out = work / f"{p}_{k}.zarr"
            runs[p].append(
                _run(
                    [
                        *("predict", "--model", str(args.model), "--slide", str(slide)),
                        *("--out", str(out), "--device", args.device, "--precision", p),
                    ]
                )
            )
    results, eval_s = {}, {}
    for p in PRECISIONS:
        js = work / f"eval_{p}.json"
        _wait_quiet(args.quiet_s)
        eval_s[p] = _run(
            [
                *("evaluate", "--model", str(args.model), "--slide", str(slide)),
                *("--spots", str(spots), "--json", str(js), "--device", args.device),
                *("--precision", p),
            ]
        )
        results[p] = json.loads(js.read_text())
        ran = results[p]["model"].get("precision")
        if ran != p:
            sys.exit(f"stmap evaluate --precision {p} ran at {ran!r}")

    key = next(iter(results["fp32"]["scales"]))
    pcc = {p: results[p]["scales"][key]["pcc_m"] for p in PRECISIONS}
    ra, rb = results["fp32"]["genes"][key], results["bf16"]["genes"][key]
    diffs = [
        (abs(rb[g] - ra[g]), g)
        for g in ra
        if ra[g] is not None and rb.get(g) is not None and math.isfinite(ra[g])
    ]
    max_dr, worst = max(diffs)
    med = {p: statistics.median(r[0] for r in runs[p]) for p in PRECISIONS}
    med_cpu = {p: statistics.median(r[1] for r in runs[p]) for p in PRECISIONS}
    speedup = med["fp32"] / med["bf16"]
    dpcc = pcc["bf16"] - pcc["fp32"]

    flags = ", ".join(sorted(_cpu_flags())) or "none"
    import torch

    print(
        f"machine: {os.cpu_count()}-core {platform.machine()} CPU (bf16 flags: {flags}), "
        f"torch {torch.__version__}, device {args.device}; model {args.model.name}; "
        f"HER2ST {args.section}, {len(ra)} genes at {key} µm"
    )
    print()
    n = args.repeats
    print("| | fp32 | bf16 | bf16 vs fp32 |")
    print("|---|---|---|---|")
    print(
        f"| `stmap predict`, whole section, s (median of {n}) | {med['fp32']:.1f} | "
        f"{med['bf16']:.1f} | {speedup:.2f}x faster |"
    )
    print(
        f"| ... its CPU time, s (median) | {med_cpu['fp32']:.1f} | {med_cpu['bf16']:.1f} | "
        f"{med_cpu['fp32'] / med_cpu['bf16']:.2f}x less |"
    )
    each = {p: ", ".join(f"{w:.1f} ({o:.1f})" for w, _, o in runs[p]) for p in PRECISIONS}
    print(
        f"| ... each run: wall s (other processes' CPU s meanwhile) | {each['fp32']} | "
        f"{each['bf16']} | |"
    )
    print(
        f"| `stmap evaluate`, wall s (one run) | {eval_s['fp32'][0]:.1f} | "
        f"{eval_s['bf16'][0]:.1f} | {eval_s['fp32'][0] / eval_s['bf16'][0]:.2f}x faster |"
    )
    print(
        f"| network only, one {net['window_px']}² px window, s (median of {n}) | "
        f"{net['fp32']:.2f} | {net['bf16']:.2f} | {net['fp32'] / net['bf16']:.2f}x faster |"
    )
    print(f"| PCC@M | {pcc['fp32']:.4f} | {pcc['bf16']:.4f} | {dpcc:+.4f} |")
    print(f"| max over genes of abs(delta r) | | | {max_dr:.4f} ({worst}) |")
    print()
    ok_speed = speedup >= MIN_SPEEDUP
    ok_acc = abs(dpcc) < MAX_DPCC and max_dr <= MAX_DR
    print(
        f"criteria: speed-up >= {MIN_SPEEDUP}x: {'yes' if ok_speed else 'no'} "
        f"({speedup:.2f}x); |delta PCC@M| < {MAX_DPCC} and max |delta r| <= {MAX_DR}: "
        f"{'yes' if ok_acc else 'no'} -> auto = {'bf16' if ok_speed and ok_acc else 'fp32'} "
        "on this machine"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
