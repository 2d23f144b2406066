"""What differs between two regions: per-gene means, log2 fold change and a rank test over units.

Two regions of one slide, A and B (or A against the rest of the tissue), are compared gene by
gene across the **units** inside each: spot-grid units of a chosen size (squares on a square
lattice, or Visium-like disks on a hexagonal one, laid out by
:func:`~napari_stmap.core.geometry.spot_grid` over the tissue) or cells read from a
``cells.h5ad`` (``stmap cells``). Unit values follow the additive rule: a unit's counts are the
sum of the prediction over its footprint (:meth:`PredictionSource.region_sums
<napari_stmap.core.predict.PredictionSource.region_sums>`), a cell's are its row of the cells
file.

Per gene (:func:`contrast_counts`):

- ``mean_a``, ``mean_b``: the mean over the region's units of the normalised expression
  ``log1p(1e4 · gene / total)`` (:func:`~napari_stmap.core.metrics.normalize_expression`:
  depth-normalised per unit **after** summing the unit, then log1p).
- ``log2fc``: ``log2((CP10k_A + 1) / (CP10k_B + 1))`` with ``CP10k`` the mean over the
  region's units of ``1e4 · gene / total`` (counts per 10,000 transcripts), i.e. a pseudocount
  of 1 CP10k (:data:`PSEUDOCOUNT_CP10K`), as Seurat's ``FindMarkers``.
- ``u``, ``z``, ``p``: Wilcoxon rank-sum (Mann–Whitney U) of the units' normalised values,
  two-sided, normal approximation with tie correction and continuity correction
  (:func:`scipy.stats.mannwhitneyu`, ``method="asymptotic"``, vectorised over genes). ``u`` is
  A's U statistic; ``z`` the signed standard score (positive: higher in A) used to rank genes
  (it stays finite where ``p`` underflows to 0).
- ``q``: Benjamini–Hochberg adjusted p-values over the genes (:func:`bh_adjust`).

**The units of one slide are not independent samples** (neighbouring units share cells,
tissue and the network's context), so p- and q-values rank genes; they do not prove a
difference between tissues. Compare regions across slides or patients for that.

Which units count (:func:`split_units`, level-0 px, axis order (y, x)):

- a grid unit belongs to a region when at least ``min_fraction`` (default 0.5, a majority) of
  its area lies inside it (holes subtracted); a unit straddling the boundary goes to the side
  holding most of it. The fraction is measured on ``8 × 8`` sample points per unit (exact for
  polygons and rectangles at those points; disks and ellipses as their 256-gon), so it is
  known to 1/64 of the unit's area;
- a grid unit is on tissue when at least half of it lies on the slide's tissue mask
  (:func:`~napari_stmap.core.tiling.tissue_mask`); units off tissue are left out, and so are
  units with no predicted transcripts (total <= 0 or NaN: no normalised value);
- a cell belongs to a region when its centroid lies inside it;
- "rest" (B omitted) = the units on tissue (every cell) not in A;
- a unit in both A and B (overlapping regions) is left out of both and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StmapInputError
from .export import _atomic, check_output
from .geometry import Footprint, Region, spot_grid
from .metrics import normalize_expression
from .tiling import TissueMask

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_UNITS",
    "PSEUDOCOUNT_CP10K",
    "REST",
    "UNIT_KINDS",
    "CellUnits",
    "ContrastResult",
    "UnitSplit",
    "bh_adjust",
    "check_cells_match",
    "contrast_cells",
    "contrast_counts",
    "contrast_grid",
    "contrast_on_slide",
    "find_region",
    "grid_units",
    "points_in_region",
    "read_cells",
    "region_fractions",
    "split_units",
    "tissue_bbox",
    "wilcoxon",
]

#: Pseudocount of the log2 fold change, in counts per 10,000 transcripts.
PSEUDOCOUNT_CP10K = 1.0
#: Fewest units a region needs for the test.
MIN_UNITS = 3
#: The name that stands for "the rest of the tissue" as region B.
REST = "rest"
#: Grid unit kinds: footprint, pitch / size, hexagonal lattice.
UNIT_KINDS: dict[str, tuple[str, float, bool]] = {
    "square": ("square", 1.0, False),  # touching squares, like Visium HD bins
    "visium": ("disk", 100.0 / 55.0, True),  # Visium: 55 µm spots, 100 µm apart, hexagonal
}
_SAMPLES = 8  # sample points per unit side for area fractions


# ================================================================================== stats
def bh_adjust(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), NaN kept as NaN.

    ``q_(i) = min_{j >= i} p_(j) · m / j`` over the ``m`` finite p-values sorted ascending,
    capped at 1 (the step-up procedure; the same numbers as
    :func:`scipy.stats.false_discovery_control` with ``method="bh"``).
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok], kind="stable")
    scaled = p[ok][order] * m / np.arange(1, m + 1)
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]
    sub = np.empty(m)
    sub[order] = np.minimum(stepped, 1.0)
    q[ok] = sub
    return q


def _tie_term(values: np.ndarray) -> np.ndarray:
    """``Σ (t³ − t)`` over the groups of tied values of each column of ``values`` (n, G)."""
    n, g = values.shape
    s = np.sort(values, axis=0)
    starts = np.ones((n, g), dtype=bool)
    starts[1:] = s[1:] != s[:-1]
    idx = np.flatnonzero(starts.T.ravel())  # column-major: group starts, column by column
    sizes = np.diff(np.append(idx, n * g)).astype(np.float64)
    return np.bincount(idx // n, weights=sizes**3 - sizes, minlength=g)


def wilcoxon(
    values_a: np.ndarray, values_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided Wilcoxon rank-sum test of each column: A's U, signed z, p.

    Parameters
    ----------
    values_a, values_b
        ``(n_a, G)`` and ``(n_b, G)`` values of the units of each region (finite).

    Returns
    -------
    u, z, p
        ``(G,)`` each: A's Mann–Whitney U, the standard score
        ``sign(U − n_a·n_b/2) · max(|U − n_a·n_b/2| − ½, 0) / σ`` (tie-corrected σ;
        positive: higher in A; NaN where every value of a gene is the same) and the two-sided
        p-value of :func:`scipy.stats.mannwhitneyu` (normal approximation with tie and
        continuity corrections, the same ``z``).
    """
    from scipy.stats import mannwhitneyu

    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    res = mannwhitneyu(a, b, axis=0, alternative="two-sided", method="asymptotic")
    u = np.asarray(res.statistic, dtype=np.float64).reshape(-1)
    p = np.asarray(res.pvalue, dtype=np.float64).reshape(-1)
    n_a, n_b = len(a), len(b)
    n = n_a + n_b
    tie = _tie_term(np.concatenate([a, b]))
    var = n_a * n_b / 12.0 * ((n + 1) - tie / (n * (n - 1)))
    d = u - n_a * n_b / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.sign(d) * np.maximum(np.abs(d) - 0.5, 0.0) / np.sqrt(var)
    z[~(var > 0)] = np.nan
    return u, z, p


# ================================================================================ results
@dataclass
class ContrastResult:
    """Per-gene comparison of region A with region B (see the module notes for each column).

    Attributes
    ----------
    genes
        The G gene names (model order).
    mean_a, mean_b, log2fc, u, z, p, q
        ``(G,)`` float64 arrays.
    n_a, n_b
        Units in A and in B.
    name_a, name_b
        Region names (``name_b`` is ``"rest"`` for the rest of the tissue).
    unit
        What the units were, in words (``"55 µm squares"``, ``"cells"``).
    notes
        Counts of the units left out (``off_tissue``, ``no_value``, ``shared``), provenance.
    """

    genes: list[str]
    mean_a: np.ndarray
    mean_b: np.ndarray
    log2fc: np.ndarray
    u: np.ndarray
    z: np.ndarray
    p: np.ndarray
    q: np.ndarray
    n_a: int
    n_b: int
    name_a: str = "A"
    name_b: str = "B"
    unit: str = "units"
    notes: dict[str, Any] = field(default_factory=dict)

    COLUMNS = ("gene", "mean_a", "mean_b", "log2fc", "u", "z", "p", "q", "n_a", "n_b")

    def order(self) -> np.ndarray:
        """Gene indices ranked by ``z``: highest in A first, highest in B last (NaN at the end)."""
        key = np.where(np.isfinite(self.z), -self.z, np.inf)
        return np.lexsort((-self.log2fc, key))

    def table(self):
        """pandas DataFrame, one row per gene in :meth:`order`, columns :attr:`COLUMNS`."""
        import pandas as pd

        idx = self.order()
        cols = {"gene": [self.genes[i] for i in idx]}
        for name in self.COLUMNS[1:8]:
            cols[name] = getattr(self, name)[idx]
        cols["n_a"], cols["n_b"] = self.n_a, self.n_b
        return pd.DataFrame(cols, columns=list(self.COLUMNS))

    def title(self) -> str:
        """``"A vs B: 12 vs 40 55 µm squares"``."""
        return f"{self.name_a} vs {self.name_b}: {self.n_a} vs {self.n_b} {self.unit}"

    def write_csv(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write :meth:`table` to ``path`` (.csv) atomically; refuse to replace a file unless asked."""
        path = check_output(path, (".csv",), overwrite)
        with _atomic(path) as tmp:
            self.table().to_csv(tmp, index=False)
        return path


def contrast_counts(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    genes: Sequence[str],
    *,
    name_a: str = "A",
    name_b: str = "B",
    unit: str = "units",
) -> ContrastResult:
    """Compare the units of two regions gene by gene (pure: counts in, statistics out).

    Parameters
    ----------
    counts_a, counts_b
        ``(n, G + 1)`` counts of each region's units: the G genes, then the unit's total
        (all transcripts). Rows without a normalised value (total <= 0 or NaN) must be
        removed first (:func:`split_units` callers do).
    genes
        The G gene names.
    name_a, name_b, unit
        For messages and the result.

    Raises
    ------
    StmapInputError
        When a region has fewer than :data:`MIN_UNITS` units.
    """
    a, b = np.asarray(counts_a, np.float64), np.asarray(counts_b, np.float64)
    g = len(genes)
    for name, c in ((name_a, a), (name_b, b)):
        if c.ndim != 2 or c.shape[1] != g + 1:
            msg = f"counts of {name!r} have shape {c.shape}; expected (units, {g + 1}) (genes, then total)"
            raise StmapInputError(msg)
        _check_enough(name, len(c), unit)
    norm_a = normalize_expression(a[:, :g], a[:, g])
    norm_b = normalize_expression(b[:, :g], b[:, g])
    cp_a = 1e4 * a[:, :g] / a[:, g : g + 1]
    cp_b = 1e4 * b[:, :g] / b[:, g : g + 1]
    log2fc = np.log2((cp_a.mean(0) + PSEUDOCOUNT_CP10K) / (cp_b.mean(0) + PSEUDOCOUNT_CP10K))
    u, z, p = wilcoxon(norm_a, norm_b)
    return ContrastResult(
        list(genes),
        norm_a.mean(0),
        norm_b.mean(0),
        log2fc,
        u,
        z,
        p,
        bh_adjust(p),
        len(a),
        len(b),
        name_a,
        name_b,
        unit,
    )


def _check_enough(name: str, n: int, unit: str) -> None:
    if n < MIN_UNITS:
        fix = "draw a larger region" if unit == "cells" else "use smaller units or a larger region"
        msg = f"region {name!r} holds {n} {unit} on tissue; the test needs at least {MIN_UNITS}: {fix}"
        raise StmapInputError(msg)


# ================================================================================ regions
def find_region(regions: Sequence[Region], key: str | int, *, source: str = "") -> Region:
    """The region named ``key`` (exact, then case-insensitive), or at 0-based index ``key``.

    Raises :class:`StmapInputError` listing the names there when none matches.
    """
    names = [r.name for r in regions]
    text = str(key).strip()
    if text in names:
        return regions[names.index(text)]
    lower = [n.lower() for n in names]
    if lower.count(text.lower()) == 1:
        return regions[lower.index(text.lower())]
    if text.lstrip("-").isdigit() and -len(regions) <= int(text) < len(regions):
        return regions[int(text)]
    where = f" in {source}" if source else ""
    listed = ", ".join(repr(n) for n in names[:30]) + (", ..." if len(names) > 30 else "")
    msg = f"no region {text!r}{where}; the regions there are {listed} (or pass an index 0..{len(names) - 1})"
    raise StmapInputError(msg)


def points_in_region(points_yx: np.ndarray, region: Region) -> np.ndarray:
    """Whether each point (n, 2) level-0 px (y, x) lies inside ``region`` (holes excluded).

    A point is inside when the signs of the parts holding it add up to more than zero (outer
    rings +1, holes −1); disks and ellipses are their 256-gons.
    """
    from skimage.measure import points_in_poly

    pts = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    score = np.zeros(len(pts))
    for fp, sign in region.parts:
        y0, x0, y1, x1 = fp.bbox_yx()
        near = (pts[:, 0] >= y0) & (pts[:, 0] <= y1) & (pts[:, 1] >= x0) & (pts[:, 1] <= x1)
        if near.any():
            inside = points_in_poly(pts[near], np.asarray(fp.outline_yx(256), dtype=np.float64))
            score[np.flatnonzero(near)[inside]] += sign
    return score > 0.5


def _sample_offsets(size_px: float, footprint: str) -> np.ndarray:
    """Offsets (k, 2) of the sample points of a unit from its centre, level-0 px."""
    t = ((np.arange(_SAMPLES) + 0.5) / _SAMPLES - 0.5) * size_px
    off = np.stack(np.meshgrid(t, t, indexing="ij"), axis=-1).reshape(-1, 2)
    if footprint == "disk":
        off = off[np.hypot(off[:, 0], off[:, 1]) <= size_px / 2]
    return off


def region_fractions(
    centers_yx: np.ndarray, size_px: float, footprint: str, region: Region
) -> np.ndarray:
    """Fraction (n,) of each unit's area inside ``region`` (8 × 8 sample points per unit)."""
    centers = np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)
    off = _sample_offsets(size_px, footprint)
    out = np.zeros(len(centers))
    y0, x0, y1, x1 = region.bbox_yx()
    r = size_px / 2
    near = np.flatnonzero(
        (centers[:, 0] + r >= y0)
        & (centers[:, 0] - r <= y1)
        & (centers[:, 1] + r >= x0)
        & (centers[:, 1] - r <= x1)
    )
    if len(near):
        pts = (centers[near, None, :] + off[None]).reshape(-1, 2)
        out[near] = points_in_region(pts, region).reshape(len(near), -1).mean(axis=1)
    return out


def _tissue_fractions(
    centers_yx: np.ndarray, size_px: float, footprint: str, tissue: TissueMask | None
) -> np.ndarray:
    """Fraction (n,) of each unit on the tissue mask (1 everywhere without a mask)."""
    centers = np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)
    if tissue is None:
        return np.ones(len(centers))
    off = _sample_offsets(size_px, footprint)
    pts = centers[:, None, :] + off[None]
    h, w = tissue.mask.shape
    r = np.clip(np.floor(pts[..., 0] / tissue.px_yx[0]), 0, h - 1).astype(np.int64)
    c = np.clip(np.floor(pts[..., 1] / tissue.px_yx[1]), 0, w - 1).astype(np.int64)
    return tissue.mask[r, c].mean(axis=1)


def tissue_bbox(
    tissue: TissueMask | None, shape_yx: Sequence[int]
) -> tuple[float, float, float, float]:
    """Level-0 px box (y0, x0, y1, x1) around the tissue mask (the slide without one)."""
    h, w = (float(v) for v in shape_yx[:2])
    if tissue is None or not tissue.mask.any():
        return (0.0, 0.0, h, w)
    rows, cols = np.flatnonzero(tissue.mask.any(1)), np.flatnonzero(tissue.mask.any(0))
    py, px = tissue.px_yx
    return (
        rows[0] * py,
        cols[0] * px,
        min(h, (rows[-1] + 1) * py),
        min(w, (cols[-1] + 1) * px),
    )


@dataclass(frozen=True)
class UnitSplit:
    """Which units go to A and to B (indices into the units), and how many were left out."""

    in_a: np.ndarray
    in_b: np.ndarray
    off_tissue: int
    shared: int


def split_units(
    fraction_a: np.ndarray,
    fraction_b: np.ndarray | None,
    on_tissue: np.ndarray,
    *,
    min_fraction: float = 0.5,
) -> UnitSplit:
    """Assign units to A and B by the fraction of their area inside each (see module notes).

    Parameters
    ----------
    fraction_a, fraction_b
        ``(n,)`` fractions of each unit inside A and B; ``fraction_b`` None: B is the rest
        of the tissue (units on tissue not in A).
    on_tissue
        ``(n,)`` bool: units on tissue (the others are left out).
    min_fraction
        A unit is in a region when at least this fraction of it lies inside.
    """
    tissue = np.asarray(on_tissue, dtype=bool)
    by_a = np.asarray(fraction_a, dtype=np.float64) >= min_fraction
    by_b = None if fraction_b is None else np.asarray(fraction_b, np.float64) >= min_fraction
    in_a = tissue & by_a
    in_b = tissue & ~in_a if by_b is None else tissue & by_b
    shared = in_a & in_b
    if shared.any():
        logger.info("%d units lie in both regions: left out of both", int(shared.sum()))
    drawn = by_a if by_b is None else by_a | by_b  # off-tissue units inside a drawn region
    return UnitSplit(
        np.flatnonzero(in_a & ~shared),
        np.flatnonzero(in_b & ~shared),
        int((drawn & ~tissue).sum()),
        int(shared.sum()),
    )


# ============================================================================ grid units
def grid_units(
    bbox_yx: Sequence[float], *, size_px: float, kind: str = "square"
) -> tuple[np.ndarray, list[Footprint]]:
    """Units of one size over a level-0 px box: centres (n, 2) (y, x) and footprints.

    ``kind``: ``"square"`` (squares of side ``size_px`` touching each other, like Visium HD
    bins) or ``"visium"`` (disks of diameter ``size_px`` on a hexagonal lattice of pitch
    ``size_px · 100 / 55``, like Visium spots); laid out by
    :func:`~napari_stmap.core.geometry.spot_grid` (the Regions dock's spot grids), units
    wholly inside the box, the lattice centred in it.
    """
    if kind not in UNIT_KINDS:
        msg = f"unit kind {kind!r} is not known: pass one of {', '.join(UNIT_KINDS)}"
        raise StmapInputError(msg)
    footprint, pitch, hexagonal = UNIT_KINDS[kind]
    return spot_grid(
        tuple(bbox_yx),
        size_px=size_px,
        pitch_px=size_px * pitch,
        footprint=footprint,
        hexagonal=hexagonal,
    )


def unit_label(kind: str, size_um: float) -> str:
    """``"55 µm squares"`` / ``"55 µm Visium-like spots"``."""
    return f"{size_um:g} µm " + ("squares" if kind == "square" else "Visium-like spots")


def contrast_grid(
    source: Any,
    region_a: Region,
    region_b: Region | None,
    *,
    mpp: float,
    size_um: float,
    kind: str = "square",
    tissue: TissueMask | None = None,
    shape_yx: Sequence[int],
    min_fraction: float = 0.5,
    progress: Callable[[int, int], Any] | None = None,
) -> ContrastResult:
    """Compare A with B (None: the rest of the tissue) over spot-grid units; blocking.

    Parameters
    ----------
    source
        A :class:`~napari_stmap.core.predict.PredictionSource` (a dense store predicts the
        tiles the units need first).
    region_a, region_b
        Regions in level-0 px; ``region_b`` None compares A with the rest of the tissue.
    mpp
        µm per level-0 px of the slide.
    size_um, kind
        Unit size in µm and kind (:func:`grid_units`).
    tissue
        The slide's tissue mask (:func:`~napari_stmap.core.tiling.tissue_mask`); the lattice
        covers its bounding box and units off it are left out (None: the whole slide counts).
    shape_yx
        Level-0 shape of the slide (the lattice's extent without a mask).
    min_fraction, progress
        See :func:`split_units`; ``progress(done, total)`` of the source's sums.
    """
    if not (math.isfinite(size_um) and size_um > 0):
        msg = f"unit size {size_um} µm is not a positive number of µm; pass e.g. 55"
        raise StmapInputError(msg)
    unit = unit_label(kind, size_um)
    size_px = size_um / mpp
    box = tissue_bbox(tissue, shape_yx)
    centers, fps = grid_units(box, size_px=size_px, kind=kind)
    footprint = UNIT_KINDS[kind][0]
    frac_a = region_fractions(centers, size_px, footprint, region_a)
    frac_b = None if region_b is None else region_fractions(centers, size_px, footprint, region_b)
    on_tissue = _tissue_fractions(centers, size_px, footprint, tissue) >= 0.5
    split = split_units(frac_a, frac_b, on_tissue, min_fraction=min_fraction)
    name_a, name_b = region_a.name, REST if region_b is None else region_b.name
    _check_enough(name_a, len(split.in_a), unit)
    _check_enough(name_b, len(split.in_b), unit)
    used = np.concatenate([split.in_a, split.in_b])
    sums = np.asarray(source.region_sums([fps[i] for i in used], progress=progress))
    counts_a, counts_b = sums[: len(split.in_a)], sums[len(split.in_a) :]
    (counts_a, drop_a), (counts_b, drop_b) = _with_value(counts_a), _with_value(counts_b)
    result = contrast_counts(
        counts_a, counts_b, list(source.genes), name_a=name_a, name_b=name_b, unit=unit
    )
    result.notes.update(
        off_tissue=split.off_tissue,
        shared=split.shared,
        no_value=drop_a + drop_b,
        unit_um=float(size_um),
        unit_kind=kind,
        centers_a_yx=centers[split.in_a],
        centers_b_yx=centers[split.in_b],
    )
    return result


def _with_value(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows with a normalised value (total > 0, all finite) and how many were dropped."""
    ok = np.isfinite(counts).all(axis=1) & (counts[:, -1] > 0)
    return counts[ok], int((~ok).sum())


# ================================================================================= cells
@dataclass(frozen=True)
class CellUnits:
    """Cells of a ``cells.h5ad`` as units: centroids, counts, genes.

    Attributes
    ----------
    centers_yx
        (n, 2) centroids, level-0 px (y, x) (from ``obs['centroid_y']``/``obs['centroid_x']``).
    counts
        (n, G + 1) predicted counts: the G genes (``X``), then ``obs['total_counts']``.
    genes
        The G gene names (``var_names``).
    path
        The file.
    meta
        ``uns['stmap']`` (provenance: store, slide, µm/px, ...), empty when absent.
    """

    centers_yx: np.ndarray
    counts: np.ndarray
    genes: list[str]
    path: Path
    meta: dict[str, Any]


def read_cells(path: str | Path) -> CellUnits:
    """Read a ``cells.h5ad`` written by ``stmap cells`` (see :class:`CellUnits`)."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such cells file; write one with `stmap cells --out {path.name}`"
        raise StmapInputError(msg)
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # not HDF5, not AnnData
        msg = f"{path} is not an AnnData .h5ad file ({type(exc).__name__}); pass the cells.h5ad of `stmap cells`"
        raise StmapInputError(msg) from None
    missing = [k for k in ("centroid_x", "centroid_y", "total_counts") if k not in adata.obs]
    if missing:
        msg = f"{path} has no obs column(s) {', '.join(missing)}; pass a cells.h5ad written by `stmap cells`"
        raise StmapInputError(msg)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    total = np.asarray(adata.obs["total_counts"], dtype=np.float64)[:, None]
    centers = np.stack(
        [np.asarray(adata.obs["centroid_y"], float), np.asarray(adata.obs["centroid_x"], float)],
        axis=1,
    )
    meta = dict(adata.uns.get("stmap", {}))
    counts = np.concatenate([np.asarray(x, dtype=np.float64), total], axis=1)
    return CellUnits(centers, counts, [str(g) for g in adata.var_names], path, meta)


def check_cells_match(cells: CellUnits, slide_path: str | Path, shape_yx: Sequence[int]) -> None:
    """Refuse cells of another slide than ``slide_path`` (level-0 shape ``shape_yx``).

    The slide the cells file records in ``uns['stmap']`` (``slide`` or ``slide_path``), when
    it does, must have the same file name; every centroid must lie on the slide.
    """
    recorded = cells.meta.get("slide") or cells.meta.get("slide_path")
    if isinstance(recorded, dict):
        recorded = recorded.get("path")
    if isinstance(recorded, str) and recorded and Path(recorded).name != Path(slide_path).name:
        msg = f"{cells.path} holds cells of {recorded}, not of {slide_path}: pass the cells of that slide"
        raise StmapInputError(msg)
    h, w = (int(v) for v in shape_yx[:2])
    c = cells.centers_yx
    off = (c[:, 0] < 0) | (c[:, 0] > h) | (c[:, 1] < 0) | (c[:, 1] > w)
    if off.any():
        msg = f"{cells.path}: {int(off.sum())} of {len(c)} cell centroids lie off the slide (0, 0, {h}, {w}) level-0 px: pass the cells of this slide"
        raise StmapInputError(msg)


def contrast_cells(cells: CellUnits, region_a: Region, region_b: Region | None) -> ContrastResult:
    """Compare A with B (None: every other cell) over cells: a cell is in a region when its
    centroid is (level-0 px); cells without transcripts are left out."""
    in_a = points_in_region(cells.centers_yx, region_a)
    in_b = ~in_a if region_b is None else points_in_region(cells.centers_yx, region_b)
    shared = in_a & in_b
    in_a, in_b = in_a & ~shared, in_b & ~shared
    (counts_a, drop_a), (counts_b, drop_b) = (
        _with_value(cells.counts[in_a]),
        _with_value(cells.counts[in_b]),
    )
    name_b = REST if region_b is None else region_b.name
    result = contrast_counts(
        counts_a, counts_b, cells.genes, name_a=region_a.name, name_b=name_b, unit="cells"
    )
    result.notes.update(
        off_tissue=0,
        shared=int(shared.sum()),
        no_value=drop_a + drop_b,
        cells=str(cells.path),
        centers_a_yx=cells.centers_yx[in_a],
        centers_b_yx=cells.centers_yx[in_b],
    )
    return result


def contrast_on_slide(
    source: Any,
    slide: Any,
    region_a: Region,
    region_b: Region | None,
    *,
    kind: str = "square",
    size_um: float = 55.0,
    cells: str | Path | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> ContrastResult:
    """Compare A with B (None: the rest) on ``slide``: what ``stmap contrast`` and the dock run.

    ``cells`` given: the cells of that ``cells.h5ad`` (:func:`read_cells`, checked against the
    slide) are the units; else spot-grid units of ``kind`` and ``size_um`` over the slide's
    tissue mask (:func:`~napari_stmap.core.tiling.tissue_mask`, computed here: call from a
    worker), summed from ``source``. Blocking.
    """
    from .tiling import tissue_mask

    if cells is not None:
        units = read_cells(cells)
        check_cells_match(units, slide.path, slide.shape_yx)
        return contrast_cells(units, region_a, region_b)
    return contrast_grid(
        source,
        region_a,
        region_b,
        mpp=float(slide.mpp),
        size_um=size_um,
        kind=kind,
        tissue=tissue_mask(slide),
        shape_yx=slide.shape_yx,
        progress=progress,
    )
