"""The training loop: build the model, run the epochs, validate, keep the best and the state.

:func:`train_model` is the one entry point (``stmap train``, the demo, the benchmarks). Each
step draws a batch (:mod:`.batches`; MagNet: :mod:`.magnet`), computes
:func:`~.loss.expression_loss` on spot sums and updates AdamW and the averaged weights; each
epoch ends with validation, the model file and the resumable state (:mod:`.state`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregate import aggregate_torch
from ..errors import StmapInputError
from ..evaluate import evaluate_measured
from ..io.slide import open_slide
from ..io.spots import available_bin_sizes
from ..measured import load_measured, scale_key
from ..model import create_model, save_model
from .batches import make_spot_batch, make_tile_batch, plan_epoch
from .config import CPU_ENCODER, TrainConfig, available_threads, check_arch, check_device
from .data import (
    TrainSlide,
    load_training_data,
    prior_density,
    reference_area,
    slide_pairs,
    target_stats,
)
from .loss import expression_loss
from .magnet import magnet_forward, magnet_kwargs
from .state import _ema_init, _ema_update, load_state, read_state_info, save_state

__all__ = ["TrainResult", "build_model", "train_model"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes
    ----------
    model : StmapModel
        The network after the last epoch (the best one is in ``out``).
    out : Path
        Model file (best epoch on validation, else the last).
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``mse``, ``pcc``, ``total``, ``lr``, ``seconds`` and,
        with validation, ``val_pcc_f``, ``val_pcc_s``, ``val_pcc_m``.
    best_epoch, best_metric
        Epoch saved to ``out`` and its validation PCC@M (None without validation).
    config : TrainConfig
        The resolved configuration.
    genes : list of str
        Genes of the model.
    """

    model: Any
    out: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metric: float | None
    config: TrainConfig
    genes: list[str]


def _model_kwargs(cfg: TrainConfig, prior: np.ndarray, ref_area_um2: float) -> dict[str, Any]:
    """create_model keyword arguments for the run (CPU-sized defaults with the CPU encoder).

    CPU defaults: ``pixnet`` gets the encoder ``resnet10t`` with a decoder of one stage per
    halving down to the stride (64, 32, 32 channels at stride 4) plus a 64-channel context
    branch (3 × 3 mean of the deepest features, 192 µm across at 2 µm/px, concatenated to the
    embedding); ``spotnet`` and ``magnet`` get the same encoder. ``prior`` is the mean depth-scaled counts per µm² of each output channel: PixNet's head
    starts at ``prior × pixel area``, SpotNet's at ``prior × ref_area_um2``.
    """
    kw: dict[str, Any] = {"mpp": cfg.mpp}
    if cfg.arch == "pixnet" and cfg.encoder in (None, CPU_ENCODER):
        levels = int(round(math.log2(32 / cfg.stride)))
        kw.update(
            encoder=CPU_ENCODER,
            decoder_channels=[64, 32, 32, 32][:levels],
            attn_windows=[5, 3, 3, 0][:levels],
            context_channels=64,
        )
    elif cfg.arch in ("spotnet", "magnet") and cfg.encoder is None:
        kw["encoder"] = CPU_ENCODER
    if cfg.encoder is not None:
        kw["encoder"] = cfg.encoder
    if cfg.encoder_weights is not None:
        kw["encoder_weights"] = cfg.encoder_weights
    if cfg.arch.startswith("pixnet"):
        px_um2 = (cfg.stride * cfg.mpp) ** 2
        kw.update(stride=cfg.stride, init_counts_per_px=(prior * px_um2).tolist())
    elif cfg.arch.startswith("spotnet"):
        kw.update(crop_um=cfg.crop_um, init_counts_per_spot=(prior * ref_area_um2).tolist())
    elif cfg.arch.startswith("magnet"):  # views and head prior: .magnet
        kw.update(magnet_kwargs(cfg, prior, ref_area_um2))
    return {**kw, **cfg.model_config}


def build_model(cfg: TrainConfig, genes: Sequence[str], slides: Sequence[TrainSlide]) -> Any:
    """A fresh model for the run (seeded), its head biased to the mean expression."""
    import torch

    torch.manual_seed(cfg.seed)
    kw = _model_kwargs(cfg, prior_density(slides), reference_area(slides))
    model = create_model(cfg.arch, genes=list(genes), **kw)
    if model.input_kind not in ("dense", "spot", "bins"):
        msg = f"architecture {cfg.arch!r} has input_kind {model.input_kind!r}; training supports 'dense', 'spot' and 'bins'"
        raise StmapInputError(msg)
    return model.to(cfg.device).to(memory_format=torch.channels_last)


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5 % of ``cfg.lr``; a function of the step only."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cos = 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return cfg.lr * warm * (0.05 + 0.95 * cos)


class _Trainer:
    """State of one run: data, model, optimizer, validation, bookkeeping."""

    def __init__(self, pairs, out, cfg, val, resume, progress) -> None:
        import torch

        self.out, self.progress = Path(out), progress
        saved = read_state_info(out) if resume else None
        if saved is not None:
            cfg = self._resumed_config(saved, cfg, pairs)
        torch.set_num_threads(int(cfg.num_threads or available_threads()))
        genes, depth = (saved["genes"], saved["depth"]) if saved else (None, None)
        self.slides, self.genes, self.depth, self.cfg = load_training_data(
            pairs, cfg, genes=genes, depth=depth
        )
        self.ref_area = reference_area(self.slides)
        self.model = self._model(saved)
        self.dense = self.model.input_kind == "dense"
        bins = self.model.input_kind == "bins"  # MagNet: groups of neighbouring bins
        self.group_bins = int(self.model.config["group_bins"]) if bins else None
        if self.dense and self.cfg.tile_px % max(self.model.align_px, self.model.stride):
            step = max(self.model.align_px, self.model.stride)
            msg = f"--tile-px {self.cfg.tile_px} must be a multiple of {step} px for this model (e.g. {step * max(1, round(self.cfg.tile_px / step))})"
            raise StmapInputError(msg)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.history: list[dict[str, Any]] = saved["history"] if saved else []
        self.best = (saved["best_epoch"], saved["best_metric"]) if saved else (None, None)
        self.epoch = int(saved["epoch"]) if saved else 0
        self.ema = _ema_init(self.model) if self.cfg.ema_decay > 0 else None
        self.ema_updates = int(saved.get("ema_updates", 0)) if saved else 0
        if saved is not None:
            ema = load_state(out, self.model, self.optimizer, saved)
            if self.ema is not None and ema:
                self.ema = {k: ema[k].to(v.device) for k, v in self.ema.items()}
        self.stats = target_stats(self.slides)
        self.scales = sorted({t.bin_um for ts in self.slides for t in ts.tables.values()})
        self.scale_std = self._scale_std() if self.cfg.zscore else {}
        self.steps_per_epoch = len(
            plan_epoch(
                self.slides,
                self.cfg,
                np.random.default_rng(0),
                dense=self.dense,
                group_bins=self.group_bins,
            )
        )
        self.val = self._load_val(val)
        self.model.metadata = self.metadata()

    def _scale_std(self) -> dict[float, Any]:
        """Per-scale (µm) σ of the z-scored MSE (:func:`~.loss.expression_loss`)."""
        import torch

        return {
            b: torch.tensor(
                target_stats(self.slides, bin_um=b)["std"],
                dtype=torch.float32,
                device=self.cfg.device,
            )
            for b in self.scales
        }

    @staticmethod
    def _resumed_config(saved: dict, cfg: TrainConfig, pairs) -> TrainConfig:
        data = [[str(Path(s)), str(Path(p))] for s, p in slide_pairs(pairs)]
        if [d[:2] for d in saved["pairs"]] != data:
            msg = f"the saved state was trained on {saved['pairs']}; resume with the same --slide/--spots pairs"
            raise StmapInputError(msg)
        old = TrainConfig.from_json(saved["config"])
        return replace(old, epochs=cfg.epochs, device=cfg.device, num_threads=cfg.num_threads)

    def _model(self, saved: dict | None) -> Any:
        import torch

        if saved is None:
            return build_model(self.cfg, self.genes, self.slides)
        config = {k: v for k, v in saved["model_config"].items() if k != "genes"}
        config.update(pretrained=False, encoder_weights=None)
        model = create_model(saved["arch"], genes=self.genes, **config)
        return model.to(self.cfg.device).to(memory_format=torch.channels_last)

    def _load_val(self, val) -> dict[str, Any] | None:
        if val is None:
            return None
        slide_path, spots_path = Path(val[0]), Path(val[1])
        slide = open_slide(slide_path)
        scales = [max(self.scales)] if available_bin_sizes(spots_path) else None
        measured = load_measured(spots_path, scales_um=scales, slide=slide)
        scale = scales[0] if scales else measured.base_um
        return {
            "slide": slide,
            "measured": measured,
            "scale": scale,
            "paths": (slide_path, spots_path),
        }

    def metadata(self) -> dict[str, Any]:
        """Model-file metadata: training data, depth, genes rule, metrics, epochs, seed."""
        data = [
            {
                "slide": str(ts.slide_path),
                "spots": str(ts.spots_path),
                "depth_factor": ts.factor,
                "counts_per_um2": ts.density,
                "n_units": {k: t.n for k, t in ts.tables.items()},
            }
            for ts in self.slides
        ]
        depth = {
            **self.depth,
            "statistic": "median total counts per µm² of in-tissue spot area (coarsest scale)",
        }
        training = {
            "data": data,
            "depth": depth,
            "genes_rule": self.cfg.genes if isinstance(self.cfg.genes, str) else "list",
            "bin_um": self.scales,
            "spot_area_um2": self.ref_area,
            "tile_px": self.cfg.tile_px,
            "target_stats": self.stats if self.cfg.zscore else None,
            "weights": f"EMA, decay {self.cfg.ema_decay:g}"
            if self.ema is not None
            else "last step",
            "epochs": self.epoch,
            "seed": self.cfg.seed,
            "config": self.cfg.to_json(),
        }
        if self.val is not None:
            training["validation"] = {
                "slide": str(self.val["paths"][0]),
                "spots": str(self.val["paths"][1]),
                "scale_um": self.val["scale"],
                "best_epoch": self.best[0],
            }
        metrics = {"history": self.history, "best_epoch": self.best[0], "val_pcc_m": self.best[1]}
        return {"training": training, "metrics": metrics}

    def state_info(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "genes": self.genes,
            "depth": self.depth,
            "pairs": [[str(ts.slide_path), str(ts.spots_path)] for ts in self.slides],
            "config": self.cfg.to_json(),
            "arch": self.model.arch,
            "model_config": self.model.config,
            "history": self.history,
            "best_epoch": self.best[0],
            "best_metric": self.best[1],
            "ema_updates": self.ema_updates,
        }

    def step(
        self, batch: list[tuple[int, int]], bin_um: float, rng: np.random.Generator
    ) -> dict[str, float] | None:
        """One optimisation step; None when the batch holds no usable spot."""
        import torch

        cfg, model, device = self.cfg, self.model, self.cfg.device
        model.train()
        aux = None  # extra loss terms of an architecture (MagNet's cross-level consistency)
        if self.dense:
            images, weights, targets = make_tile_batch(
                self.slides, batch, bin_um, cfg, model.stride, rng
            )
            if targets.shape[0] == 0:
                return None
            pred = aggregate_torch(model(model.preprocess(images).to(device)), weights.to(device))
        elif self.group_bins:  # MagNet: groups of neighbouring bins (.magnet)
            pred, targets, aux = magnet_forward(self, batch, bin_um, rng)
        else:
            images, targets = make_spot_batch(
                self.slides, batch, bin_um, cfg, model.crop_px, self.ref_area, rng
            )
            pred = model(model.preprocess(images).to(device))
        loss, parts = expression_loss(
            pred,
            torch.from_numpy(targets).to(device),
            mse_weight=cfg.mse_weight,
            pcc_weight=cfg.pcc_weight,
            total_weight=cfg.total_weight,
            gene_std=self.scale_std.get(bin_um),
        )
        if aux is not None:
            loss, parts = aux(
                loss, parts, torch.from_numpy(targets).to(device), self.scale_std.get(bin_um)
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        self.optimizer.step()
        if self.ema is not None:
            self.ema_updates = _ema_update(self.ema, model, cfg.ema_decay, self.ema_updates)
        return {"loss": float(loss.detach()), **parts, "spots": int(targets.shape[0])}

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch (randomness seeded from (seed, epoch)); returns its record."""
        import torch

        t0, epoch = time.perf_counter(), self.epoch
        rng = np.random.default_rng([self.cfg.seed, epoch])
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)
        batches = plan_epoch(
            self.slides, self.cfg, rng, dense=self.dense, group_bins=self.group_bins
        )
        total = self.cfg.epochs * self.steps_per_epoch
        parts: list[dict[str, float]] = []
        for i, batch in enumerate(batches):
            lr = _lr(self.cfg, epoch * self.steps_per_epoch + i, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            res = self.step(batch, float(rng.choice(self.scales)), rng)
            if res is not None:
                parts.append(res)
            if self.progress is not None:
                self.progress(
                    {
                        "epoch": epoch + 1,
                        "epochs": self.cfg.epochs,
                        "step": i + 1,
                        "steps": len(batches),
                        **(res or {}),
                    }
                )
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr if batches else self.cfg.lr}
        for key in ("loss", "mse", "pcc", "total"):
            record[key] = float(np.mean([p[key] for p in parts])) if parts else float("nan")
        record["seconds"] = time.perf_counter() - t0
        return record

    def validate(self) -> dict[str, Any]:
        """PCC@F/S/M (normalised) on the validation section at its measured scale."""
        v = self.val
        with self.averaged():
            res = evaluate_measured(
                self.model,
                v["slide"],
                v["measured"],
                [v["scale"]],
                device=self.cfg.device,
                tile_px=1024,
            )
        m = res["scales"][scale_key(v["scale"])]
        return {f"val_{k}": m[k] for k in ("pcc_f", "pcc_s", "pcc_m")}

    def finish_epoch(self, record: dict[str, Any]) -> None:
        """Keep the best model (validation PCC@M, else the last) and the resumable state."""
        self.epoch = record["epoch"]
        self.history.append(record)
        score = record.get("val_pcc_m")
        better = (
            self.val is None
            or self.best[0] is None
            or (score is not None and (self.best[1] is None or score > self.best[1]))
        )
        if better:
            self.best = (self.epoch, score)
        self.model.metadata = self.metadata()
        if better:
            with self.averaged():
                save_model(self.model, self.out, metadata=self.model.metadata)
        save_state(self.out, self.model, self.optimizer, self.state_info(), ema=self.ema)

    @contextlib.contextmanager
    def averaged(self):
        """Within the block the model holds the averaged weights (if any), then its own."""
        if self.ema is None:
            yield self.model
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(raw)

    def use_averaged(self) -> None:
        """Keep the averaged weights in the model for good (end of training)."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema)


def train_model(
    pairs: Sequence[tuple[Any, Any]],
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    val: tuple[Any, Any] | None = None,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a model on measured spots and save it (safetensors + JSON metadata).

    Parameters
    ----------
    pairs : sequence of (slide path, spots path)
        Training sections.
    out : path
        Model file to write (``.safetensors``); the resumable state goes next to it
        (:func:`state_paths`).
    cfg : TrainConfig, optional
        Run configuration (defaults: :class:`TrainConfig`).
    val : (slide path, spots path), optional
        Held-out section: PCC@M (normalised, at its measured scale; the coarsest training
        scale for Visium HD) after every epoch; the best epoch is kept in ``out``.
    resume : bool
        Continue from the saved state (same data; the saved configuration is used except
        ``epochs``, ``device`` and ``num_threads``). A changed ``epochs`` changes the
        learning-rate schedule of the remaining epochs.
    progress : callable, optional
        Called after every step with ``{"epoch", "epochs", "step", "steps", "loss", ...}``.
    on_epoch_end : callable, optional
        Called with the epoch's record after its state was saved.

    Returns
    -------
    TrainResult
    """
    out = Path(out)
    if out.parent and not out.parent.exists():
        msg = f"{out.parent}: output folder does not exist; create it first"
        raise StmapInputError(msg)
    cfg = cfg or TrainConfig()
    check_device(cfg.device)
    check_arch(cfg.arch)
    trainer = _Trainer(pairs, out, cfg, val, resume, progress)
    if trainer.epoch >= trainer.cfg.epochs:
        logger.warning(
            "%s: already trained for %d epochs (--epochs %d)",
            out,
            trainer.epoch,
            trainer.cfg.epochs,
        )
    while trainer.epoch < trainer.cfg.epochs:
        record = trainer.run_epoch()
        if trainer.val is not None:
            record.update(trainer.validate())
        trainer.finish_epoch(record)
        logger.info("epoch %d/%d: %s", record["epoch"], trainer.cfg.epochs, record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    trainer.use_averaged()
    best_epoch, best_metric = trainer.best
    return TrainResult(
        trainer.model, out, trainer.history, best_epoch, best_metric, trainer.cfg, trainer.genes
    )
