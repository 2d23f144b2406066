"""What defines a training run: :class:`TrainConfig` and its checks.

:func:`resolve_config` fills the defaults that depend on the data (µm/px, tiles, crops,
batches), :func:`read_gene_spec` parses ``--genes``, and :func:`available_threads`,
:func:`check_device` and :func:`check_arch` check what the machine and the registry offer.
Why the CPU defaults are what they are: docs/her2st-tuning.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import StmapInputError
from ..model import list_models

__all__ = [
    "CPU_ENCODER",
    "DENSE_BATCH",
    "SPOT_BATCH",
    "TrainConfig",
    "available_threads",
    "check_arch",
    "check_device",
    "read_gene_spec",
    "resolve_config",
]

#: Encoder of the CPU defaults: ResNet-10-T (4.9 M parameters, no global operations).
CPU_ENCODER = "resnet10t"
_LARGE_SPOT_UM = 55.0
#: Default batch sizes: tiles per step of dense models, crops per step of spot models.
DENSE_BATCH, SPOT_BATCH = 8, 32


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the state and the model metadata).

    ``None`` fields are filled from the data by :func:`resolve_config`.

    Attributes
    ----------
    arch : str
        Registered architecture (``pixnet``, ``spotnet``, ``pixnet_tiny`` ...).
    genes : str or list of str
        ``"top:K"``, a gene-list file, or the genes themselves.
    bin_um : tuple of float, optional
        Visium HD training scales, µm (default 16 µm only, see
        :func:`~napari_stmap.core.training.data.load_training_data`).
    epochs : int
        Passes over the training spots.
    batch_size : int, optional
        Tiles (dense models, default 8) or crops (spot models, default 32) per step.
    mpp : float, optional
        µm/px of the model input (default 2.0 for spots ≥ 55 µm, else 0.5).
    tile_px, stride : int, optional
        Dense models: training tile side and output stride, model px (default 256 and 4).
    lr, weight_decay, warmup_steps : float, float, int
        AdamW; the learning rate warms up linearly then follows a cosine to 5 %.
    mse_weight, pcc_weight, total_weight : float
        Loss weights (:func:`~napari_stmap.core.training.loss.expression_loss`).
    encoder, encoder_weights : str, optional
        timm encoder and a local ``.safetensors`` file of its weights.
    model_config : dict
        Extra ``create_model`` keyword arguments (override everything else).
    crop_um : float, optional
        Spot models: crop side, µm.
    seed : int
        Seeds the model initialisation and every epoch's randomness.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"mps"``.
    augment : bool
        Turns, flips, stain jitter and blur.
    max_spots_per_tile : int
        At most this many units per tile enter the loss (2 µm bins: a random subset).
    max_batches_per_epoch : int, optional
        Cut epochs short (quick runs, tests).
    num_threads : int, optional
        torch CPU threads (default: :func:`available_threads`; bitwise reproducibility
        needs the same number).
    cache_mb : float
        Largest resampled slide region kept in memory per slide, MiB.
    zscore : bool
        MSE term on per-gene z-scores of the normalised expression (training-set mean and
        std per gene, :func:`~napari_stmap.core.training.data.target_stats`) instead of on
        the normalised expression itself, so every gene weighs the same in it.
    ema_decay : float
        Keep an exponential moving average of the weights (per step, decay
        ``min(ema_decay, (1 + n) / (10 + n))`` after n updates); the saved and returned model
        is the average. 0 turns it off.
    """

    arch: str = "pixnet"
    genes: str = "top:250"
    bin_um: tuple[float, ...] | None = None
    epochs: int = 24
    mpp: float | None = None
    tile_px: int | None = None
    stride: int | None = None
    batch_size: int | None = None
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    mse_weight: float = 1.0
    pcc_weight: float = 0.5
    total_weight: float = 0.1
    encoder: str | None = None
    encoder_weights: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    crop_um: float | None = None
    seed: int = 0
    device: str = "cpu"
    augment: bool = True
    max_spots_per_tile: int = 512
    max_batches_per_epoch: int | None = None
    num_threads: int | None = None
    cache_mb: float = 512.0
    zscore: bool = True
    ema_decay: float = 0.98

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        out = asdict(self)
        out["bin_um"] = None if self.bin_um is None else list(self.bin_um)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("bin_um") is not None:
            known["bin_um"] = tuple(float(b) for b in known["bin_um"])
        return cls(**known)


def resolve_config(cfg: TrainConfig, largest_spot_um: float, binned: bool) -> TrainConfig:
    """Fill the data-dependent defaults and check the values.

    Defaults, sized for a 2-core CPU and a randomly initialised encoder:

    - Spots ≥ 55 µm (Visium, legacy ST such as HER2ST's 100 µm spots): model at 2.0 µm/px,
      output stride 4 (8 µm map pixels), tiles of 256 px = 512 µm, batches of 8 tiles.
    - Visium HD bins: 0.5 µm/px, stride 4 (2 µm map pixels), tiles of 256 px.
    - Spot models: crops of max(112 µm, 1.5 × the largest spot), batches of 32 crops.

    The encoder and decoder of these defaults are chosen in
    :func:`~napari_stmap.core.training.loop.build_model`. On a GPU use larger settings, e.g.
    ``--encoder resnet50 --mpp 1.0 --tile-px 512 --batch-size 16 --epochs 30``, or a pathology
    foundation model (UNI: ``--encoder vit_large_patch16_224 --encoder-weights
    uni.safetensors``, with ``--mpp 0.5``); ViT encoders attend over the whole tile, so their
    tiled maps are only approximately seamless.

    Parameters
    ----------
    cfg : TrainConfig
        The user's choices; ``None`` fields are filled.
    largest_spot_um : float
        Largest training spot / scale size (µm).
    binned : bool
        Whether any training data are Visium HD bins.
    """
    large = largest_spot_um >= _LARGE_SPOT_UM and not binned
    mpp = cfg.mpp or (2.0 if large else 0.5)
    stride = cfg.stride or 4
    tile = cfg.tile_px or 256
    crop = cfg.crop_um or max(112.0, 1.5 * largest_spot_um)
    batch = cfg.batch_size or (SPOT_BATCH if cfg.arch.startswith("spotnet") else DENSE_BATCH)
    if tile * mpp < largest_spot_um:
        msg = f"tiles of {tile} px at {mpp:g} µm/px are smaller than the {largest_spot_um:g} µm spots; raise --tile-px"
        raise StmapInputError(msg)
    if cfg.epochs < 1 or batch < 1:
        msg = f"--epochs and --batch-size must be >= 1 (got {cfg.epochs}, {batch})"
        raise StmapInputError(msg)
    return replace(
        cfg,
        mpp=float(mpp),
        stride=int(stride),
        tile_px=int(tile),
        crop_um=float(crop),
        batch_size=int(batch),
    )


def read_gene_spec(spec: str | Sequence[str]) -> tuple[int | None, list[str] | None]:
    """Parse ``--genes``: ``"top:K"`` -> (K, None); a file path -> (None, genes); a list -> (None, list).

    A gene file holds one gene per line; ``#`` starts a comment.
    """
    if not isinstance(spec, str):
        return None, [str(g) for g in spec]
    if spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            k = 0
        if k < 1:
            msg = f"--genes {spec!r}: expected top:K with K >= 1 (e.g. top:250) or a file of gene names"
            raise StmapInputError(msg)
        return k, None
    path = Path(spec).expanduser()
    if not path.is_file():
        msg = f"--genes {spec!r}: no such file; pass top:K (e.g. top:250) or a file with one gene per line"
        raise StmapInputError(msg)
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    genes = list(dict.fromkeys(g for g in lines if g))
    if not genes:
        msg = f"{path}: no gene names found; write one gene per line"
        raise StmapInputError(msg)
    return None, genes


def available_threads() -> int:
    """Torch CPU threads to use: the cores this process may use that other jobs leave free.

    ``cores − round(1-minute load average)``, at least 1. torch's OpenMP threads spin at
    every barrier, so more threads than free cores makes each step many times slower on a
    shared CPU (measured on a 2-core machine with one other busy job: 0.8–1 s per PixNet step
    with 1 thread, 2–16 s with 2 threads). Pass ``num_threads`` / ``--threads`` to override.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # pragma: no cover - no load average
        busy = 0
    return max(1, min(cores, cores - busy))


def check_device(device: str) -> None:
    """Raise :class:`StmapInputError` when ``device`` is not usable here."""
    import torch

    kind = str(device).split(":")[0]
    ok = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not ok.get(kind, False):
        usable = ", ".join(k for k, v in ok.items() if v)
        msg = f"device {device!r} is not available here; use one of: {usable}"
        raise StmapInputError(msg)


def check_arch(arch: str) -> None:
    """Raise :class:`StmapInputError` when ``arch`` is not a registered architecture."""
    if arch not in list_models():
        msg = f"unknown model architecture {arch!r}; valid names: {', '.join(list_models())}"
        raise StmapInputError(msg)
