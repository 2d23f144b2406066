"""Does one dense map serve every spot size? Train at 16 µm only vs at 2 + 8 + 16 µm.

Two synthetic samples with known truth are written (``stmap synth``'s generator): one to train
on, one (another seed, so other tissue) to test on. PixNet is trained twice with the same
epochs and steps, once on 16 µm bins only and once on a random mix of 2, 8 and 16 µm bins, and
both are evaluated on the test sample at 2, 8, 16 and 55 µm (the 55 µm "spots" are disks on a
100 µm hexagonal lattice made of the 2 µm bins whose centres fall inside), against the measured
bins (Poisson counts) and against the truth density. Prints a markdown table and writes
``results.json`` under ``--out``.

Usage::

    python benchmarks/synthetic_scales.py --out bench_synth [--size-um 1000] [--epochs 4]

Other architectures and scales, e.g. MagNet trained at 8 µm only and at 16 µm only, evaluated
at 8 and 16 µm (its bin views make 2 µm evaluation of 100,000 bins slow on a CPU)::

    python benchmarks/synthetic_scales.py --arch magnet --runs "8;16" --scales 8,16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from napari_stmap.core.evaluate import evaluate_model
from napari_stmap.core.synthetic import load_synthetic, write_synthetic
from napari_stmap.core.training import TrainConfig, train_model

log = logging.getLogger("synthetic_scales")
SCALES = (2.0, 8.0, 16.0, 55.0)
RUNS = {"16 only": (16.0,), "2+8+16": (2.0, 8.0, 16.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("bench_synth"))
    p.add_argument("--size-um", type=float, default=1000.0, help="side of each sample, µm")
    p.add_argument("--genes", type=int, default=40, help="genes of the samples (all are trained)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--arch", default="pixnet")
    p.add_argument(
        "--runs",
        default=None,
        help='training scales of each run, ";"-separated, e.g. "8;16;8+16" (default "16;2+8+16")',
    )
    p.add_argument(
        "--scales", default=None, help="evaluation scales, µm, comma separated (default 2,8,16,55)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: train's")
    p.add_argument("--mpp", type=float, default=None, help="model µm/px (default: train's)")
    p.add_argument("--encoder", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def sample(root: Path, size: float, genes: int, seed: int):
    if (root / "synthetic.json").is_file():
        return load_synthetic(root)
    return write_synthetic(root, size_um=(size, size), n_genes=genes, seed=seed)


def run(name: str, bins: tuple, train, test, args) -> dict:
    cfg = TrainConfig(
        arch=args.arch,
        genes=f"top:{args.genes}",
        bin_um=bins,
        epochs=args.epochs,
        encoder=args.encoder,
        device=args.device,
        num_threads=args.threads,
        max_batches_per_epoch=args.steps_per_epoch,
        mpp=args.mpp,
        **({} if args.batch_size is None else {"batch_size": args.batch_size}),
    )
    t0 = time.perf_counter()
    model_path = args.out / f"model_{name.replace(' ', '_').replace('+', '_')}.safetensors"
    result = train_model([(train.slide, train.outs)], model_path, cfg)
    t1 = time.perf_counter()
    ev = evaluate_model(
        result.model,
        test.slide,
        test.outs,
        scales_of(args),
        truth=test.root,
        device=args.device,
        tile_px=1024,
    )
    ev["seconds"] = {"train": t1 - t0, "evaluate": time.perf_counter() - t1}
    ev["history"] = result.history
    return ev


def runs_of(args) -> dict[str, tuple]:
    """``--runs "8;16;8+16"`` -> {"8 only": (8.0,), "16 only": (16.0,), "8+16": (8.0, 16.0)}."""
    if not args.runs:
        return RUNS
    out = {}
    for run_ in args.runs.split(";"):
        bins = tuple(float(b) for b in run_.split("+"))
        out[f"{run_} only" if len(bins) == 1 else run_] = bins
    return out


def scales_of(args) -> tuple:
    return tuple(float(b) for b in args.scales.split(",")) if args.scales else SCALES


def table(results: dict) -> str:
    lines = [
        "| trained on | scale µm | spots | PCC@F | PCC@S | PCC@M | truth PCC@M | abs PCC@M |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ev in results.items():
        for key, m in ev["scales"].items():
            t = ev["truth"]["scales"][key]["pcc_m"]
            a = ev["absolute"]["scales"][key]["pcc_m"]
            cells = [m["n_spots"], *(_f(m[k]) for k in ("pcc_f", "pcc_s", "pcc_m")), _f(t), _f(a)]
            lines.append(f"| {name} | {key} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _f(v) -> str:
    return "nan" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in (
        "napari_stmap.core.io.slide",
        "napari_stmap.core.io.spots",
        "napari_stmap.core.metrics",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    train = sample(args.out / "train", args.size_um, args.genes, seed=0)
    test = sample(args.out / "test", args.size_um, args.genes, seed=1)
    results = {}
    for name, bins in runs_of(args).items():
        results[name] = run(name, bins, train, test, args)
        log.info("%s: %s", name, {k: v["pcc_m"] for k, v in results[name]["scales"].items()})
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
