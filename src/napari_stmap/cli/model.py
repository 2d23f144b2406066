"""``stmap train`` and ``stmap evaluate``: thin calls into :mod:`napari_stmap.core.training`
and :mod:`napari_stmap.core.evaluate`.

Registered in :mod:`napari_stmap.cli` through :func:`_add_train` and :func:`_add_evaluate`.
Torch is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import StmapInputError
from .common import _add_precision, _float_list, _progress

__all__ = ["_add_evaluate", "_add_train", "cmd_evaluate", "cmd_train"]

_TRAIN_EPILOG = """\
defaults (random init, sized for a 2-core CPU: ~7 min for three HER2ST sections):
  Visium / legacy ST spots (>= 55 µm): --mpp 2.0, stride 4, --tile-px 256, encoder resnet10t
    (PixNet: decoder 64/32/32 channels + a 64-channel context branch)
  Visium HD bins: --mpp 0.5, stride 4, --tile-px 256, same encoder, --bin-um 16
  SpotNet: same encoder, crops of max(112 µm, 1.5 x spot size), 32 crops per step
  all: loss MSE on per-gene z-scores (--no-zscore: on log1p cp10k), EMA of the weights
    (--ema-decay 0.98), --lr 2e-3; `stmap evaluate --tta` averages 8 turns/flips
  MagNet: same encoder (+ a copy for the context), views of 56/112/256 µm for HD bins or
    112/224/512 µm for spots >= 55 µm; --batch-size counts groups of 32 neighbouring bins
    (use 1-2 on a CPU for small data such as HER2ST)

larger models for a GPU, e.g.:
  --device cuda --encoder resnet50 --mpp 1.0 --tile-px 512 --batch-size 16 --epochs 30
  --device cuda --encoder vit_large_patch16_224 --encoder-weights uni.safetensors --mpp 0.5
  --model-option context_channels=64 --model-option 'decoder_channels=[128, 64, 64]'
  (a pathology foundation model such as UNI from a local .safetensors file; ViT encoders give
  only approximately seamless tiled maps)

the resumable state (model + optimizer as safetensors, progress as JSON) is written next to
--out as MODEL.state.safetensors / MODEL.state.json after every epoch.
"""


# ------------------------------------------------------------------------------------ train
#: ``stmap train`` options after --slide/--spots/--out: (flag, argparse keyword arguments).
_TRAIN_OPTIONS: tuple[tuple[str, dict], ...] = (
    (
        "--arch",
        {
            "default": "pixnet",
            "help": "pixnet (dense, default), spotnet (baseline) or magnet (bins + neighbour graph)",
        },
    ),
    (
        "--genes",
        {
            "default": "top:250",
            "help": "top:K (by mean normalised expression; default top:250) or a file with one gene per line",
        },
    ),
    (
        "--bin-um",
        {
            "type": _float_list,
            "default": None,
            "help": "Visium HD training scales in µm (2 µm bins are summed into them); "
            "default 16, which beat 2,8,16 and 8,16 on the synthetic HD benchmark",
        },
    ),
    ("--epochs", {"type": int, "default": 24, "help": "epochs; default 24"}),
    ("--device", {"default": "cpu", "help": "cpu, cuda or mps; default cpu"}),
    (
        "--val-slide",
        {
            "type": Path,
            "default": None,
            "help": "held-out slide: PCC@M after every epoch, best epoch kept",
        },
    ),
    ("--val-spots", {"type": Path, "default": None, "help": "measured spots of --val-slide"}),
    ("--encoder", {"default": None, "help": "timm encoder (default resnet10t)"}),
    ("--encoder-weights", {"default": None, "help": "local .safetensors weights of the encoder"}),
    (
        "--model-option",
        {
            "action": "append",
            "default": [],
            "metavar": "KEY=VALUE",
            "help": "architecture option, VALUE as JSON (repeat), e.g. context_channels=64 or "
            "'decoder_channels=[128, 64, 64]'",
        },
    ),
    (
        "--mpp",
        {
            "type": float,
            "default": None,
            "help": "µm/px the model works at (default 2.0 for spots >= 55 µm, else 0.5)",
        },
    ),
    (
        "--tile-px",
        {"type": int, "default": None, "help": "pixnet training tile side, model px; default 256"},
    ),
    (
        "--stride",
        {
            "type": int,
            "default": None,
            "help": "pixnet output stride, model px per map pixel (max encoder stride / 2^n); "
            "default 4",
        },
    ),
    (
        "--batch-size",
        {
            "type": int,
            "default": None,
            "help": "tiles (pixnet, default 8), crops (spotnet, default 32) or (magnet) groups "
            "of bins (default 8) per step",
        },
    ),
    (
        "--lr",
        {
            "type": float,
            "default": 2e-3,
            "help": "peak learning rate (AdamW, warm-up + cosine); default 2e-3",
        },
    ),
    (
        "--weight-decay",
        {"type": float, "default": 1e-4, "help": "AdamW weight decay; default 1e-4"},
    ),
    (
        "--zscore",
        {
            "action": argparse.BooleanOptionalAction,
            "default": True,
            "help": "MSE on per-gene z-scores of the normalised expression (training mean/std); "
            "default on",
        },
    ),
    (
        "--ema-decay",
        {
            "type": float,
            "default": 0.98,
            "help": "exponential moving average of the weights (per step); the saved model is "
            "the average; default 0.98, 0 turns it off",
        },
    ),
    (
        "--crop-um",
        {
            "type": float,
            "default": None,
            "help": "spotnet crop side, µm; default max(112, 1.5 x spot size)",
        },
    ),
    (
        "--pcc-weight",
        {"type": float, "default": 0.5, "help": "weight of (1 - PCC) in the loss; default 0.5"},
    ),
    (
        "--total-weight",
        {"type": float, "default": 0.1, "help": "weight of the MSE of log totals; default 0.1"},
    ),
    (
        "--steps-per-epoch",
        {"type": int, "default": None, "help": "cap the batches per epoch (quick runs)"},
    ),
    (
        "--threads",
        {
            "type": int,
            "default": None,
            "help": "torch CPU threads (default: cores not busy with other jobs, by load average)",
        },
    ),
    ("--no-augment", {"action": "store_true", "help": "no turns, flips, stain jitter or blur"}),
    ("--seed", {"type": int, "default": 0, "help": "random seed; default 0"}),
    ("--resume", {"action": "store_true", "help": "continue from the state saved next to --out"}),
)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense (pixnet) or spot-crop (spotnet) expression model",
        description="Train a model that predicts expected counts (genes + total) from H&E, "
        "on measured spots/bins. Pass --slide/--spots pairs in order.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--slide", type=Path, action="append", required=True, help="H&E slide (repeat)")
    p.add_argument(
        "--spots",
        type=Path,
        action="append",
        required=True,
        help="measured spots of the slide: Space Ranger outs/, Visium HD outs/, .h5ad or a "
        "SpatialData .zarr store (repeat)",
    )
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NAME",
        help="table of a SpatialData --spots store (once for all stores, or once per --spots "
        "in order); default: the store's only table (Visium HD: the bin size --bin-um needs)",
    )
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    for flag, kwargs in _TRAIN_OPTIONS:
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=cmd_train)


def _train_config(args):
    from ..core.training import TrainConfig

    return TrainConfig(
        arch=args.arch,
        genes=args.genes,
        bin_um=args.bin_um,
        epochs=args.epochs,
        mpp=args.mpp,
        tile_px=args.tile_px,
        stride=args.stride,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        zscore=args.zscore,
        ema_decay=args.ema_decay,
        crop_um=args.crop_um,
        pcc_weight=args.pcc_weight,
        total_weight=args.total_weight,
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        model_config=_model_options(args.model_option),
        seed=args.seed,
        device=args.device,
        augment=not args.no_augment,
        max_batches_per_epoch=args.steps_per_epoch,
        num_threads=args.threads,
    )


def _model_options(items: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` (VALUE as JSON, else a plain string) -> ``{KEY: value}``."""
    import json

    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            msg = f"--model-option {item!r}: write KEY=VALUE, e.g. context_channels=64"
            raise StmapInputError(msg)
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _check_train_args(args) -> tuple[list, tuple | None]:
    if len(args.slide) != len(args.spots):
        msg = f"got {len(args.slide)} --slide but {len(args.spots)} --spots; pass them in pairs"
        raise StmapInputError(msg)
    if (args.val_slide is None) != (args.val_spots is None):
        msg = "pass both --val-slide and --val-spots (or neither)"
        raise StmapInputError(msg)
    if args.mpp is not None and not args.mpp > 0:
        msg = f"--mpp must be a positive µm/px, got {args.mpp}"
        raise StmapInputError(msg)
    if args.out.suffix != ".safetensors":
        msg = f"--out {args.out}: model files are .safetensors; name it e.g. model.safetensors"
        raise StmapInputError(msg)
    val = None if args.val_slide is None else (args.val_slide, args.val_spots)
    if len(args.table) not in (0, 1, len(args.spots)):
        msg = f"got {len(args.table)} --table for {len(args.spots)} --spots; pass one, or one per --spots"
        raise StmapInputError(msg)
    tables: list[str | None] = list(args.table) or [None] * len(args.spots)
    if len(args.table) == 1 and len(args.spots) > 1:
        from ..core.io.spots import spatialdata_location

        stores = [spatialdata_location(p) is not None for p in args.spots]
        if any(stores):  # one table for every SpatialData store
            tables = [args.table[0] if s else None for s in stores]
        else:  # refused by _with_table, naming the first --spots
            tables = [args.table[0]] + [None] * (len(args.spots) - 1)
    spots = [_with_table(p, t) for p, t in zip(args.spots, tables, strict=True)]
    return list(zip(args.slide, spots, strict=True)), val


def _with_table(spots: Path, table: str | None) -> Path:
    """``STORE/tables/NAME`` for ``--spots STORE --table NAME`` (checked); ``spots`` otherwise."""
    if table is None:
        return spots
    from ..core.io.spots import table_path

    return table_path(spots, table)


class _TrainBar:
    """tqdm bar on stderr, one per epoch, with the running loss."""

    def __init__(self) -> None:
        self.bar, self.epoch = None, None

    def __call__(self, info: dict) -> None:
        from tqdm import tqdm

        if info["epoch"] != self.epoch:
            self.close()
            self.epoch = info["epoch"]
            self.bar = tqdm(
                total=info["steps"],
                desc=f"epoch {info['epoch']}/{info['epochs']}",
                unit="step",
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
            )
        self.bar.n = info["step"]
        if "loss" in info:
            self.bar.set_postfix(
                loss=f"{info['loss']:.3f}", pcc=f"{info.get('pcc', 0):.3f}", refresh=False
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_train(args) -> int:
    """``stmap train --slide S --spots P [...] --arch A --out MODEL.safetensors``."""
    pairs, val = _check_train_args(args)
    from ..core.training import train_model

    bar = _TrainBar()

    def report(record: dict) -> None:
        bar.close()
        val_txt = (
            f", val PCC@M {record['val_pcc_m']:.3f}" if record.get("val_pcc_m") is not None else ""
        )
        print(
            f"epoch {record['epoch']}: loss {record['loss']:.4f} (PCC {record['pcc']:.3f}){val_txt}, {record['seconds']:.0f} s",
            flush=True,
        )

    try:
        result = train_model(
            pairs,
            args.out,
            _train_config(args),
            val=val,
            resume=args.resume,
            progress=bar,
            on_epoch_end=report,
        )
    finally:
        bar.close()
    best = (
        ""
        if result.best_metric is None
        else f" (best epoch {result.best_epoch}, val PCC@M {result.best_metric:.3f})"
    )
    print(
        f"wrote {result.out}: {result.model.arch}, {len(result.genes)} genes, {result.config.mpp:g} µm/px{best}"
    )
    return 0


# --------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a model against measured spots/bins at several scales",
        description="Per scale: PCC@F/S/M (quartile/median/mean over genes of per-gene Pearson "
        "r across spots on log1p(1e4 gene/total)), MSE, MAE; absolute-count figures apart. "
        "Visium HD bins are summed into coarser sizes (full blocks only); a size that is no "
        "multiple of the bins (55) means disks of that size on a 100 µm hexagonal lattice made "
        "of the bins whose centres fall inside; sizes finer than the measurement are refused.",
    )
    p.add_argument("--model", type=Path, required=True, help="model file (.safetensors)")
    p.add_argument("--slide", type=Path, required=True, help="H&E slide")
    p.add_argument(
        "--spots",
        type=Path,
        required=True,
        help="measured spots: outs/, Visium HD outs/, .h5ad or a SpatialData .zarr store",
    )
    p.add_argument(
        "--table",
        default=None,
        metavar="NAME",
        help="table of a SpatialData --spots store (default: its only table; Visium HD: "
        "the bin size the scales need)",
    )
    p.add_argument(
        "--bin-um",
        type=_float_list,
        default=None,
        help="scales in µm, e.g. 2,8,16,55 (default: measured sizes)",
    )
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="synthetic sample root: also evaluate against its truth",
    )
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="only the K model genes with the highest mean measured count",
    )
    p.add_argument(
        "--pred",
        type=Path,
        default=None,
        metavar="STORE.zarr",
        help="score from this prediction store of the model on the slide (from stmap predict "
        "or the viewer; or the folder of the viewer's stores): the network runs only for "
        "tiles the store lacks, and writes them into it (a missing store is created); a "
        "store of another model or slide is refused; not with --tta (a store is single-pass)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps; default cpu")
    p.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="dense prediction tile (model px); default 1024 (with --pred: the store's)",
    )
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument(
        "--tta",
        action="store_true",
        help="average each tile or crop over its 8 turns and flips (8x slower; not with --pred)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: cores not busy with other jobs)",
    )
    _add_precision(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    """``stmap evaluate --model M --slide S --spots P [--pred STORE.zarr] --json OUT.json``."""
    import torch

    from ..core.evaluate import evaluate_model, format_table
    from ..core.training import available_threads, check_device

    check_device(args.device)
    spots = _with_table(args.spots, args.table)
    torch.set_num_threads(int(args.threads or available_threads()))
    if args.pred is not None:
        desc, unit, tile_px = "evaluate (store)", "block", args.tile_px
    else:
        desc, unit, tile_px = "evaluate (TTA x8)" if args.tta else "evaluate", "spot", 1024
    with _progress(desc, unit=unit) as progress:
        result = evaluate_model(
            args.model,
            args.slide,
            spots,
            args.bin_um,
            slide_mpp=args.mpp,
            store=args.pred,
            truth=args.truth,
            top_k=args.top_k,
            device=args.device,
            tile_px=args.tile_px or tile_px,
            tta=args.tta,
            precision=args.precision,
            progress=progress,
        )
    args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {args.json}")
    return 0
