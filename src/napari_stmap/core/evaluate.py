"""Evaluation harness: measured spots/bins at chosen scales vs any model's predictions.

One code path measures every architecture (``model.input_kind`` "dense" or "spot"), so PixNet
and the SpotNet baseline are compared on the same units, genes and normalisation.

Scales (``bin_um``)
-------------------
- **Legacy ST / Visium spots** (disks) are evaluated as they are; other sizes are refused
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

Values and normalisation
------------------------
Dense models are summed over exactly the same base bins as the measurement (their map is
additive, so this equals predicting the coarse footprint directly). Spot models predict each
unit's footprint from one crop, scaled by area (see
:func:`~napari_stmap.core.predict_dense.predict_spots`). Headline metrics use
``log1p(1e4 · gene / total)`` per unit, computed after summing, measured total = all
transcripts of the unit (all genes of the matrix), predicted total = the model's total channel
(:func:`~napari_stmap.core.metrics.evaluate_expression`). Absolute figures compare predicted
counts (at the model's reference depth) with measured counts scaled to that depth by the test
slide's own depth factor (see :func:`depth_factors`); they are reported under ``"absolute"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import StmapInputError
from .io.spots import available_bin_sizes, detect_spots_layout, read_spots

__all__ = [
    "METRIC_KEYS",
    "Measured",
    "Units",
    "depth_factors",
    "evaluate_measured",
    "evaluate_model",
    "format_table",
    "load_measured",
    "predict_units",
    "scale_key",
    "spot_density",
]

logger = logging.getLogger(__name__)

#: Keys of every per-scale entry of the evaluation JSON.
METRIC_KEYS = ("pcc_f", "pcc_s", "pcc_m", "mse", "mae", "n_spots", "n_genes")
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
        from napari_stmap.core.aggregate import sum_bins

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

        from napari_stmap.core.geometry import spot_grid

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
        Visium ``outs/``, Visium HD ``outs/`` / ``binned_outputs/`` or ``.h5ad``.
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
    available = available_bin_sizes(p) if layout == "visium_hd" else []
    base = _choose_base(p, available, scales_um) if available else None
    spots = read_spots(p, bin_um=base)
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


# ------------------------------------------------------------------------------ prediction
def predict_units(
    model: Any,
    slide: Any,
    measured: Measured,
    units: dict[str, Units],
    *,
    progress: Callable[[int, int], None] | None = None,
    **kw: Any,
) -> dict[str, np.ndarray]:
    """Predicted counts of every scale's units, as :func:`evaluate_measured` scores them.

    Parameters
    ----------
    model
        Any registered model.
    slide
        The measured section's slide.
    measured, units
        :func:`load_measured`'s result and its ``units`` per scale key (µm, ``scale_key``).
    progress : callable, optional
        ``progress(done, total)`` in spots over every prediction this makes (the summed
        scales' base bins once, then each other scale's units), ``total`` known from the start.
    **kw
        :func:`~napari_stmap.core.predict_dense.predict_spots` options (``device``,
        ``tile_px``, ``batch_size``, ``tta``).

    Returns
    -------
    dict of str to numpy.ndarray
        Per scale key, (n_units, G_model + 1) expected counts (genes in ``model.genes``
        order, total last). Dense models predict summed scales once, on their base bins, and
        sum those predictions (the value rule makes that exact).
    """
    from napari_stmap.core.predict_dense import predict_spots

    out: dict[str, np.ndarray] = {}
    summed = {k: u for k, u in units.items() if u.members is not None}
    used = None
    if model.input_kind == "dense" and summed:
        used = np.unique(np.concatenate([u.members.indices for u in summed.values()]))
    rest = [k for k in units if used is None or k not in summed]
    steps = _Steps(progress, (0 if used is None else len(used)) + sum(units[k].n for k in rest))
    if used is not None:
        base = measured.spots.subset(used)
        pred_used = predict_spots(model, slide, base, progress=steps.part(len(used)), **kw)
        pred_base = np.zeros((measured.spots.n_spots, model.num_outputs))
        pred_base[used] = pred_used
        out = {k: np.asarray(u.members @ pred_base) for k, u in summed.items()}
    for k in rest:
        spots = _unit_spots(units[k])
        out[k] = predict_spots(model, slide, spots, progress=steps.part(units[k].n), **kw)
    return out


class _Steps:
    """One running ``progress(done, total)`` over consecutive parts of known sizes (spots)."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.before = progress, int(total), 0
        if progress is not None:
            progress(0, self.total)  # the total is known before the first (slow) part

    def part(self, n: int) -> Callable[[int, int], None] | None:
        """Callback for the next part of ``n`` spots (its own ``(done, n)`` counts)."""
        if self.progress is None:
            return None
        before, self.before = self.before, self.before + int(n)

        def step(done: int, of: int) -> None:
            self.progress(before + min(done, n), self.total)

        return step


@dataclass
class _SpotsView:
    """Minimal Spots-like view (centres, footprint, size) for :func:`predict_spots`."""

    centers_yx: np.ndarray
    footprint: str
    size_px: float


def _unit_spots(u: Units) -> _SpotsView:
    return _SpotsView(u.centers_yx, u.footprint, u.size_px)


# ------------------------------------------------------------------------------ metrics
def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metric_entry(block: dict) -> dict[str, Any]:
    return {k: _clean(block[k]) for k in METRIC_KEYS}


def _gene_entry(block: dict) -> dict[str, Any]:
    return {g: _clean(float(r)) for g, r in block["per_gene"].items()}


def _score(
    pred: np.ndarray, counts: sp.csr_matrix, total: np.ndarray, names: list[str], top_k: int | None
) -> dict[str, dict]:
    from napari_stmap.core.metrics import evaluate_expression

    if top_k:
        return evaluate_expression(pred, counts, total, genes=names, top_k=int(top_k))
    return evaluate_expression(pred, counts, total, genes=names, gene_list=names)


def _fill(target: dict, key: str, result: dict[str, dict]) -> None:
    """Put one scale's normalised and absolute results into the JSON skeleton."""
    target["scales"][key] = _metric_entry(result["normalised"])
    target["genes"][key] = _gene_entry(result["normalised"])
    target["absolute"]["scales"][key] = _metric_entry(result["absolute"])
    target["absolute"]["genes"][key] = _gene_entry(result["absolute"])


def _skeleton() -> dict[str, Any]:
    return {"scales": {}, "genes": {}, "absolute": {"scales": {}, "genes": {}}}


def _test_factor(model: Any, meas: Measured, units: dict[str, Units]) -> float:
    """Factor scaling the test counts to the model's reference depth (1 when unknown).

    The test section's depth statistic is taken at the model's coarsest training scale when it
    can be built from the measurement (as in training), else at the coarsest evaluated scale.
    """
    training = (getattr(model, "metadata", {}) or {}).get("training", {})
    ref = training.get("depth", {}).get("reference_counts_per_um2")
    if not ref:
        return 1.0
    anchor = max(training.get("bin_um") or [0.0])
    try:
        u = meas.units(anchor) if anchor else None
    except StmapInputError:
        u = None
    if u is None or u.n == 0:
        u = max(units.values(), key=lambda v: v.bin_um)
    dens = spot_density(u)
    return float(ref) / dens if math.isfinite(dens) and dens > 0 else 1.0


def evaluate_measured(
    model: Any,
    slide: Any,
    measured: Measured,
    scales_um: Sequence[float] | None = None,
    *,
    truth: str | Path | None = None,
    top_k: int | None = None,
    device: Any = "cpu",
    tile_px: int | None = None,
    batch_size: int = 4,
    tta: bool = False,
    predict: Callable[[Measured, dict[str, Units]], dict[str, np.ndarray]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on measured units at several scales.

    Parameters
    ----------
    model : StmapModel
        Any registered architecture.
    slide : Slide
        The section's slide.
    measured : Measured
        From :func:`load_measured` (gene columns are matched to the model's by name).
    scales_um : sequence of float, optional
        Default: the measured size (HD: every available size that can be built).
    truth : path, optional
        Synthetic sample root: also evaluate against its truth density (key ``"truth"``).
    top_k : int, optional
        Evaluate only the ``top_k`` model genes with the highest mean measured count.
    device, tile_px, batch_size, tta
        Passed to :func:`~napari_stmap.core.predict_dense.predict_spots` (``tta``: average
        over the 8 turns and flips of every tile or crop).
    predict : callable, optional
        ``predict(measured, units) -> {key: (n, G_model + 1) counts}``: predictions of the
        units to score instead of running the model (e.g. from the viewer's prediction store,
        so the network does not run twice); ``model`` then only gives genes and metadata.
    progress : callable, optional
        ``progress(done, total)`` in spots while the model predicts (see
        :func:`predict_units`); not called when ``predict`` is given.

    Returns
    -------
    dict
        ``{"scales": {key: {pcc_f, pcc_s, pcc_m, mse, mae, n_spots, n_genes}}, "genes":
        {key: {gene: r}}, "absolute": {"scales": ..., "genes": ...}, "model": ..., "data":
        ...}`` (+ ``"truth"`` of the same shape without model/data); NaN written as None.
    """
    have = set(measured.genes)
    names = [g for g in model.genes if g in have]
    if not names:
        msg = f"{measured.path}: none of the model's {len(model.genes)} genes is measured here"
        raise StmapInputError(msg)
    meas = measured.restrict(names)
    scales = [float(b) for b in (scales_um or _default_scales(meas))]
    units = {scale_key(b): meas.units(b) for b in scales}
    cols = [model.genes.index(g) for g in names] + [model.num_outputs - 1]
    kw = {"device": device, "tile_px": tile_px, "batch_size": batch_size, "tta": tta}
    if predict is not None:
        preds = predict(meas, units)
    else:
        preds = predict_units(model, slide, meas, units, progress=progress, **kw)
    factor = _test_factor(model, meas, units)
    result = _skeleton()
    for key, u in units.items():
        pred = preds[key][:, cols]
        _fill(result, key, _score(pred, u.counts * factor, u.total * factor, names, top_k))
    if truth is not None:
        result["truth"] = _truth_block(truth, slide, meas, units, preds, cols, names, top_k, factor)
    result["model"] = {**_model_info(model), "tta": bool(tta)}
    result["data"] = _data_info(measured, meas, units, factor, len(model.genes))
    return result


def _default_scales(measured: Measured) -> list[float]:
    sizes = [a for a in measured.available_um if a >= measured.base_um * (1 - 1e-6)]
    ok = [a for a in sizes if abs(a / measured.base_um - round(a / measured.base_um)) < 1e-6]
    return ok or [measured.base_um]


def _truth_block(truth, slide, meas, units, preds, cols, names, top_k, factor) -> dict[str, Any]:
    """The same metrics against the synthetic truth density of every unit."""
    from napari_stmap.core.synthetic import load_synthetic

    sample = load_synthetic(truth)
    values = _truth_values(sample, slide, meas, units, names)
    depth = float(sample.metadata.get("depth", 1.0)) * factor
    block = _skeleton()
    for key in units:
        t = values[key] * depth
        _fill(block, key, _score(preds[key][:, cols], t[:, :-1], t[:, -1], names, top_k))
    return block


def _truth_values(sample, slide, meas, units, names) -> dict[str, np.ndarray]:
    """Truth expected counts (n, G + 1) of every unit, from the 2 µm truth grid."""
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.geometry import MapGrid
    from napari_stmap.core.predict_dense import spot_footprints
    from napari_stmap.core.synthetic import TRUTH_GRID_UM, truth_density

    cell = TRUTH_GRID_UM / float(sample.mpp)
    boxes = [np.array([f.bbox_yx() for f in spot_footprints(meas.spots)])]
    boxes += [
        np.array([f.bbox_yx() for f in spot_footprints(_unit_spots(u))])
        for u in units.values()
        if u.n
    ]
    allb = np.concatenate(boxes)
    y0, x0 = np.floor(allb[:, :2].min(axis=0) / cell) * cell
    y1, x1 = np.ceil(allb[:, 2:].max(axis=0) / cell) * cell
    dens = truth_density(sample, bbox_yx=(y0, x0, y1, x1), genes=names, grid_um=TRUTH_GRID_UM)
    grid = MapGrid((y0, x0), cell, dens.shape[1:])
    base = None
    out = {}
    for key, u in units.items():
        if u.members is not None:
            if base is None:
                base = aggregate(dens, grid, spot_footprints(meas.spots))
            out[key] = np.asarray(u.members @ base)
        else:
            out[key] = aggregate(dens, grid, spot_footprints(_unit_spots(u)))
    return out


def _model_info(model: Any) -> dict[str, Any]:
    meta = getattr(model, "metadata", {}) or {}
    training = meta.get("training", {})
    return {
        "arch": model.arch,
        "encoder": model.config.get("encoder"),
        "input_kind": model.input_kind,
        "mpp": model.mpp,
        "stride": model.stride,
        "n_genes": len(model.genes),
        "epochs": training.get("epochs"),
        "trained_on": [d.get("slide") for d in training.get("data", [])],
        "path": meta.get("path"),
    }


def _data_info(
    measured: Measured, meas: Measured, units: dict, factor: float, n_model: int
) -> dict:
    s = measured.spots
    return {
        "spots": str(measured.path),
        "footprint": s.footprint,
        "measured_um": measured.base_um,
        "available_um": measured.available_um,
        "n_measured": int(s.n_spots),
        "n_genes_evaluated": len(meas.genes),
        "n_genes_missing": int(n_model - len(meas.genes)),
        "depth_factor": factor,
        "units": {
            k: {"footprint": u.footprint, "size_um": u.bin_um, "n": u.n} for k, u in units.items()
        },
    }


def evaluate_model(
    model: Any,
    slide: str | Path | Any,
    spots: str | Path,
    scales_um: Sequence[float] | None = None,
    *,
    slide_mpp: float | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`evaluate_measured` after opening the slide and reading the spots.

    ``model`` may be a path to a ``.safetensors`` model file. ``result["data"]["slide"]``
    records the slide path.
    """
    from .io.slide import Slide, open_slide

    if isinstance(model, (str, Path)):
        from napari_stmap.core.model import load_model

        path = model
        model = load_model(path, device=kw.get("device", "cpu"))
        model.metadata["path"] = str(path)
    sl = slide if isinstance(slide, Slide) else open_slide(slide, mpp=slide_mpp)
    measured = load_measured(spots, scales_um=scales_um, slide=sl)
    result = evaluate_measured(model, sl, measured, scales_um, **kw)
    result["data"]["slide"] = str(sl.path)
    return result


# ------------------------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the per-scale metrics (normalised; absolute and truth PCC@M too)."""
    head = "| scale µm | spots | genes | PCC@F | PCC@S | PCC@M | MSE | MAE | abs PCC@M |"
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    has_truth = "truth" in result
    if has_truth:
        head += " truth PCC@M |"
        rule += "---:|"
    lines = [head, rule]
    for key, m in result["scales"].items():
        row = [
            key,
            m["n_spots"],
            m["n_genes"],
            *(m[k] for k in ("pcc_f", "pcc_s", "pcc_m", "mse", "mae")),
        ]
        row.append(result["absolute"]["scales"][key]["pcc_m"])
        if has_truth:
            row.append(result["truth"]["scales"][key]["pcc_m"])
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
