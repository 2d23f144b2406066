"""Slide back ends: a whole level 0 read through tifffile vs OpenSlide (not part of the tests).

Each run opens the slide with ``open_slide(path, backend=...)`` in a fresh subprocess and
computes level 0 (``(y, x, 3)`` uint8, the threaded dask scheduler with ``--threads``
workers); it reports wall time, peak RSS of that process (``VmHWM``: the level itself, the
decode buffers and the library) and whether the pixels match. The two back ends alternate
(A, B, A, B, ...) ``--repeat`` times and medians are printed with their ratio, as a markdown
table. Default slides: the HER2ST C2 OME-TIFF (9911 x 9274 px JPEG) and the CMU-1 SVS in
../shared, whichever exist.

Usage::

    .venv/bin/python benchmarks/bench_slide_backends.py                 # both slides, 3 repeats
    .venv/bin/python benchmarks/bench_slide_backends.py --slide X.svs --repeat 5 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SLIDES = [
    SHARED / "her2st" / "C2" / "he.ome.tif",
    SHARED / "formats" / "slides" / "CMU-1-Small-Region.svs",
]


def _child(path: str, backend: str, threads: int) -> None:
    """Runs in the subprocess: open, compute level 0, print one JSON line."""
    import dask
    import numpy as np

    from napari_stmap.core.io.slide import open_slide

    t0 = time.perf_counter()
    slide = open_slide(path, backend=backend)
    with dask.config.set(scheduler="threads", num_workers=threads):
        level0 = np.asarray(slide.levels[0].compute())
    wall = time.perf_counter() - t0
    hwm_kib = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm_kib = int(line.split()[1])
    digest = hashlib.sha256(level0.tobytes()).hexdigest()[:12]
    out = {"wall_s": wall, "peak_rss_mib": hwm_kib / 1024, "shape": list(level0.shape)}
    out |= {"sha": digest, "backend": slide.backend, "mpp": slide.mpp}
    print(json.dumps(out))


def _run(path: Path, backend: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), backend, str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, action="append", help="slide(s) to read")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    slides = args.slide or [p for p in DEFAULT_SLIDES if p.is_file()]
    if not slides:
        sys.exit("no slide: pass --slide PATH (../shared/data not found)")
    print(f"threads {args.threads}, repeat {args.repeat}, medians; peak RSS = VmHWM of the process")
    print()
    print("| slide | level 0 (y, x) | back end | wall s | peak RSS MiB | pixels |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for path in slides:
        runs: dict[str, list[dict]] = {"tifffile": [], "openslide": []}
        for _ in range(args.repeat):
            for backend in runs:
                runs[backend].append(_run(path, backend, args.threads))
        ref = runs["tifffile"][0]["sha"]
        med = {}
        for backend, rs in runs.items():
            wall = statistics.median(r["wall_s"] for r in rs)
            rss = statistics.median(r["peak_rss_mib"] for r in rs)
            med[backend] = (wall, rss)
            same = "same" if all(r["sha"] == ref for r in rs) else "differ"
            shape = "x".join(str(v) for v in rs[0]["shape"][:2])
            print(f"| {path.name} | {shape} | {backend} | {wall:.2f} | {rss:.0f} | {same} |")
        ratios.append((path.name, med))
    print()
    for name, med in ratios:
        (wt, rt), (wo, ro) = med["tifffile"], med["openslide"]
        print(f"{name}: OpenSlide / tifffile  wall x{wo / wt:.2f}, peak RSS x{ro / rt:.2f}")


if __name__ == "__main__":
    main()
