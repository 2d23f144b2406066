"""Training batches: which tiles or crops an epoch visits, and their images and targets.

Dense models (PixNet) see square tiles of ``tile_px`` model px placed around a randomly chosen
unit with a random offset; every unit of the step's scale whose footprint lies fully inside
the tile enters the loss (at most ``max_spots_per_tile``). Spot models (SpotNet) see one crop
of ``model.crop_px`` around each unit, with the unit's counts × (reference area / unit area)
as target, so one network serves all scales. MagNet's groups of bins: :mod:`.magnet`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..aggregate import batch_weights
from ..geometry import MapGrid, disks, squares, weight_matrix
from .augment import augment_tile
from .config import TrainConfig
from .data import ScaleTable, TrainSlide

__all__ = ["make_spot_batch", "make_tile_batch", "plan_epoch"]


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
    ``group_bins`` neighbouring bins (:mod:`.magnet`). Shuffled, cut into batches,
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
