"""Training data: measured units in model px, genes, sequencing depth and target statistics.

:func:`load_training_data` reads each section once (slide at the model's µm/px, measured units
at the training scales, depth-scaled counts of the selected genes) into :class:`TrainSlide` /
:class:`ScaleTable`; :func:`target_stats`, :func:`prior_density` and :func:`reference_area`
summarise them for the loss and the model's initial head. Positions are model px, (y, x).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from ..errors import StmapInputError
from ..io.slide import open_slide, read_at_mpp
from ..io.spots import available_bin_sizes
from ..measured import Measured, Units, depth_factors, load_measured, scale_key, spot_density
from .config import TrainConfig, read_gene_spec, resolve_config

__all__ = [
    "ScaleTable",
    "TrainSlide",
    "load_training_data",
    "prior_density",
    "reference_area",
    "select_genes",
    "slide_pairs",
    "target_stats",
]

logger = logging.getLogger(__name__)


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


def select_genes(
    measured: Sequence[Measured], coarse: Sequence[Units], spec: str | Sequence[str]
) -> list[str]:
    """Genes to train on.

    ``top:K``: the K genes with the highest mean normalised expression
    ``log1p(1e4 · gene / total)`` over the training units of the coarsest scale, among the
    genes measured in every training section. A file or a list: those genes, which must be
    measured in every section.

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


def slide_pairs(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Path, Path]]:
    """``(slide path, spots path)`` pairs as Paths; refuses an empty sequence."""
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

    - Every slide is read at the model's µm/px from the nearest finer pyramid level
      (:func:`~napari_stmap.core.io.slide.read_at_mpp`); the region around its units is
      cached in memory when it is smaller than ``cfg.cache_mb``, else tiles are read on demand.
    - **Depth**: each slide's counts (genes and total) are multiplied by ``reference / d_k``,
      where ``d_k`` is the slide's median total counts per µm² of (in-tissue) unit area and
      ``reference`` the mean of the training slides' ``d_k``
      (:func:`~napari_stmap.core.measured.depth_factors`); both go into the model metadata.
      For Visium HD the statistic uses the coarsest training scale.
    - **Genes**: :func:`select_genes`.
    - **Scales**: Visium HD bins are read at the finest size needed and summed (full blocks
      of array indices) into each requested size of ``cfg.bin_um`` (default 16 µm only, see
      :func:`_requested_scales`); every batch uses one scale drawn at random. Visium and
      legacy ST spots are used as they are.

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
    paths = slide_pairs(pairs)
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
    out = [
        _train_slide(m.restrict(genes), sl, paths[k], scales[k], cfg, depth["factors"][k], dens[k])
        for k, (m, sl) in enumerate(zip(measured, slides, strict=True))
    ]
    return out, genes, depth, cfg


def _train_slide(
    m: Measured,
    slide: Any,
    paths: tuple[Path, Path],
    scales: Sequence[float],
    cfg: TrainConfig,
    factor: float,
    density: float,
) -> TrainSlide:
    """One section's tables (one per scale, µm) at the model's µm/px, with its pixel cache."""
    tables = {scale_key(b): _table(m.units(b), slide, cfg.mpp, factor) for b in scales}
    ts = TrainSlide(slide, paths[0], paths[1], cfg.mpp, tables, factor, density)
    ts.build_cache(max(cfg.tile_px, _crop_px(cfg)), cfg.cache_mb)
    logger.info("%s: %s", paths[1], {key: t.n for key, t in tables.items()})
    return ts


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
