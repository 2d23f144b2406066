"""Peak memory of the synthetic generator on a large slide (not part of the test suite).

Writes a synthetic sample of ``--size-px`` × ``--size-px`` level-0 pixels (default 40,000²,
i.e. 20 mm × 20 mm at 0.5 µm/px, 4.8 GB of RGB pixels) and prints the peak resident memory of
the process, its ratio to the uncompressed image size, the time taken and the output sizes.

Usage::

    .venv/bin/python benchmarks/bench_synthetic_memory.py --size-px 20000
    .venv/bin/python benchmarks/bench_synthetic_memory.py --size-px 40000 --out /scratch/big

The capture area (bins) is at most 6.5 mm × 6.5 mm, so the 2 µm bins stay feasible.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB (Linux /proc, ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    current = peak
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, peak


def _folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-px", type=int, default=40_000, help="slide side in level-0 px (default 40000)"
    )
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel (default 0.5)")
    parser.add_argument("--n-genes", type=int, default=60)
    parser.add_argument(
        "--bins", type=float, nargs="+", default=[2.0, 8.0, 16.0], help="bin sizes in µm"
    )
    parser.add_argument("--tile-px", type=int, default=1024)
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: a temporary one, removed)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from napari_stmap.core.synthetic import write_synthetic

    out = args.out or Path(tempfile.mkdtemp(prefix="stmap-bench-")) / "sample"
    size_um = args.size_px * args.mpp
    base, _ = _rss_mib()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            current, peak = _rss_mib()
            logging.info("step %d/%d  rss %.0f MiB  peak %.0f MiB", done, total, current, peak)

    start = time.perf_counter()
    sample = write_synthetic(
        out, size_um=(size_um, size_um), mpp=args.mpp, n_genes=args.n_genes,
        bin_sizes_um=tuple(args.bins), tile_px=args.tile_px, overwrite=True, progress=progress,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    _, peak = _rss_mib()
    image_mib = args.size_px**2 * 3 / 2**20
    print(
        f"slide          {args.size_px} x {args.size_px} px at {args.mpp} µm/px ({size_um / 1000:.1f} mm square)"
    )
    print(f"image size     {image_mib:,.0f} MiB uncompressed RGB")
    print(f"baseline RSS   {base:,.0f} MiB (after imports)")
    print(f"peak RSS       {peak:,.0f} MiB  = {peak / image_mib:.1%} of the image size")
    print(f"time           {elapsed:,.0f} s")
    print(
        f"outputs        slide {sample.slide.stat().st_size / 2**20:,.0f} MiB, truth {_folder_mib(sample.truth):,.0f} MiB, bins {_folder_mib(sample.outs):,.0f} MiB"
    )
    if args.out is None and not args.keep:
        shutil.rmtree(out.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
