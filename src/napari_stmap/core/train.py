"""Training of expression networks on measured spots or bins (PixNet, SpotNet, any arch).

The loss is always computed on **spot sums**: a dense model's map is summed over each measured
footprint inside a tile (exact fractional weights, :func:`~napari_stmap.core.geometry.weight_matrix`
→ :func:`~napari_stmap.core.aggregate.aggregate_torch`), a spot model predicts one vector per
crop. Predicted and measured sums are normalised the same way, after summing::

    norm = log1p(1e4 · gene / total)     (total = all transcripts of the spot)
    loss = w_mse · MSE(norm_pred, norm_meas) + w_pcc · (1 − mean_g PCC_g) + w_total · MSE(log1p totals)

PCC_g is Pearson r of gene g across the spots of the batch (genes constant in the batch are left
out). Defaults: ``w_mse=1``, ``w_pcc=0.5``, ``w_total=0.1``.

With ``zscore`` the MSE term is taken on per-gene z-scores, ``(norm − μ_g) / σ_g`` with μ_g,
σ_g the mean and std of gene g's normalised expression over the training spots
(:func:`target_stats`, σ floored at 0.05; stored in the model metadata as
``training.target_stats``): every gene then weighs the same, instead of the few genes with
the largest spread dominating. The model still predicts counts; only the loss changes. With
several scales (Visium HD) σ_g is taken per scale, so a batch of sparse 2 µm bins (σ several
times that of 16 µm bins) does not outweigh the coarser batches.

Weight averaging (``ema_decay`` > 0): an exponential moving average of all weights and
batch-norm statistics is updated after every step; validation, the saved model and the
returned model use the average (the raw weights stay in the resumable state).

Test-time augmentation is a prediction option, not a training one:
``evaluate_measured(..., tta=True)`` / ``stmap evaluate --tta`` average the embedding over
the 8 turns and flips of every tile or crop
(:func:`~napari_stmap.core.predict_dense.dihedral_embed`).

Data
----
- Every slide is read at the model's µm/px from the nearest finer pyramid level
  (:func:`~napari_stmap.core.io.slide.read_at_mpp`); the region around its spots is cached
  in memory when it is smaller than ``cache_mb``, else tiles are read on demand.
- **Depth**: each slide's counts (genes and total) are multiplied by ``reference / d_k``, where
  ``d_k`` is the slide's median total counts per µm² of (in-tissue) spot area and ``reference``
  the mean of the training slides' ``d_k`` (:func:`~napari_stmap.core.measured.depth_factors`);
  both go into the model metadata. For Visium HD the statistic uses the coarsest training scale.
- **Genes**: ``top:K`` = the K genes with the highest mean normalised expression
  ``log1p(1e4·g/total)`` over the training spots (coarsest scale), among genes measured in
  every training slide; or a file with one gene per line (``#`` comments allowed).
- **Scales**: Visium HD bins are read at the finest size needed and summed (full blocks of
  array indices) into each requested size of ``bin_um`` (default 16 µm only, see
  :func:`_requested_scales`); every batch uses one scale drawn at random. Visium and legacy ST
  spots are used as they are.

Sampling and augmentation
-------------------------
PixNet-like (dense) models see square tiles of ``tile_px`` model px placed around a randomly
chosen spot with a random offset; all spots of the batch's scale whose footprint lies fully
inside the tile are used (at most ``max_spots_per_tile``). Spot models see one crop of
``model.crop_px`` around each spot; their target is the spot's counts × (reference spot area /
spot area), so one network serves all scales (:func:`~napari_stmap.core.predict_dense.predict_spots`
scales back). Augmentation: 90° turns and flips (spot coordinates turned with the image),
stain jitter in HED space, mild Gaussian blur.

Defaults (2-core CPU, random init; see :func:`resolve_config`)
----------------------------------------------------------------
- Spots ≥ 55 µm (Visium, legacy ST such as HER2ST's 100 µm spots at 200 µm pitch): model at
  **2.0 µm/px**, output stride 4 (8 µm map pixels), tiles of 256 px = 512 µm (about 4, at most
  9, HER2ST spots per tile), encoder ``resnet10t`` with a three-stage decoder (64, 32, 32
  channels) plus a 64-channel context branch (3 × 3 mean of the deepest features, 192 µm
  across, concatenated to the embedding), batches of 8 tiles, 24 epochs, peak learning rate
  2e-3, z-scored MSE, EMA of the
  weights (decay 0.98): about 15 minutes for three HER2ST sections on one free core of this
  project's 2-core CPU (2.3 s per step; three times that while other jobs share it).
  Why 2 µm/px: nuclei are still 3–5 px,
  enough to tell tumour, stroma, immune cells and fat apart (what a randomly initialised
  network can learn from ~550 spots), and a tile costs a quarter of the same area at
  1 µm/px, so the CPU budget buys four times more passes. Measured (train C3–C5, test C2,
  1 thread): 2 µm/px, 24 epochs: PCC@M 0.256 in 386 s; 1 µm/px with 512 px tiles, 8 epochs:
  0.208 in 544 s; 2 µm/px, 8 epochs: 0.208 in 122 s (all regnetx_002, lr 1e-3, no z-score,
  no EMA). With resnet10t, lr 2e-3, z-score and EMA, 12 epochs: 0.270 (evaluated with TTA;
  regnetx_002 with z-score + EMA, 24 epochs: 0.250); a wider decoder (128, 64, 64): 0.268;
  the context branch: 0.282 (128 channels 0.276, a 5 × 5 window 0.281, lr 3e-3 0.282, tiles
  of 512 px in batches of 2: 0.258). The network underfits at this budget (PCC@M 0.32 on a
  training section against 0.39 for SpotNet): the context branch hands the pointwise head a
  wide descriptor of the surrounding tissue that the decoder's last 32 channels carry poorly.
  ``benchmarks/her2st_loso.py`` holds the four-fold figures. With a GPU and a pretrained
  encoder use ``--mpp 1.0`` or 0.5.
- Visium HD bins: 0.5 µm/px, stride 4 (2 µm map pixels), tiles of 256 px, same encoder.
- SpotNet: the same encoder and µm/px, crops of max(112 µm, 1.5 × the largest spot)
  (150 µm for HER2ST), batches of 32 crops; same loss, learning rate and weight averaging
  (fold C2: 0.276 with TTA, 0.268 without; with regnetx_002: 0.252).

On a GPU use larger settings, e.g. ``--encoder resnet50 --mpp 1.0 --tile-px 512
--batch-size 16 --epochs 30``, or a pathology foundation model (UNI: ``--encoder
vit_large_patch16_224 --encoder-weights uni.safetensors``, with ``--mpp 0.5``); ViT encoders
attend over the whole tile, so their tiled maps are only approximately seamless.

CPU threads default to the cores other jobs leave free (:func:`available_threads`): torch's
OpenMP threads spin at barriers, and one thread too many on a shared CPU makes every step
several times slower.

Resuming
--------
After every epoch the full state (model weights + AdamW state as safetensors, epoch, history,
best metric and configuration as JSON; never pickle) is written next to the model file
(``MODEL.state.safetensors`` / ``MODEL.state.json``). Randomness is re-seeded from
``(seed, epoch)`` at the start of every epoch, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .aggregate import aggregate_torch, batch_weights
from .errors import StmapInputError
from .evaluate import evaluate_measured
from .geometry import MapGrid, disks, squares, turn_image, turn_points, weight_matrix
from .io.slide import open_slide, read_at_mpp
from .io.spots import available_bin_sizes
from .measured import Measured, Units, depth_factors, load_measured, scale_key, spot_density

__all__ = [
    "CPU_ENCODER",
    "ScaleTable",
    "TrainConfig",
    "TrainResult",
    "TrainSlide",
    "augment_tile",
    "available_threads",
    "build_model",
    "check_device",
    "expression_loss",
    "hed_jitter",
    "load_state",
    "load_training_data",
    "make_spot_batch",
    "make_tile_batch",
    "plan_epoch",
    "prior_density",
    "read_gene_spec",
    "read_state_info",
    "reference_area",
    "resolve_config",
    "save_state",
    "select_genes",
    "state_paths",
    "target_stats",
    "train_model",
]

logger = logging.getLogger(__name__)

#: Encoder of the CPU defaults: ResNet-10-T (4.9 M parameters, no global operations).
CPU_ENCODER = "resnet10t"
_LARGE_SPOT_UM = 55.0
#: Default batch sizes: tiles per step of dense models, crops per step of spot models.
DENSE_BATCH, SPOT_BATCH = 8, 32


# --------------------------------------------------------------------------- configuration
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
        Visium HD training scales, µm (default 2, 8, 16 where present).
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
        Loss weights (see the module notes).
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
        std per gene, :func:`target_stats`) instead of on the normalised expression itself,
        so every gene weighs the same in it.
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
    """Fill the data-dependent defaults (see the module notes) and check the values.

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


# ------------------------------------------------------------------------------------ data
@dataclass
class ScaleTable:
    """Measured units of one scale of one slide, in **model px** of that slide.

    Attributes
    ----------
    bin_um : float
        Size of the units (µm).
    centers : numpy.ndarray
        (n, 2) model px (y, x).
    size : float
        Disk diameter or square side, model px.
    footprint : str
        ``"disk"`` or ``"square"``.
    counts : scipy.sparse.csr_matrix
        (n, G) float32 depth-scaled counts of the selected genes.
    total : numpy.ndarray
        (n,) float32 depth-scaled total counts (all genes).
    area_um2 : numpy.ndarray
        (n,) area of each unit, µm².
    pitch_um : float
        Centre-to-centre spacing of the units (µm), used to size an epoch.
    """

    bin_um: float
    centers: np.ndarray
    size: float
    footprint: str
    counts: sp.csr_matrix
    total: np.ndarray
    area_um2: np.ndarray
    pitch_um: float
    _tree: Any = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return int(self.counts.shape[0])

    def targets(self, idx: np.ndarray) -> np.ndarray:
        """(k, G + 1) float32: the units' counts then total."""
        dense = self.counts[idx].toarray().astype(np.float32)
        return np.concatenate([dense, self.total[idx, None]], axis=1)

    def inside(self, origin: np.ndarray, size: int) -> np.ndarray:
        """Indices of units whose footprint lies fully inside ``[origin, origin + size)²``."""
        from scipy.spatial import cKDTree

        if self._tree is None:
            self._tree = cKDTree(self.centers)
        centre = np.asarray(origin, dtype=float) + size / 2
        reach = (size - self.size) / 2
        if reach < 0 or self.n == 0:
            return np.zeros(0, dtype=np.int64)
        idx = np.asarray(
            self._tree.query_ball_point(centre, reach + 1e-6, p=np.inf), dtype=np.int64
        )
        c, h = self.centers[idx], self.size / 2
        ok = np.all((c - h >= origin - 1e-9) & (c + h <= origin + size + 1e-9), axis=1)
        return np.sort(idx[ok])


@dataclass
class TrainSlide:
    """One training section: slide, scale tables (model px) and an optional pixel cache."""

    slide: Any
    slide_path: Path
    spots_path: Path
    mpp: float
    tables: dict[str, ScaleTable]
    factor: float
    density: float
    cache: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def anchor(self) -> ScaleTable:
        """The coarsest table (tiles are placed around its units)."""
        return max(self.tables.values(), key=lambda t: t.bin_um)

    def table(self, bin_um: float) -> ScaleTable:
        """The table of ``bin_um`` if present, else the anchor (non-HD slides have one)."""
        return self.tables.get(scale_key(bin_um), self.anchor)

    def read(self, origin: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 at model µm/px; from the cache when it covers the region."""
        oy, ox = (int(v) for v in origin)
        h, w = shape
        if self.cache is not None:
            (cy, cx), img = self.cache
            y, x = oy - int(cy), ox - int(cx)
            if y >= 0 and x >= 0 and y + h <= img.shape[0] and x + w <= img.shape[1]:
                return img[y : y + h, x : x + w].copy()
        return read_at_mpp(self.slide, (oy, ox), (h, w), self.mpp)

    def build_cache(self, margin: int, limit_mb: float) -> None:
        """Read the region around all units once, if it fits in ``limit_mb`` MiB."""
        lo = np.min([t.centers.min(axis=0) - t.size for t in self.tables.values()], axis=0)
        hi = np.max([t.centers.max(axis=0) + t.size for t in self.tables.values()], axis=0)
        origin = np.floor(lo - margin).astype(np.int64)
        shape = tuple(int(v) for v in np.ceil(hi + margin).astype(np.int64) - origin)
        if shape[0] * shape[1] * 3 / 2**20 > limit_mb:
            logger.info(
                "%s: %s px at model µm/px is too large to cache; reading on demand",
                self.slide_path,
                shape,
            )
            return
        self.cache = (origin, read_at_mpp(self.slide, tuple(origin), shape, self.mpp))


def read_gene_spec(spec: str | Sequence[str]) -> tuple[int | None, list[str] | None]:
    """Parse ``--genes``: ``"top:K"`` -> (K, None); a file path -> (None, genes); a list -> (None, list)."""
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


def select_genes(
    measured: Sequence[Measured], coarse: Sequence[Units], spec: str | Sequence[str]
) -> list[str]:
    """Genes to train on (see the module notes).

    Parameters
    ----------
    measured : sequence of Measured
        Training sections (all genes).
    coarse : sequence of Units
        Their coarsest training units (the statistics of ``top:K`` use them).
    spec : str or sequence of str
        ``"top:K"``, a file path, or an explicit list.
    """
    k, listed = read_gene_spec(spec)
    common = set(measured[0].genes).intersection(*(m.genes for m in measured[1:]))
    if listed is not None:
        missing = [g for g in listed if g not in common]
        if missing:
            msg = (
                f"{len(missing)} of {len(listed)} requested genes are not measured in every "
                f"training section, e.g. {missing[:5]}; remove them from the gene file"
            )
            raise StmapInputError(msg)
        return listed
    order = [g for g in measured[0].genes if g in common]
    sums, n = np.zeros(len(order)), 0
    for m, u in zip(measured, coarse, strict=True):
        cols = np.array([m.genes.index(g) for g in order]) if order else np.zeros(0, int)
        sums += _normalised_sum(u.counts[:, cols], u.total)
        n += int(np.count_nonzero(u.total > 0))
    ranked = np.argsort(-sums / max(n, 1), kind="stable")[:k]
    return [order[i] for i in ranked]


def _normalised_sum(counts: sp.csr_matrix, total: np.ndarray) -> np.ndarray:
    """Column sums of log1p(1e4 · counts / total) over spots with total > 0."""
    good = np.flatnonzero(total > 0)
    x = sp.csr_matrix(counts[good], dtype=np.float64)
    x = sp.diags(1e4 / total[good]) @ x
    return np.asarray(x.log1p().sum(axis=0)).ravel()


def _slide_pairs(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Path, Path]]:
    if not pairs:
        msg = "no training data: pass --slide S --spots P (one or more pairs)"
        raise StmapInputError(msg)
    return [(Path(s), Path(p)) for s, p in pairs]


def _requested_scales(spots_path: Path, cfg: TrainConfig) -> list[float] | None:
    """Scales (µm) to train at for Visium HD data; None otherwise.

    ``cfg.bin_um``, else 16 µm (the coarsest available size without 16 µm bins): on the
    synthetic HD benchmark a map trained at 16 µm only beat 8 + 16 and 2 + 8 + 16 µm at every
    scale, 2 µm included (``benchmarks/synthetic_scales.py``; docs/benchmarks.md).
    """
    available = available_bin_sizes(spots_path)
    if not available:
        if cfg.bin_um:
            logger.info(
                "%s: not Visium HD bins; --bin-um ignored, spots used as they are", spots_path
            )
        return None
    wanted = cfg.bin_um or ((16.0,) if 16.0 in available else (max(available),))
    return [float(b) for b in wanted]


def load_training_data(
    pairs: Sequence[tuple[Any, Any]],
    cfg: TrainConfig,
    *,
    genes: Sequence[str] | None = None,
    depth: dict[str, Any] | None = None,
) -> tuple[list[TrainSlide], list[str], dict[str, Any], TrainConfig]:
    """Read training sections, select genes, normalise depth, build the scale tables.

    Parameters
    ----------
    pairs : sequence of (slide, spots)
        Slide files and their measured spots (paired in order).
    cfg : TrainConfig
        Run configuration (``None`` fields are resolved here).
    genes, depth : optional
        Reuse a gene list and depth reference (resuming).

    Returns
    -------
    slides, genes, depth, cfg
        ``depth = {"reference_counts_per_um2": r, "factors": [...], "densities": [...]}``.
    """
    paths = _slide_pairs(pairs)
    slides = [open_slide(s) for s, _ in paths]
    wanted = [_requested_scales(p, cfg) for _, p in paths]
    measured = [
        load_measured(p, scales_um=w, slide=sl)
        for (_, p), w, sl in zip(paths, wanted, slides, strict=True)
    ]
    scales = [w or [m.base_um] for w, m in zip(wanted, measured, strict=True)]
    coarse = [m.units(max(sc)) for m, sc in zip(measured, scales, strict=True)]
    cfg = resolve_config(cfg, max(max(sc) for sc in scales), any(m.binned for m in measured))
    genes = list(genes) if genes is not None else select_genes(measured, coarse, cfg.genes)
    dens = [spot_density(u) for u in coarse]
    if depth is None:
        ref, factors = depth_factors(dens)
        depth = {"reference_counts_per_um2": ref, "factors": factors, "densities": dens}
    out = []
    for k, (m, sl) in enumerate(zip(measured, slides, strict=True)):
        m = m.restrict(genes)
        tables = {
            scale_key(b): _table(m.units(b), sl, cfg.mpp, depth["factors"][k]) for b in scales[k]
        }
        ts = TrainSlide(sl, paths[k][0], paths[k][1], cfg.mpp, tables, depth["factors"][k], dens[k])
        ts.build_cache(max(cfg.tile_px, _crop_px(cfg)), cfg.cache_mb)
        out.append(ts)
        logger.info("%s: %s", paths[k][1], {key: t.n for key, t in tables.items()})
    return out, genes, depth, cfg


def _crop_px(cfg: TrainConfig) -> int:
    return round(float(cfg.crop_um or 0.0) / float(cfg.mpp or 1.0))


def _table(u: Units, slide: Any, mpp: float, factor: float) -> ScaleTable:
    """Units -> model-px table with depth-scaled counts; units without transcripts dropped."""
    f = mpp / slide.mpp
    keep = np.flatnonzero(u.total > 0)
    counts = sp.csr_matrix(u.counts[keep], dtype=np.float32) * np.float32(factor)
    pitch = u.bin_um if u.footprint == "square" else max(u.bin_um, 2 * u.bin_um)
    return ScaleTable(
        u.bin_um,
        u.centers_yx[keep] / f,
        u.size_px / f,
        u.footprint,
        sp.csr_matrix(counts),
        (u.total[keep] * factor).astype(np.float32),
        u.area_um2[keep],
        float(pitch),
    )


# ---------------------------------------------------------------------------- augmentation
def hed_jitter(
    image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.01
) -> np.ndarray:
    """Stain jitter: scale and shift each of the H, E, D optical densities (Tellez et al.)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-bias, bias, 3)
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def augment_tile(
    image: np.ndarray, centers: np.ndarray, rng: np.random.Generator, *, colour: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random 90° turn + flip (points follow), HED stain jitter and, 1 time in 4, a mild blur.

    Parameters
    ----------
    image : numpy.ndarray
        (T, T, 3) uint8 tile.
    centers : numpy.ndarray
        (n, 2) tile px (y, x) of the spot centres.
    rng : numpy.random.Generator
        Randomness.
    colour : bool
        Apply stain jitter and blur (geometry is always augmented).
    """
    from scipy.ndimage import gaussian_filter

    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    image, centers = turn_image(image, k, flip), turn_points(centers, image.shape[0], k, flip)
    if colour:
        image = hed_jitter(image, rng)
        if rng.random() < 0.25:
            s = float(rng.uniform(0.3, 1.0))
            image = gaussian_filter(image, sigma=(s, s, 0), mode="reflect")
    return image, centers


# --------------------------------------------------------------------------------- batches
def plan_epoch(
    slides: Sequence[TrainSlide],
    cfg: TrainConfig,
    rng: np.random.Generator,
    *,
    dense: bool,
    group_bins: int | None = None,
) -> list[list[tuple[int, int]]]:
    """Batches of (slide index, anchor unit index) for one epoch.

    Dense models: per slide ``ceil(n · pitch² / (tile − spot)²)`` tiles, i.e. about enough to
    cover its spots once. Spot models: every anchor unit once. Bin models (MagNet, with
    ``group_bins``): ``ceil(n / group_bins)`` anchors, each the centre of a group of
    ``group_bins`` neighbouring bins (:mod:`.train_magnet`). Shuffled, cut into batches,
    truncated to ``cfg.max_batches_per_epoch``.
    """
    items = []
    for s, ts in enumerate(slides):
        a = ts.anchor
        n = a.n
        if dense:
            usable = max(cfg.tile_px - a.size, 1.0) ** 2
            n = max(1, math.ceil(a.n * (a.pitch_um / cfg.mpp) ** 2 / usable))
        elif group_bins:
            n = max(1, math.ceil(a.n / group_bins))
        idx = rng.permutation(a.n)[:n] if n <= a.n else rng.integers(0, a.n, n)
        items += [(s, int(i)) for i in idx]
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    return batches[: cfg.max_batches_per_epoch] if cfg.max_batches_per_epoch else batches


def _tile_origin(table: ScaleTable, i: int, tile: int, rng: np.random.Generator) -> np.ndarray:
    """Random tile origin (model px) such that unit ``i`` lies fully inside the tile."""
    half = table.size / 2
    offset = rng.uniform(half, max(tile - half - 1.0, half), 2)  # floor() below adds < 1 px
    return np.floor(table.centers[i] - offset).astype(np.int64)


def make_tile_batch(
    slides: Sequence[TrainSlide],
    batch: Sequence[tuple[int, int]],
    bin_um: float,
    cfg: TrainConfig,
    stride: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, Any, np.ndarray]:
    """Tiles, their per-tile spot weights and the spots' targets for a dense model.

    Returns
    -------
    images : numpy.ndarray
        (B, T, T, 3) uint8.
    weights : BatchWeights
        Block-diagonal (N, B·(T/s)²) footprint weights on each tile's output grid.
    targets : numpy.ndarray
        (N, G + 1) float32 depth-scaled counts then total, in the rows' order.
    """
    t = int(cfg.tile_px)
    grid = MapGrid((0.0, 0.0), float(stride), (t // stride, t // stride))
    images, mats, targets = [], [], []
    for s, i in batch:
        ts = slides[s]
        origin = _tile_origin(ts.anchor, i, t, rng)
        table = ts.table(bin_um)
        idx = table.inside(origin, t)
        if len(idx) > cfg.max_spots_per_tile:
            idx = np.sort(rng.choice(idx, cfg.max_spots_per_tile, replace=False))
        image, centers = ts.read(origin, (t, t)), table.centers[idx] - origin
        if cfg.augment:
            image, centers = augment_tile(image, centers, rng)
        build = disks if table.footprint == "disk" else squares
        mats.append(
            weight_matrix(build(centers, table.size), grid)
            if len(idx)
            else sp.csr_matrix((0, t * t // stride**2))
        )
        images.append(image)
        targets.append(table.targets(idx))
    return np.stack(images), batch_weights(mats, grid.shape_hw), np.concatenate(targets)


def make_spot_batch(
    slides: Sequence[TrainSlide],
    batch: Sequence[tuple[int, int]],
    bin_um: float,
    cfg: TrainConfig,
    crop_px: int,
    ref_area_um2: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops centred on spots and their area-normalised targets for a spot model.

    Returns (B, crop, crop, 3) uint8 crops and (B, G + 1) float32 targets: the spot's counts
    × ``ref_area_um2`` / its area.
    """
    images, targets = [], []
    for s, i in batch:
        ts = slides[s]
        table = ts.table(bin_um)
        j = i if table is ts.anchor else int(rng.integers(table.n))
        origin = np.floor(table.centers[j] - crop_px / 2 + 0.5).astype(np.int64)
        image = ts.read(origin, (crop_px, crop_px))
        if cfg.augment:
            image, _ = augment_tile(image, np.zeros((0, 2)), rng)
        images.append(image)
        targets.append(
            table.targets(np.array([j]))[0] * np.float32(ref_area_um2 / table.area_um2[j])
        )
    return np.stack(images), np.stack(targets)


# -------------------------------------------------------------------------------------- loss
def expression_loss(
    pred: Any,
    meas: Any,
    *,
    mse_weight: float = 1.0,
    pcc_weight: float = 0.5,
    total_weight: float = 0.1,
    gene_std: Any = None,
    eps: float = 1e-6,
) -> tuple[Any, dict[str, float]]:
    """Loss on normalised spot sums (see the module notes).

    Parameters
    ----------
    pred, meas : torch.Tensor
        (N, G + 1) predicted and measured counts per spot, total last. Measured totals must
        be > 0.
    gene_std : torch.Tensor, optional
        (G,) per-gene std of the normalised training expression: the MSE term is then taken
        on z-scores, ``mean(((norm_pred − μ) / σ − (norm_meas − μ) / σ)²)`` (μ cancels).

    Returns
    -------
    loss, parts
        Scalar tensor and the float values of its ``mse``, ``pcc`` (mean r) and ``total`` terms.
    """
    import torch

    pg, pt = pred[:, :-1], pred[:, -1:]
    mg, mt = meas[:, :-1], meas[:, -1:]
    pn = torch.log1p(1e4 * pg / (pt + eps))
    mn = torch.log1p(1e4 * mg / mt.clamp_min(eps))
    diff = pn - mn if gene_std is None else (pn - mn) / gene_std
    mse = torch.mean(diff**2)
    r = _pearson_columns(pn, mn, eps)
    tot = torch.mean((torch.log1p(pt) - torch.log1p(mt)) ** 2)
    loss = mse_weight * mse + pcc_weight * (1 - r) + total_weight * tot
    return loss, {
        "mse": float(mse.detach()),
        "pcc": float(r.detach()),
        "total": float(tot.detach()),
    }


def target_stats(
    slides: Sequence[TrainSlide], floor: float = 0.05, bin_um: float | None = None
) -> dict[str, list[float]]:
    """Per-gene mean and std of ``log1p(1e4 · gene / total)`` over the units of one scale.

    ``bin_um``: the scale (µm); default the anchor (coarsest) units of each slide. The std is
    floored at ``floor`` (nearly constant genes would otherwise dominate a z-scored loss).
    Returns ``{"mean": [G], "std": [G]}`` (JSON-safe, for the metadata).
    """
    # sparse sums (log1p(0) = 0): memory grows with the non-zeros, not units × genes, which
    # matters for millions of 2 µm bins
    n, s1, s2 = 0, 0.0, 0.0
    for ts in slides:
        a = ts.anchor if bin_um is None else ts.table(bin_um)
        x = sp.csr_matrix(
            sp.diags(1e4 / np.maximum(a.total, 1e-12).astype(np.float64)) @ a.counts,
            dtype=np.float64,
        )
        x.data = np.log1p(x.data)
        n += x.shape[0]
        s1 = s1 + np.asarray(x.sum(axis=0)).ravel()
        s2 = s2 + np.asarray(x.multiply(x).sum(axis=0)).ravel()
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
    return {"mean": mean.tolist(), "std": np.maximum(std, floor).tolist()}


def _pearson_columns(p: Any, t: Any, eps: float) -> Any:
    """Mean over columns of Pearson r across rows; columns constant in ``t`` are left out."""
    import torch

    if p.shape[0] < 2:
        return p.new_zeros(())
    dp, dt = p - p.mean(dim=0), t - t.mean(dim=0)
    vt = (dt * dt).sum(dim=0)
    ok = vt > 1e-12
    if not bool(ok.any()):
        return p.new_zeros(())
    r = (dp * dt).sum(dim=0) / torch.sqrt((dp * dp).sum(dim=0) * vt + eps)
    return r[ok].mean()


# ------------------------------------------------------------------------------------ model
def _model_kwargs(cfg: TrainConfig, prior: np.ndarray, ref_area_um2: float) -> dict[str, Any]:
    """create_model keyword arguments for the run (CPU-sized defaults with the CPU encoder).

    ``prior`` is the mean depth-scaled counts per µm² of each output channel: PixNet's head
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
    elif cfg.arch.startswith("magnet"):  # views and head prior: core/train_magnet.py
        from napari_stmap.core.train_magnet import magnet_kwargs

        kw.update(magnet_kwargs(cfg, prior, ref_area_um2))
    return {**kw, **cfg.model_config}


def prior_density(slides: Sequence[TrainSlide]) -> np.ndarray:
    """Mean depth-scaled counts per µm² of every channel over the anchor units, (G + 1,)."""
    n_genes = slides[0].anchor.counts.shape[1]
    num, den = np.zeros(n_genes + 1), 0.0
    for ts in slides:
        a = ts.anchor
        num[:-1] += np.asarray(a.counts.sum(axis=0), dtype=np.float64).ravel()
        num[-1] += float(a.total.sum())
        den += float(a.area_um2.sum())
    return np.maximum(num / max(den, 1e-12), 1e-9)


def reference_area(slides: Sequence[TrainSlide]) -> float:
    """Spot area (µm²) a spot model is trained to predict: the median anchor-unit area."""
    return float(np.median(np.concatenate([ts.anchor.area_um2 for ts in slides])))


def build_model(cfg: TrainConfig, genes: Sequence[str], slides: Sequence[TrainSlide]) -> Any:
    """A fresh model for the run (seeded), its head biased to the mean expression."""
    import torch

    from napari_stmap.core.model import create_model

    torch.manual_seed(cfg.seed)
    kw = _model_kwargs(cfg, prior_density(slides), reference_area(slides))
    model = create_model(cfg.arch, genes=list(genes), **kw)
    if model.input_kind not in ("dense", "spot", "bins"):
        msg = f"architecture {cfg.arch!r} has input_kind {model.input_kind!r}; training supports 'dense', 'spot' and 'bins'"
        raise StmapInputError(msg)
    return model.to(cfg.device).to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ state files
def state_paths(out: str | Path) -> tuple[Path, Path]:
    """``(MODEL.state.safetensors, MODEL.state.json)`` next to the model file ``out``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(stem + ".state.safetensors"), out.with_name(stem + ".state.json")


def save_state(
    out: str | Path,
    model: Any,
    optimizer: Any,
    info: dict[str, Any],
    *,
    ema: dict[str, Any] | None = None,
) -> None:
    """Write model + optimizer (+ averaged weights) tensors (safetensors) and ``info`` (JSON); atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema or {}).items()})
    opt = optimizer.state_dict()
    scalars = {}
    for pid, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    info = {**info, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    st_path, js_path = state_paths(out)
    save_file(tensors, str(st_path) + ".tmp")
    js_path.with_suffix(".json.tmp").write_text(json.dumps(info, indent=1))
    os.replace(str(st_path) + ".tmp", st_path)
    os.replace(js_path.with_suffix(".json.tmp"), js_path)


def read_state_info(out: str | Path) -> dict[str, Any]:
    """The JSON part of a saved training state (raises when there is none)."""
    st_path, js_path = state_paths(out)
    if not (st_path.is_file() and js_path.is_file()):
        msg = f"nothing to resume: {js_path.name} / {st_path.name} not found next to {out}; run without --resume"
        raise StmapInputError(msg)
    try:
        return json.loads(js_path.read_text())
    except json.JSONDecodeError as exc:
        msg = f"{js_path}: corrupt training state ({exc.msg}); run without --resume"
        raise StmapInputError(msg) from exc


def load_state(out: str | Path, model: Any, optimizer: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Load model and optimizer tensors saved by :func:`save_state` (never unpickles).

    Returns the averaged weights saved with them (``{}`` when there were none).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(state_paths(out)[0]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in info["optimizer"]["scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g
        for g in info["optimizer"]["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}


# ------------------------------------------------------------------------------------ loop
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


def _check_arch(arch: str) -> None:
    from napari_stmap.core.model import list_models

    if arch not in list_models():
        msg = f"unknown model architecture {arch!r}; valid names: {', '.join(list_models())}"
        raise StmapInputError(msg)


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5 % of ``cfg.lr``; a function of the step only."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cos = 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return cfg.lr * warm * (0.05 + 0.95 * cos)


def _ema_init(model: Any) -> dict[str, Any]:
    """A copy of the model's state (parameters and buffers) to average into."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ema_update(ema: dict[str, Any], model: Any, decay: float, n: int) -> int:
    """``ema ← d · ema + (1 − d) · current``, ``d = min(decay, (1 + n) / (10 + n))``.

    Floating-point entries are averaged; integer buffers (batch-norm counters) are copied.
    Returns ``n + 1``.
    """
    import torch

    d = min(float(decay), (1.0 + n) / (10.0 + n))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                ema[k].copy_(v)
    return n + 1


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
        self.scale_std = (
            {  # per-scale σ of the z-scored MSE (see the module notes)
                b: torch.tensor(
                    target_stats(self.slides, bin_um=b)["std"],
                    dtype=torch.float32,
                    device=self.cfg.device,
                )
                for b in self.scales
            }
            if self.cfg.zscore
            else {}
        )
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

    @staticmethod
    def _resumed_config(saved: dict, cfg: TrainConfig, pairs) -> TrainConfig:
        data = [[str(Path(s)), str(Path(p))] for s, p in _slide_pairs(pairs)]
        if [d[:2] for d in saved["pairs"]] != data:
            msg = f"the saved state was trained on {saved['pairs']}; resume with the same --slide/--spots pairs"
            raise StmapInputError(msg)
        old = TrainConfig.from_json(saved["config"])
        return replace(old, epochs=cfg.epochs, device=cfg.device, num_threads=cfg.num_threads)

    def _model(self, saved: dict | None) -> Any:
        import torch

        if saved is None:
            return build_model(self.cfg, self.genes, self.slides)
        from napari_stmap.core.model import create_model

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
        elif self.group_bins:  # MagNet: core/train_magnet.py
            from napari_stmap.core.train_magnet import magnet_forward

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
        from napari_stmap.core.model import save_model

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
    _check_arch(cfg.arch)
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
