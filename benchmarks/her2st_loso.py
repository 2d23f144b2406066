"""Leave-one-section-out benchmark on HER2ST (patient C, sections C2–C5; legacy ST, 100 µm spots).

For every test section, the other sections train:

- ``pixnet``: the dense model (``stmap train --arch pixnet`` defaults, random init);
- ``spotnet``: the spot-crop baseline with the same encoder and the same epochs;
- any other registered architecture named in ``--models`` (e.g. ``magnet``), trained by
  :func:`~napari_stmap.core.training.train_model` with the same defaults;
- ``magnet``: MagNet (views of 112 / 224 / 512 µm, kNN graph of the spots), same encoder and
  epochs, one group of 32 neighbouring spots per step (:data:`ARCH_DEFAULTS`);
- ``mean``: predict the training mean (per gene, of the normalised expression; constant, so its
  Pearson r is undefined: NaN, reported as such; MSE/MAE are meaningful);
- ``ceiling``: not a model but the counting-noise ceiling of the test section: each spot's
  UMIs are split at random into two halves (binomial thinning, p = 1/2), the per-gene r between
  the halves' normalised expression is stepped up to full depth (Spearman–Brown,
  ``2r / (1 + r)``) and its square root is the highest r any prediction can reach against
  Poisson-noisy measurements (mean of 8 splits; PCC@F/S/M over genes as for the models);
- ``ridge``: ridge regression from 32 colour/texture features of each spot's disk (RGB, HED
  and HSV statistics, background/nuclei/eosin fractions, gradient and Laplacian texture) to
  the normalised expression and the log total, the penalty chosen by leave-one-section-out
  cross-validation inside the training sections.

All are scored by the same code on the test section's spots (top ``--genes`` genes by mean
normalised training expression, ``log1p(1e4·gene/total)``, per-gene Pearson r across spots,
PCC@F/S/M = quartile/median/mean over genes). Networks are scored with test-time augmentation
(embedding averaged over the 8 turns and flips of every tile or crop; ``--no-tta`` for single
passes). No model sees the test section while training
(no validation on it, the last epoch is kept). Results: a markdown table (mean ± std over
folds) on stdout, ``results.json`` and PNG maps of ERBB2 and three other genes (measured vs
PixNet's dense map vs PixNet's spot sums) under ``--out``.

Usage::

    python benchmarks/her2st_loso.py --data ../shared/data/her2st --out bench_her2st \
        [--folds C2,C3,C4,C5] [--epochs 24] [--models pixnet,spotnet,mean,ridge]
        [--opt lr=2e-3 --opt spotnet:batch_size=32 --opt 'model_config={"decoder_channels": [128, 64, 64]}']
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from napari_stmap.core.io.slide import open_slide, read_at_mpp
from napari_stmap.core.measured import depth_factors, load_measured, scale_key, spot_density
from napari_stmap.core.metrics import evaluate_expression
from napari_stmap.core.training import TrainConfig, select_genes, train_model

log = logging.getLogger("her2st_loso")
SECTIONS = ("C2", "C3", "C4", "C5")
FEATURE_MPP = 1.0
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: Per-architecture TrainConfig defaults of this benchmark (``--opt`` overrides them). MagNet's
#: batch is groups of 32 spots: one per step gives ~18 steps per epoch on three sections.
ARCH_DEFAULTS = {"magnet": {"batch_size": 1}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/her2st"
    )
    p.add_argument("--out", type=Path, default=Path("bench_her2st"))
    p.add_argument("--folds", default=",".join(SECTIONS), help="test sections, comma separated")
    p.add_argument("--models", default="pixnet,spotnet,mean,ridge")
    p.add_argument("--genes", type=int, default=250, help="genes scored (top by training mean)")
    p.add_argument(
        "--train-genes",
        type=int,
        default=None,
        help="genes the networks train on (default --genes); the scores stay on the top --genes",
    )
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument(
        "--encoder", default=None, help="encoder of pixnet and spotnet (default: train's)"
    )
    p.add_argument("--mpp", type=float, default=None, help="model µm/px (default: train's)")
    p.add_argument("--tile-px", type=int, default=None, help="pixnet tile (default: train's)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="[ARCH:]KEY=VALUE",
        help="TrainConfig field for every network (or only ARCH), e.g. lr=2e-3, spotnet:batch_size=32",
    )
    p.add_argument(
        "--no-tta",
        action="store_true",
        help="score single-pass predictions (default: averaged over 8 turns and flips)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-maps", action="store_true")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="only print the table of earlier runs' --out folders (folds run in parallel)",
    )
    return p.parse_args(argv)


def section(data: Path, name: str) -> tuple[Path, Path]:
    return data / name / "he.ome.tif", data / name / "spots.h5ad"


# ------------------------------------------------------------------------------ networks
def run_network(arch: str, train: list, test: tuple, args, folder: Path) -> tuple[dict, object]:
    """Train ``arch`` on ``train`` and evaluate it on ``test`` at 100 µm."""
    from napari_stmap.core.evaluate import evaluate_measured

    common = {"encoder": args.encoder, "mpp": args.mpp, "tile_px": args.tile_px}
    chosen = {k: v for k, v in common.items() if v is not None}
    cfg = TrainConfig(
        **{**chosen, **ARCH_DEFAULTS.get(arch, {}), **overrides(args.opt, arch)},
        arch=arch,
        genes=f"top:{max(args.genes, args.train_genes or 0)}",
        epochs=args.epochs,
        device=args.device,
        num_threads=args.threads,
        max_batches_per_epoch=args.steps_per_epoch,
    )
    t0 = time.perf_counter()
    result = train_model(train, folder / f"{arch}.safetensors", cfg)
    t1 = time.perf_counter()
    model = result.model
    model.metadata["path"] = str(folder / f"{arch}.safetensors")
    # the top --genes of the training ranking (a prefix of any longer top-K list) are scored
    slide = open_slide(test[0])
    measured = load_measured(test[1], slide=slide).restrict(list(model.genes[: args.genes]))
    ev = evaluate_measured(
        model, slide, measured, device=args.device, tile_px=1024, tta=not args.no_tta
    )
    ev["data"]["slide"] = str(test[0])
    ev["seconds"] = {"train": t1 - t0, "evaluate": time.perf_counter() - t1}
    ev["history"] = result.history
    return ev, model


def overrides(opts: list[str], arch: str) -> dict:
    """``[ARCH:]KEY=VALUE`` options that apply to ``arch``, typed like the TrainConfig field."""
    fields = TrainConfig.__dataclass_fields__
    out = {}
    for opt in opts:
        head, _, text = opt.partition("=")
        scope, _, key = head.rpartition(":")
        reserved = ("arch", "genes", "epochs", "device", "num_threads", "max_batches_per_epoch")
        if key not in fields or key in reserved:
            msg = f"--opt {opt!r}: unknown or reserved TrainConfig field {key!r}"
            raise SystemExit(msg)
        if scope and scope != arch:
            continue
        default = fields[key].default
        if text[:1] in "{[":
            out[key] = json.loads(text)
        elif isinstance(default, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        elif text.lower() == "none":
            out[key] = None
        elif isinstance(default, int) and key != "ema_decay":
            out[key] = int(text)
        else:
            out[key] = float(text) if key != "encoder" else text
    return out


# ------------------------------------------------------------------------------ baselines
def spot_features(slide, spots) -> np.ndarray:
    """(n, 32) colour/texture features of each spot's disk at 1 µm/px."""
    from skimage.color import rgb2hed, rgb2hsv

    f = FEATURE_MPP / slide.mpp
    d = int(math.ceil(spots.size_px / f)) + 2
    yy, xx = np.mgrid[:d, :d] + 0.5
    rows = []
    for c in spots.centers_yx / f:
        origin = np.floor(c - d / 2).astype(int)
        img = read_at_mpp(slide, tuple(origin), (d, d), FEATURE_MPP)
        mask = np.hypot(yy + origin[0] - c[0], xx + origin[1] - c[1]) <= spots.size_px / f / 2
        rows.append(_disk_features(img, mask, rgb2hed, rgb2hsv))
    return np.asarray(rows)


def _disk_features(img, mask, rgb2hed, rgb2hsv) -> list[float]:
    from scipy import ndimage

    rgb = img.astype(float) / 255.0
    hed, hsv = rgb2hed(img), rgb2hsv(img)
    grey = rgb.mean(axis=2)
    px, h = rgb[mask], hed[mask]
    grad = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))[mask]
    lap = np.abs(ndimage.laplace(grey))[mask]
    coarse = ndimage.uniform_filter(grey, 8)[mask]
    white = (px.min(axis=1) > 0.85).mean()
    h_thr = np.percentile(hed[..., 0], 75)
    feats = [*px.mean(0), *px.std(0), *h.mean(0), *h.std(0)]
    feats += [*np.percentile(h[:, 0], [10, 50, 90]), *np.percentile(h[:, 1], [10, 50, 90])]
    feats += [*hsv[mask].mean(0), hsv[mask][:, 1].std()]
    feats += [white, (h[:, 0] > h_thr).mean(), (h[:, 1] > h[:, 0]).mean()]
    feats += [grad.mean(), grad.std(), lap.mean(), coarse.std(), grey[mask].std()]
    return feats


def normalised(measured, genes: list[str], factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, G) log1p(1e4·g/total) of the genes and (n,) log1p(depth-scaled total)."""
    from napari_stmap.core.metrics import normalize_expression

    m = measured.restrict(genes)
    norm = normalize_expression(m.spots.counts, m.total)
    return norm, np.log1p(m.total * factor)


def as_counts(norm: np.ndarray, log_total: np.ndarray) -> np.ndarray:
    """Pseudo-counts (n, G + 1) whose normalisation gives back ``norm`` (total last)."""
    total = np.expm1(log_total)
    return np.column_stack([np.expm1(norm) * total[:, None] / 1e4, total])


def ridge(x_train, y_train, x_test, alpha: float) -> np.ndarray:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    ym = y_train.mean(0)
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y_train - ym))
    return b @ w + ym


def choose_alpha(xs: list, ys: list) -> float:
    """Penalty maximising mean per-gene r in leave-one-section-out CV over training sections."""
    from napari_stmap.core.metrics import pearson_per_gene

    scores = []
    for alpha in ALPHAS:
        rs = []
        for k in range(len(xs)):
            xt = np.concatenate([x for j, x in enumerate(xs) if j != k])
            yt = np.concatenate([y for j, y in enumerate(ys) if j != k])
            rs.append(
                np.nanmean(pearson_per_gene(ridge(xt, yt, xs[k], alpha)[:, :-1], ys[k][:, :-1]))
            )
        scores.append(np.mean(rs))
    return ALPHAS[int(np.nanargmax(scores))]


def run_baselines(train: list, test: tuple, genes: list[str], which: set[str]) -> dict[str, dict]:
    """Mean and ridge baselines on the test spots (same genes, same metrics)."""
    measured = [load_measured(p) for _, p in train]
    ref, factors = depth_factors([spot_density(m.units(m.base_um)) for m in measured])
    test_m = load_measured(test[1])
    test_factor = ref / spot_density(test_m.units(test_m.base_um))
    ys = []
    for m, f in zip(measured, factors, strict=True):
        norm, lt = normalised(m, genes, f)
        ys.append(np.column_stack([norm, lt]))
    out = {}
    if "ceiling" in which:
        out["ceiling"] = noise_ceiling(test_m, genes)
    if "mean" in which:
        y = np.nanmean(np.concatenate(ys), axis=0)
        pred = np.tile(y, (test_m.spots.n_spots, 1))
        out["mean"] = score(as_counts(pred[:, :-1], pred[:, -1]), test_m, genes, test_factor)
    if "ridge" in which:
        t0 = time.perf_counter()
        xs = [
            spot_features(open_slide(s), m.spots) for (s, _), m in zip(train, measured, strict=True)
        ]
        alpha = choose_alpha(xs, ys)
        x_test = spot_features(open_slide(test[0]), test_m.spots)
        pred = ridge(np.concatenate(xs), np.concatenate(ys), x_test, alpha)
        out["ridge"] = score(as_counts(pred[:, :-1], pred[:, -1]), test_m, genes, test_factor)
        out["ridge"]["alpha"] = alpha
        out["ridge"]["seconds"] = {"train": time.perf_counter() - t0, "evaluate": 0.0}
    return out


def noise_ceiling(measured, genes: list[str], splits: int = 8, seed: int = 0) -> dict:
    """Counting-noise ceiling of per-gene r on ``measured`` (see the module notes)."""
    import scipy.sparse as sp

    from napari_stmap.core.metrics import normalize_expression, pearson_per_gene, summarize

    m = measured.restrict(genes)
    counts = m.spots.counts
    counts = np.rint(counts.toarray() if sp.issparse(counts) else np.asarray(counts))
    counts = counts.astype(np.int64)
    rest = np.maximum(np.rint(m.total).astype(np.int64) - counts.sum(axis=1), 0)
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(splits):
        half, half_rest = rng.binomial(counts, 0.5), rng.binomial(rest, 0.5)
        other, other_rest = counts - half, rest - half_rest
        ta, tb = half.sum(axis=1) + half_rest, other.sum(axis=1) + other_rest
        ok = (ta > 0) & (tb > 0)
        a = normalize_expression(half[ok].astype(float), ta[ok].astype(float))
        b = normalize_expression(other[ok].astype(float), tb[ok].astype(float))
        rs.append(pearson_per_gene(a, b))
    r = np.nanmean(np.array(rs), axis=0)
    ceiling = np.where(np.isfinite(r), np.sqrt(np.clip(2 * r / (1 + r), 0.0, 1.0)), np.nan)
    stats = summarize(ceiling)
    key = scale_key(m.base_um)
    entry = {
        k: (stats[k] if math.isfinite(stats[k]) else None) for k in ("pcc_f", "pcc_s", "pcc_m")
    }
    entry.update(mse=None, mae=None, n_spots=int(counts.shape[0]), n_genes=stats["n_genes"])
    per_gene = {
        g: (float(c) if np.isfinite(c) else None) for g, c in zip(genes, ceiling, strict=True)
    }
    return {"scales": {key: entry}, "genes": {key: per_gene}}


def score(pred_counts: np.ndarray, measured, genes: list[str], factor: float) -> dict:
    """The evaluation JSON (one scale) for predictions given as counts."""
    m = measured.restrict(genes)
    res = evaluate_expression(
        pred_counts, m.spots.counts * factor, m.total * factor, genes=genes, gene_list=genes
    )
    key = scale_key(m.base_um)
    keys = ("pcc_f", "pcc_s", "pcc_m", "mse", "mae", "n_spots", "n_genes")

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    def block(b):
        return {k: clean(b[k]) for k in keys}, {
            g: clean(float(r)) for g, r in b["per_gene"].items()
        }

    (ns, ng), (as_, ag) = block(res["normalised"]), block(res["absolute"])
    return {
        "scales": {key: ns},
        "genes": {key: ng},
        "absolute": {"scales": {key: as_}, "genes": {key: ag}},
    }


# ---------------------------------------------------------------------------------- maps
def map_genes(result: dict) -> list[str]:
    """ERBB2 (if evaluated) and the best-predicted other genes, four in all."""
    per_gene = next(iter(result["genes"].values()))
    ranked = sorted(
        (g for g, r in per_gene.items() if r is not None and g != "ERBB2"),
        key=lambda g: -per_gene[g],
    )
    return (["ERBB2"] if "ERBB2" in per_gene else []) + ranked[: 4 - ("ERBB2" in per_gene)]


def map_data(model, test: tuple, genes: list[str]) -> dict:
    """Measured and predicted normalised expression of ``genes``: spots and the dense map."""
    from napari_stmap.core.metrics import normalize_expression
    from napari_stmap.core.predict import predict_map, predict_spots

    slide, measured = open_slide(test[0]), load_measured(test[1])
    c, pad = measured.spots.centers_yx, measured.spots.size_px
    dense, grid = predict_map(model, slide, (*(c.min(0) - pad), *(c.max(0) + pad)), tile_px=1024)
    spot_pred = predict_spots(model, slide, measured.spots, tile_px=1024)
    meas = measured.restrict(genes)
    idx = [model.genes.index(g) for g in genes]
    return {
        "centers": c,
        "measured": normalize_expression(meas.spots.counts, meas.total),
        "spots": normalize_expression(spot_pred[:, idx], spot_pred[:, -1]),
        "dense": np.log1p(1e4 * dense[idx] / np.maximum(dense[-1], 1e-9)),
        "extent": (grid.bbox_yx[1], grid.bbox_yx[3], grid.bbox_yx[2], grid.bbox_yx[0]),
    }


def plot_maps(model, test: tuple, result: dict, out_png: Path) -> None:
    """Per gene: measured spots, PixNet's dense map, PixNet's spot sums (same colour range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = map_genes(result)
    per_gene = next(iter(result["genes"].values()))
    d = map_data(model, test, genes)
    c, extent = d["centers"], d["extent"]
    fig, axes = plt.subplots(len(genes), 3, figsize=(12, 4 * len(genes)), squeeze=False)
    for row, g in enumerate(genes):
        lo, hi = np.nanpercentile(d["measured"][:, row], [2, 98])
        plo, phi = np.nanpercentile(d["spots"][:, row], [2, 98])
        axes[row, 0].scatter(c[:, 1], c[:, 0], c=d["measured"][:, row], s=25, vmin=lo, vmax=hi)
        axes[row, 1].imshow(d["dense"][row], extent=extent, vmin=plo, vmax=phi)
        axes[row, 2].scatter(c[:, 1], c[:, 0], c=d["spots"][:, row], s=25, vmin=plo, vmax=phi)
        axes[row, 0].set_title(f"{g} measured (log1p cp10k)")
        axes[row, 1].set_title(f"{g} PixNet dense map")
        axes[row, 2].set_title(f"{g} PixNet spot sums, r={per_gene[g]:.2f}")
        for ax in axes[row]:
            ax.set(xlim=extent[:2], ylim=extent[2:], aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------- summary
def summary(results: dict[str, dict[str, dict]]) -> tuple[str, dict]:
    """Markdown table of PCC@F/S/M (normalised) mean ± std over folds, per model."""
    order = ["pixnet", "spotnet", "ridge", "mean", "ceiling"]
    models = sorted(
        {m for fold in results.values() for m in fold},
        key=lambda m: (order.index(m) if m in order else len(order), m),
    )
    lines = [
        "| model | folds | PCC@F | PCC@S | PCC@M | MSE | abs PCC@M | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = {}
    for m in models:
        runs = [fold[m] for fold in results.values() if m in fold]
        vals = {
            k: [_first(r["scales"])[k] for r in runs] for k in ("pcc_f", "pcc_s", "pcc_m", "mse")
        }
        vals["abs_pcc_m"] = [
            _first(r["absolute"]["scales"])["pcc_m"] if "absolute" in r else None for r in runs
        ]
        vals["train_s"] = [r.get("seconds", {}).get("train", 0.0) for r in runs]
        stats = {k: (_nanstat(v, np.nanmean), _nanstat(v, np.nanstd)) for k, v in vals.items()}
        table[m] = {"folds": len(runs), **{k: {"mean": a, "std": b} for k, (a, b) in stats.items()}}
        cells = [
            f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}"
            for k in ("pcc_f", "pcc_s", "pcc_m", "mse", "abs_pcc_m")
        ]
        lines.append(
            f"| {m} | {len(runs)} | " + " | ".join(cells) + f" | {stats['train_s'][0]:.0f} |"
        )
    return "\n".join(lines), table


def _first(d: dict) -> dict:
    return next(iter(d.values()))


def _nanstat(values, fn) -> float:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return float(fn(arr)) if np.isfinite(arr).any() else float("nan")


def run_fold(test_name: str, args, which: set[str]) -> dict:
    """Train and score every model of one fold; writes the maps PNG."""
    folder = args.out / f"test_{test_name}"
    folder.mkdir(exist_ok=True)
    train = [section(args.data, s) for s in SECTIONS if s != test_name]
    test = section(args.data, test_name)
    from napari_stmap.core.model import list_models

    fold, pix = {}, None
    for arch in [m for m in args.models.split(",") if m in list_models()]:
        fold[arch], model = run_network(arch, train, test, args, folder)
        pix = model if arch == "pixnet" else pix
        log.info("%s %s: %s", test_name, arch, _first(fold[arch]["scales"]))
    genes = list(pix.genes)[: args.genes] if pix is not None else _genes(train, args.genes)
    fold.update(run_baselines(train, test, genes, which))
    if pix is not None and not args.no_maps:
        plot_maps(pix, test, fold["pixnet"], folder / f"maps_{test_name}.png")
    return fold


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in (
        "napari_stmap.core.io.slide",
        "napari_stmap.core.io.spots",
        "napari_stmap.core.metrics",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.merge:
        return merge(args.merge)
    args.out.mkdir(parents=True, exist_ok=True)
    which = set(args.models.split(","))
    results: dict[str, dict] = {}
    for test_name in args.folds.split(","):
        results[test_name] = run_fold(test_name, args, which)
        (args.out / "results.json").write_text(
            json.dumps({"folds": results}, indent=1, default=_json)
        )
    text, table = summary(results)
    print(text)
    out = {"summary": table, "folds": results}
    (args.out / "results.json").write_text(json.dumps(out, indent=1, default=_json))
    (args.out / "results.md").write_text(text + "\n")
    return 0


def merge(folders: list[Path]) -> int:
    """Print the table of folds run separately (``results.json`` of each folder; models of
    the same fold are merged, so pixnet/spotnet and magnet can run as separate jobs)."""
    results: dict[str, dict] = {}
    for folder in folders:
        folds = json.loads((Path(folder) / "results.json").read_text())["folds"]
        for name, fold in folds.items():
            results.setdefault(name, {}).update(fold)
    text, _ = summary(dict(sorted(results.items())))
    print(f"folds: {', '.join(sorted(results))}")
    print(text)
    return 0


def _genes(train: list, k: int) -> list[str]:
    measured = [load_measured(p) for _, p in train]
    return select_genes(measured, [m.units(m.base_um) for m in measured], f"top:{k}")


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
