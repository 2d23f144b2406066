"""Measured units at any scale: spots, bins and sums of bins, with their sequencing depth.

Training (targets at several scales) and evaluation (the units a model is scored on) both read
the measurement through :func:`load_measured` and build the units of a scale with
:meth:`Measured.units`. Positions are level-0 px of the slide, axis order (y, x); sizes are µm
(``bin_um``) and level-0 px (``size_px``); areas µm².

Scales (``bin_um``)
-------------------
- **Legacy ST / Visium spots** (disks) are used as they are; other sizes are refused
  (disks cannot be split or merged into other disks).
- **Visium HD bins** (squares) are read at the finest size needed (the *base*). A coarser
  square size that is a whole multiple of the base is built by summing base bins in blocks of
  their array indices (:func:`~napari_stmap.core.aggregate.sum_bins`); only **full blocks** are
  kept (all f × f base bins measured), so a coarse bin never covers tissue it did not measure.
- A size that is no multiple of the base (``55``) means a Visium-like spot made of base bins:
  disks of that diameter on a hexagonal lattice of pitch max(100 µm, 2 × size) over the bins;
  each disk's value is the sum of the base bins whose **centres** fall inside it, and a disk is
  kept only when every lattice bin inside it was measured.
- A size finer than the finest measured bins is refused: bins can be summed, never split.

Depth
-----
:func:`spot_density` is a slide's median total counts per µm² of unit area;
:func:`depth_factors` scales every slide to the mean of those (the reference depth a model
predicts at).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .aggregate import sum_bins
from .errors import StmapInputError
from .geometry import spot_grid
from .io.spots import available_bin_sizes, detect_spots_layout, read_spots

__all__ = [
    "DISK_PITCH_UM",
    "Measured",
    "Units",
    "depth_factors",
    "load_measured",
    "scale_key",
    "spot_density",
]

logger = logging.getLogger(__name__)

#: Centre-to-centre distance of the Visium-like disks built from HD bins, µm (at least).
DISK_PITCH_UM = 100.0


def scale_key(bin_um: float) -> str:
    """JSON key of a scale: ``f"{bin_um:g}"`` (``8.0 -> "8"``, ``55.0 -> "55"``)."""
    return f"{float(bin_um):g}"


# ------------------------------------------------------------------------------- measured
@dataclass
class Units:
    """Measured units (spots, bins or sums of bins) of one scale.

    Attributes
    ----------
    bin_um : float
        Nominal size (µm): square side or disk diameter.
    centers_yx : numpy.ndarray
        (n, 2) level-0 px centres (y, x).
    footprint : str
        ``"disk"`` or ``"square"``.
    size_px : float
        Diameter or side in level-0 px.
    counts : scipy.sparse.csr_matrix
        (n, G) raw counts of the measured genes (see :attr:`Measured.genes`).
    total : numpy.ndarray
        (n,) all transcripts of each unit (row sums over every gene of the matrix).
    area_um2 : numpy.ndarray
        (n,) measured area of each unit, µm².
    members : scipy.sparse.csr_matrix or None
        (n, n_base) 0/1 matrix of the base bins summed into each unit; None when the units
        are the measured spots themselves.
    """

    bin_um: float
    centers_yx: np.ndarray
    footprint: str
    size_px: float
    counts: sp.csr_matrix
    total: np.ndarray
    area_um2: np.ndarray
    members: sp.csr_matrix | None = None

    @property
    def n(self) -> int:
        """Number of units."""
        return int(self.counts.shape[0])


@dataclass
class Measured:
    """Measured spots of one section at their finest needed size (the base), in tissue only.

    Attributes
    ----------
    path : Path
        What was read.
    spots : Spots
        Base spots / bins (in-tissue), counts restricted to :attr:`genes`.
    total : numpy.ndarray
        (n,) all transcripts per base spot, computed before any gene restriction.
    genes : list of str
        Column names of ``spots.counts`` (unique; first occurrence kept).
    base_um : float
        Size of the base spots (µm).
    available_um : list of float
        Bin sizes present in the source (HD), else ``[base_um]``.
    """

    path: Path
    spots: Any
    total: np.ndarray
    genes: list[str]
    base_um: float
    available_um: list[float] = field(default_factory=list)

    @property
    def binned(self) -> bool:
        """True for square bins (Visium HD-like) that can be summed into coarser scales."""
        return self.spots.footprint == "square"

    def restrict(self, genes: Sequence[str]) -> Measured:
        """The same spots with counts of ``genes`` only (all must be present)."""
        where = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in where]
        if missing:
            msg = f"{self.path}: genes {missing[:5]} are not measured here ({len(missing)} missing)"
            raise StmapInputError(msg)
        cols = np.array([where[g] for g in genes], dtype=np.int64)
        spots = replace(
            self.spots,
            counts=self.spots.counts[:, cols],
            genes=np.asarray(genes, dtype=str),
            gene_ids=self.spots.gene_ids[cols],
        )
        return replace(self, spots=spots, genes=list(genes))

    def units(self, bin_um: float) -> Units:
        """Units of size ``bin_um`` µm (see the module notes for what is built or refused)."""
        b, base = float(bin_um), self.base_um
        if b < base * (1 - 1e-6):
            msg = (
                f"{self.path}: a {b:g} µm scale is finer than the measured {base:g} µm "
                "spots/bins; bins can be summed into coarser scales but never split"
            )
            raise StmapInputError(msg)
        if math.isclose(b, base, rel_tol=1e-6):
            return self._identity_units()
        if not self.binned:
            msg = (
                f"{self.path}: holds {base:g} µm {self.spots.footprint} spots; other sizes "
                f"({b:g} µm) cannot be built from them; evaluate at {base:g} µm"
            )
            raise StmapInputError(msg)
        ratio = b / base
        if abs(ratio - round(ratio)) < 1e-6:
            return self._block_units(b, round(ratio))
        return self._disk_units(b)

    def _identity_units(self) -> Units:
        s = self.spots
        area = _footprint_area_um2(s.footprint, s.size_um)
        return Units(
            self.base_um,
            s.centers_yx,
            s.footprint,
            float(s.size_px),
            s.counts.tocsr(),
            self.total,
            np.full(s.n_spots, area),
        )

    def _block_units(self, b: float, factor: int) -> Units:
        """Full f × f blocks of base bins (by array index when known)."""
        s = self.spots
        centers, _, group = sum_bins(
            np.zeros((s.n_spots, 1)),
            s.centers_yx,
            bin_px=float(s.size_px),
            target_px=float(s.size_px) * factor,
            index_yx=s.array_rc,
        )
        full = np.flatnonzero(np.bincount(group, minlength=len(centers)) == factor * factor)
        members = _membership(group, len(centers), s.n_spots)[full]
        return self._from_members(b, centers[full], "square", float(s.size_px) * factor, members)

    def _disk_units(self, b: float) -> Units:
        """Disks of ``b`` µm on a hexagonal lattice, summing base bins whose centres fall inside."""
        from scipy.spatial import cKDTree

        s = self.spots
        mpp = s.size_um / float(s.size_px)
        lattice = _lattice_positions(s)
        y0, x0 = lattice.min(axis=0) - s.size_px / 2
        y1, x1 = lattice.max(axis=0) + s.size_px / 2
        pitch = max(DISK_PITCH_UM, 2 * b) / mpp
        centers, _ = spot_grid((y0, x0, y1, x1), size_px=b / mpp, pitch_px=pitch, hexagonal=True)
        radius = b / mpp / 2 * (1 + 1e-9)
        found = cKDTree(lattice).query_ball_point(centers, radius) if len(centers) else []
        expected = _lattice_count(s, centers, radius)
        lengths = np.array([len(m) for m in found], dtype=np.int64)
        keep = np.flatnonzero((lengths == expected) & (lengths > 0))
        rows = np.repeat(np.arange(len(keep)), lengths[keep])
        cols = np.concatenate([np.asarray(found[k], dtype=np.int64) for k in keep] or [[]])
        members = sp.csr_matrix(
            (np.ones(len(cols)), (rows, cols.astype(np.int64))), shape=(len(keep), s.n_spots)
        )
        return self._from_members(b, centers[keep], "disk", b / mpp, members)

    def _from_members(
        self, b: float, centers: np.ndarray, kind: str, size_px: float, members: sp.csr_matrix
    ) -> Units:
        base_area = _footprint_area_um2(self.spots.footprint, self.spots.size_um)
        counts = sp.csr_matrix(members @ self.spots.counts)
        total = np.asarray(members @ self.total, dtype=np.float64).ravel()
        area = np.asarray(members.sum(axis=1), dtype=np.float64).ravel() * base_area
        logger.info(
            "%s: %d units of %g µm (%s) from %g µm bins",
            self.path,
            len(centers),
            b,
            kind,
            self.base_um,
        )
        return Units(b, centers, kind, size_px, counts, total, area, members.tocsr())


def _membership(group: np.ndarray, n_units: int, n_base: int) -> sp.csr_matrix:
    """(n_units, n_base) 0/1 matrix: base bin i belongs to unit group[i]."""
    ones = np.ones(n_base)
    return sp.csr_matrix((ones, (group, np.arange(n_base))), shape=(n_units, n_base))


def _footprint_area_um2(kind: str, size_um: float) -> float:
    return math.pi * (size_um / 2) ** 2 if kind == "disk" else size_um**2


def _lattice_design(spots: Any) -> np.ndarray:
    """(n, 3) rows (array_row, array_col, 1); indices from the centres when not recorded."""
    idx = spots.array_rc
    if idx is None:
        idx = np.rint((spots.centers_yx - spots.centers_yx.min(axis=0)) / spots.size_px)
    return np.column_stack([np.asarray(idx, dtype=float), np.ones(len(idx))])


def _lattice_fit(spots: Any) -> np.ndarray:
    """Affine (3, 2) map from (array_row, array_col, 1) to level-0 px centres (least squares)."""
    coef, *_ = np.linalg.lstsq(_lattice_design(spots), spots.centers_yx, rcond=None)
    return coef


def _lattice_positions(spots: Any) -> np.ndarray:
    """Bin centres on the fitted lattice (exactly regular, robust to rotation), (n, 2) px."""
    return _lattice_design(spots) @ _lattice_fit(spots)


def _lattice_count(spots: Any, centers: np.ndarray, radius: float) -> np.ndarray:
    """Number of lattice positions (measured or not) within ``radius`` of each centre."""
    coef = _lattice_fit(spots)
    lin, off = coef[:2], coef[2]
    inv = np.linalg.inv(lin.T)
    reach = int(math.ceil(radius / min(np.linalg.norm(lin, axis=1)))) + 1
    steps = np.arange(-reach, reach + 1)
    grid = np.stack(np.meshgrid(steps, steps, indexing="ij"), axis=-1).reshape(-1, 2)
    out = np.zeros(len(centers), dtype=np.int64)
    for k, c in enumerate(np.asarray(centers, dtype=float)):
        base = np.rint(inv @ (c - off))
        pos = (base + grid) @ lin + off
        out[k] = int(np.count_nonzero(np.hypot(*(pos - c).T) <= radius))
    return out


def load_measured(
    path: str | Path, *, scales_um: Sequence[float] | None = None, slide: Any = None
) -> Measured:
    """Read measured spots/bins at the finest size the requested scales need.

    Parameters
    ----------
    path : str or Path
        Visium ``outs/``, Visium HD ``outs/`` / ``binned_outputs/``, ``.h5ad`` or a
        SpatialData store (or one of its tables, ``data.zarr/tables/NAME``).
    scales_um : sequence of float, optional
        Scales that will be asked for; for Visium HD the base is the coarsest available bin
        size that divides every requested square size (the finest one when a non-multiple
        such as 55 is asked for, or when no scale is given).
    slide : Slide, optional
        Checks that the spots lie on it.

    Returns
    -------
    Measured
        In-tissue spots only, with total counts over all genes.
    """
    p = Path(path)
    layout = detect_spots_layout(p)
    available = available_bin_sizes(p) if layout in ("visium_hd", "spatialdata") else []
    base = _choose_base(p, available, scales_um) if available else None
    if layout == "spatialdata" and base is None and scales_um:
        base = min(float(b) for b in scales_um)  # cells: the pseudo-spot side
    spots = read_spots(p, bin_um=base, mpp=None if slide is None else slide.mpp)
    if slide is not None:
        spots.check_against_image(slide.shape_yx, name=slide.path.name, mpp=slide.mpp)
    if spots.in_tissue.any() and not spots.in_tissue.all():
        spots = spots.subset(spots.in_tissue)
    if not math.isfinite(spots.size_px):
        msg = f"{p}: the spots' µm/px is unknown; add microns_per_pixel to the scale factors"
        raise StmapInputError(msg)
    spots, genes = _unique_genes(spots)
    total = np.asarray(spots.counts.sum(axis=1), dtype=np.float64).ravel()
    return Measured(p, spots, total, genes, float(spots.bin_um), available or [float(spots.bin_um)])


def _choose_base(path: Path, available: list[float], scales: Sequence[float] | None) -> float:
    """Visium HD base bin size for the requested scales (see :func:`load_measured`)."""
    if not scales:
        return min(available)
    finest = min(float(b) for b in scales)
    usable = [a for a in available if a <= finest * (1 + 1e-6)]
    if not usable:
        have = ", ".join(f"{a:g}" for a in available)
        msg = (
            f"{path}: the {finest:g} µm scale is finer than every measured bin size ({have} µm); "
            "bins can be summed into coarser scales but never split"
        )
        raise StmapInputError(msg)

    def divides(a: float) -> bool:
        return all(abs(b / a - round(b / a)) < 1e-6 for b in scales)

    fits = [a for a in usable if divides(a)]
    return max(fits) if fits else min(usable)


def _unique_genes(spots: Any) -> tuple[Any, list[str]]:
    """Drop repeated gene names (first kept), so names index columns unambiguously."""
    names = [str(g) for g in spots.genes]
    _, first = np.unique(names, return_index=True)
    if len(first) == len(names):
        return spots, names
    keep = np.sort(first)
    logger.warning("%s: %d repeated gene names dropped", spots.source, len(names) - len(keep))
    spots = replace(
        spots, counts=spots.counts[:, keep], genes=spots.genes[keep], gene_ids=spots.gene_ids[keep]
    )
    return spots, [names[i] for i in keep]


# ---------------------------------------------------------------------------------- depth
def spot_density(units: Units) -> float:
    """Median total counts per µm² of the units (the depth statistic; NaN when empty)."""
    if units.n == 0:
        return float("nan")
    return float(np.median(units.total / units.area_um2))


def depth_factors(densities: Sequence[float]) -> tuple[float, list[float]]:
    """Reference depth and per-slide factors.

    Parameters
    ----------
    densities : sequence of float
        Median total counts per µm² of in-tissue spot area, one per training slide.

    Returns
    -------
    reference, factors
        ``reference`` = mean of the slides' medians (counts/µm²); ``factors[k] =
        reference / densities[k]``: scaling slide k's counts by it makes its median density
        equal the reference.
    """
    dens = np.asarray(densities, dtype=np.float64)
    if dens.size == 0 or not np.all(np.isfinite(dens) & (dens > 0)):
        msg = f"cannot normalise sequencing depth: median counts per µm² are {dens.tolist()}"
        raise StmapInputError(msg)
    reference = float(dens.mean())
    return reference, [reference / float(d) for d in dens]
