"""MagNet training (``input_kind = "bins"``): groups of neighbouring bins, their views, the loss.

:mod:`.loop` calls :func:`magnet_kwargs` to build the model and :func:`magnet_forward` for a
step; a step sees ``cfg.batch_size`` groups of bins (:func:`make_group_batch`) built exactly
as :func:`~napari_stmap.core.predict.bins.predict_bins` builds them at inference. This module
needs only :mod:`.augment` and :mod:`.loss`, never the loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from ..geometry import turn_image, turn_points
from ..io.slide import read_at_mpp
from .augment import hed_jitter
from .loss import expression_loss

__all__ = ["GroupData", "magnet_forward", "magnet_kwargs", "make_group_batch"]

#: Units with ``sqrt(area)`` at least this (µm) get the large-spot views.
_LARGE_UNIT_UM = 40.0


def magnet_kwargs(cfg: Any, prior: np.ndarray, ref_area_um2: float) -> dict[str, Any]:
    """``create_model`` keyword arguments of a MagNet run: head prior and views.

    CPU defaults (``stmap train --arch magnet`` without ``--encoder``): encoder
    :data:`~napari_stmap.core.training.config.CPU_ENCODER` (``resnet10t``) for the bin view and
    a separate one for the context levels; views of 56 / 112 / 256 µm (the paper's fields of
    view) for Visium HD bins and of 112 / 224 / 512 µm for units with √area ≥ 40 µm, i.e.
    spots of ≥ 55 µm (HER2ST's 100 µm spots would not fit a 56 µm bin view); the bin view at
    the model's µm/px (0.5 for HD: 112 px; 2.0 for large spots: 56 px), context views at 64 px.

    Parameters
    ----------
    cfg : TrainConfig
        The resolved run configuration (``arch``: presets such as ``magnet_tiny`` keep their
        own views).
    prior : numpy.ndarray
        (G + 1,) mean depth-scaled counts per µm² of every channel.
    ref_area_um2 : float
        Reference bin area, µm²: the head starts at ``prior × ref_area_um2``.
    """
    kw: dict[str, Any] = {"init_counts_per_bin": (prior * ref_area_um2).tolist()}
    if cfg.arch == "magnet":  # presets (magnet_tiny) keep their own views
        large = math.sqrt(ref_area_um2) >= _LARGE_UNIT_UM
        kw["views_um"] = [112.0, 224.0, 512.0] if large else [56.0, 112.0, 256.0]
    return kw


@dataclass
class GroupData:
    """Per-run helpers: kNN trees of the scale tables and caches of the context levels."""

    trees: dict[tuple[int, str], Any] = field(default_factory=dict)
    caches: dict[tuple[int, int], Any] = field(default_factory=dict)

    def group(self, s: int, table: Any, centre: np.ndarray, n: int) -> np.ndarray:
        """Indices of the ``n`` units of ``table`` nearest ``centre`` (nearest first)."""
        key = (s, f"{table.bin_um:g}")
        if key not in self.trees:
            self.trees[key] = cKDTree(table.centers)
        n = min(int(n), table.n)
        _, idx = self.trees[key].query(centre, k=n)
        return np.atleast_1d(np.asarray(idx, dtype=np.int64))

    def read(self, ts: Any, s: int, level: int, mpp: float, origin, side: int, reach: float):
        """(side, side, 3) uint8 at ``mpp`` from the level's cache (read once) or the slide."""
        key = (s, level)
        if key not in self.caches:
            self.caches[key] = _level_cache(ts, mpp, reach)
        cache = self.caches[key]
        oy, ox = (int(v) for v in origin)
        if cache is not None:
            (cy, cx), img = cache
            y, x = oy - cy, ox - cx
            if y >= 0 and x >= 0 and y + side <= img.shape[0] and x + side <= img.shape[1]:
                return img[y : y + side, x : x + side].copy()
        return np.array(read_at_mpp(ts.slide, (oy, ox), (side, side), mpp))


def _level_cache(ts: Any, mpp: float, reach: float, limit_mb: float = 256.0):
    """The region around all units of a slide at ``mpp``, if it is small enough."""
    scale = ts.mpp / mpp
    lo = np.min([t.centers.min(axis=0) for t in ts.tables.values()], axis=0) * scale - reach
    hi = np.max([t.centers.max(axis=0) for t in ts.tables.values()], axis=0) * scale + reach
    origin = np.floor(lo).astype(np.int64)
    shape = tuple(int(v) for v in np.ceil(hi).astype(np.int64) - origin)
    if shape[0] * shape[1] * 3 / 2**20 > limit_mb:
        return None
    return (int(origin[0]), int(origin[1])), read_at_mpp(ts.slide, tuple(origin), shape, mpp)


def make_group_batch(
    slides: Sequence[Any],
    batch: Sequence[tuple[int, int]],
    bin_um: float,
    cfg: Any,
    model: Any,
    ref_area_um2: float,
    rng: np.random.Generator,
    data: GroupData,
) -> tuple[Any, np.ndarray]:
    """Groups of neighbouring bins with their views, tiles and graph, and their targets.

    Each group is an anchor bin (drawn by :func:`~napari_stmap.core.training.batches.plan_epoch`,
    ``ceil(n / group_bins)`` anchors per slide and epoch, so an epoch sees about every bin
    once) and its ``group_bins − 1`` nearest bins of the step's scale; the kNN graph is built
    inside the group, so every bin has its true neighbours except at the group's rim. Per bin:
    the bin view (``model.view_px`` px at the model's µm/px, from the slide cache), and per
    context level one tile shared by the group
    (:func:`~napari_stmap.core.model.magnet.tile_box`: all views + ``context_margin``, aligned
    to the encoder stride). Targets are the bins' counts × reference area / bin area (as for
    SpotNet). Augmentation turns and flips the whole group (views, tiles and positions alike)
    and applies one stain jitter to all its images.

    Parameters
    ----------
    slides : sequence of TrainSlide
        Training sections (tables in model px).
    batch : sequence of (slide index, anchor unit index)
        One group per item, around the anchor unit's centre.
    bin_um : float
        Scale of the step (HD bins; other data use their spots).
    cfg : TrainConfig
        ``augment`` is used.
    model : MagNet
        Gives views, levels, k and ``group_bins``.
    ref_area_um2 : float
        Reference bin area: targets are counts × ref / area.
    rng : numpy.random.Generator
        Randomness (augmentation).
    data : GroupData
        Trees and caches of the run.

    Returns
    -------
    batch : BinBatch
        On the model's device; views and tiles float in [0, 1].
    targets : numpy.ndarray
        (N, G + 1) float32.
    """
    import torch

    from napari_stmap.core.model.magnet import BinBatch

    views, tiles, pos, groups, nbrs, targets = [], [[] for _ in model.context_mpp], [], [], [], []
    start = 0
    for g, (s, i) in enumerate(batch):
        ts = slides[s]
        table = ts.table(bin_um)
        idx = data.group(s, table, ts.anchor.centers[i], model.config["group_bins"])
        v, t, p, nb = _group_inputs(ts, s, table.centers[idx], model, cfg, rng, data)
        views.append(v)
        for level, tile in enumerate(t):
            tiles[level].append(model.preprocess(tile)[0])
        pos.append(p)
        groups.append(np.full(len(idx), g, dtype=np.int64))
        nbrs.append(np.where(nb >= 0, nb + start, -1))
        start += len(idx)
        area = np.float32(ref_area_um2) / table.area_um2[idx].astype(np.float32)
        targets.append(table.targets(idx) * area[:, None])
    out = BinBatch(
        model.preprocess(np.concatenate(views)),
        tiles,
        [
            torch.as_tensor(np.concatenate([p[lv] for p in pos]), dtype=torch.float32)
            for lv in range(len(tiles))
        ],
        torch.from_numpy(np.concatenate(groups)),
        torch.from_numpy(np.concatenate(nbrs)),
    )
    return out, np.concatenate(targets).astype(np.float32)


def _group_inputs(ts, s: int, centres: np.ndarray, model, cfg, rng, data: GroupData):
    """Views (n, p0, p0, 3), one tile per level, tile positions per level, kNN graph."""
    from napari_stmap.core.model.magnet import knn_graph, tile_box

    p0 = model.view_px
    origins = np.floor(centres - p0 / 2 + 0.5).astype(np.int64)
    views = [ts.read(o, (p0, p0)) for o in origins]
    tiles, pos = [], []
    for level, mpp in enumerate(model.context_mpp):
        p, margin = model.context_px[level], model.context_margin_px(level)
        c = centres * (ts.mpp / mpp)
        origin, side = tile_box(c, p, margin, model.context_stride)
        reach = p / 2 + margin + 2 * model.context_stride
        tiles.append(data.read(ts, s, level, mpp, origin, side, reach))
        pos.append(c - origin)
    if cfg.augment:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        views = [turn_image(v, k, flip) for v in views]
        pos = [turn_points(q, t.shape[0], k, flip) for q, t in zip(pos, tiles, strict=True)]
        tiles = [turn_image(t, k, flip) for t in tiles]
        views, tiles = _colour(views, tiles, rng)
    return np.stack(views), tiles, pos, knn_graph(centres, model.k)


def _colour(views: list, tiles: list, rng: np.random.Generator) -> tuple[list, list]:
    """One stain jitter (and, 1 time in 4, one mild blur) for every image of a group."""
    seed = int(rng.integers(2**31))
    blur = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.25 else 0.0

    def one(img: np.ndarray) -> np.ndarray:
        out = hed_jitter(img, np.random.default_rng(seed))
        return gaussian_filter(out, sigma=(blur, blur, 0), mode="reflect") if blur else out

    return [one(v) for v in views], [one(t) for t in tiles]


def magnet_forward(trainer: Any, batch, bin_um: float, rng: np.random.Generator):
    """Forward one MagNet training batch (called by ``loop._Trainer.step``).

    The loss is :func:`~napari_stmap.core.training.loss.expression_loss` of the final
    prediction plus ``consistency_weight`` × the mean over context levels of the same loss of
    that level's own prediction (MagNet's cross-level consistency: every level must explain
    the bin); ``aux`` adds the second part.

    Returns
    -------
    pred : torch.Tensor
        (N, G + 1) predicted counts.
    targets : numpy.ndarray
        (N, G + 1) float32 targets.
    aux : callable or None
        ``aux(loss, parts, meas, gene_std) -> (loss, parts)`` adding the cross-level
        consistency term (None when ``consistency_weight`` is 0).
    """
    model, cfg = trainer.model, trainer.cfg
    data = trainer.__dict__.setdefault("_magnet_data", GroupData())
    inputs, targets = make_group_batch(
        trainer.slides, batch, bin_um, cfg, model, trainer.ref_area, rng, data
    )
    pred, levels = model.forward_levels(inputs.to(cfg.device))
    weight = float(model.config.get("consistency_weight", 0.0))
    if weight <= 0 or not levels:
        return pred, targets, None

    def aux(loss, parts: dict, meas, gene_std=None):
        import torch

        kw = {"mse_weight": cfg.mse_weight, "pcc_weight": cfg.pcc_weight}
        kw["total_weight"] = cfg.total_weight
        if gene_std is not None:
            kw["gene_std"] = gene_std
        cons = torch.stack([expression_loss(p, meas, **kw)[0] for p in levels]).mean()
        return loss + weight * cons, {**parts, "consistency": float(cons.detach())}

    return pred, targets, aux
