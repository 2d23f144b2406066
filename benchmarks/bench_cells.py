"""Cells per second and peak memory of ``stmap cells`` on a whole HER2ST section and a 4× slide.

Runs ``stmap cells`` as a process (nothing of it is imported here) on HER2ST section C2
(9,911 × 9,274 px at 0.687 µm/px) and on a 4× larger slide made of it (2 × 2 mirrored copies,
the one ``benchmarks/bench_predict_memory.py`` builds), each after ``stmap predict`` made its
store with a random-init default-architecture PixNet (250 genes; weights change neither time
nor memory). Two runs per slide: ``--segment`` (built-in nucleus segmentation + per-cell sums +
files) and ``--labels`` on the labels that run kept (per-cell sums + files only). Peak RSS is
the process tree's summed RSS (psutil, polled every 20 ms; not ``ru_maxrss``, which a forked
child inherits from this process, e.g. after it built the 4× slide). Prints a markdown table with the ratios of this run; the memory of a run must
not grow with the slide (RSS ÷ section's ≈ 1 while the cells grow 4×).

Usage::

    .venv/bin/python benchmarks/bench_cells.py              # ~15 min on 2 shared cores
    .venv/bin/python benchmarks/bench_cells.py --no-large   # the section only

Memory is in GB (10⁹ bytes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict_memory import (  # noqa: E402
    SECTION,
    default_model,
    mirrored_slide,
    run_stmap,  # the tree's polled RSS: a forked child inherits its parent's ru_maxrss
)

GB = 1e9


def n_cells(stdout: str) -> int:
    """The cell count from ``wrote A and B: N cells × G genes (...)``."""
    return int(stdout.split(": ", 1)[1].split(" cells", 1)[0])


def measure_slide(name: str, slide: Path, model: Path, work: Path) -> list[dict]:
    store, out = work / "pred.zarr", work / "cells.h5ad"
    shutil.rmtree(store, ignore_errors=True)
    pred = run_stmap(["predict", "--model", str(model), "--slide", str(slide), "--out", str(store)])
    print(f"  {name}: predict {pred['wall']:.1f} s, {pred['rss'] / GB:.2f} GB", flush=True)
    rows = []
    for mode in ("--segment", "--labels"):
        extra = (
            ["--segment"]
            if mode == "--segment"
            else ["--labels", str(out.with_suffix(".labels.zarr"))]
        )
        target = out if mode == "--segment" else work / "cells_from_labels.h5ad"
        r = run_stmap(["cells", "--pred", str(store), *extra, "--out", str(target), "--overwrite"])
        r.update(slide=name, mode=mode, cells=n_cells(r["stdout"]))
        print(
            f"  {name} | {mode}: {r['cells']} cells in {r['wall']:.1f} s "
            f"({r['cells'] / r['wall']:.0f} cells/s), {r['rss'] / GB:.2f} GB",
            flush=True,
        )
        rows.append(r)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out.with_suffix(".labels.zarr"), ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per slide and mode the cells, wall, cells/s, peak RSS and RSS ÷ section's."""
    lines = [
        "| slide | run | cells | wall s | cells/s | peak RSS GB | RSS ÷ section's |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    first = {r["mode"]: r["rss"] for r in rows if r["slide"] == rows[0]["slide"]}
    for r in rows:
        what = "segment + measure" if r["mode"] == "--segment" else "measure (--labels)"
        lines.append(
            f"| {r['slide']} | {what} | {r['cells']:,} | {r['wall']:.1f} | "
            f"{r['cells'] / r['wall']:,.0f} | {r['rss'] / GB:.2f} | {r['rss'] / first[r['mode']]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", type=Path, default=SECTION, help="HER2ST C2 he.ome.tif")
    parser.add_argument("--no-large", action="store_true", help="skip the 4× mirrored slide")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept)")
    args = parser.parse_args(argv)
    if not args.section.exists():
        print(
            f"skipped: {args.section} is absent (HER2ST section C2; see ../shared/data/README.md)"
        )
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="stmap-bench-cells-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "pixnet_default_random.safetensors"
        if not model.exists():
            default_model(model)
        slides = {"C2 (9,911 × 9,274 px)": args.section}
        if not args.no_large:
            big = mirrored_slide(args.section, work / "C2_mirrored_2x2.ome.tif")
            slides["C2 mirrored 2 × 2 (19,822 × 18,548 px)"] = big
        print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
        rows = [r for name, s in slides.items() for r in measure_slide(name, s, model, work)]
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
        print(table(rows))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
