"""What the Compare dock computes: measured vs predicted at chosen bin sizes.

The metrics are :func:`~napari_stmap.core.evaluate.evaluate_measured`, the function behind
``stmap evaluate`` (same units, depth factor and metrics), scored on the predictions of a
:class:`~napari_stmap.core.predict.PredictionSource` (:func:`run_compare`): a dense model's
store (the network runs once per tile, only for tiles the store does not have yet) or a bin
model (MagNet), predicted at the measured units' centres as the command line does. The PCC
table, the scatter plot and the measured / residual layers all use the same predicted values
(the additive rule over the same base bins). For a dense model the command line predicts with
:func:`~napari_stmap.core.predict.predict_spots` instead; both tile the same seamless map, so
the numbers agree up to the store's float16 embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .evaluate import evaluate_measured
from .io.slide import Slide
from .io.spots import Spots, available_bin_sizes
from .measured import Measured, load_measured
from .metrics import normalize_expression
from .predict import PredictionSource, StoreSource

logger = logging.getLogger(__name__)

__all__ = [
    "EXTRA_SCALES_UM",
    "CompareResult",
    "pcc_table",
    "residual_limits",
    "run_compare",
    "scale_choices",
    "store_predictions",
    "summary_html",
    "unit_spots",
    "unit_values",
]

#: Sizes (µm) offered besides the measured bins' own: sums of bins and Visium-like disks.
EXTRA_SCALES_UM = (32.0, 55.0)
#: Longest wait (s) for the tiles a comparison needs.
COMPARE_TIMEOUT_S = 1800


@dataclass
class CompareResult:
    """What the Compare dock shows: the evaluation JSON and per-unit values per scale.

    Attributes
    ----------
    result
        ``stmap evaluate``'s JSON (``result["scales"][key]``, ``result["genes"][key][gene]``).
    genes
        Measured genes the model predicts (columns of ``predicted`` but the last).
    units
        Scale key (µm, as text) -> :class:`~napari_stmap.core.measured.Units`.
    predicted
        Scale key -> (n, G + 1) predicted counts, the last column the all-transcript total.
    base_spots
        The measured :class:`~napari_stmap.core.io.spots.Spots` the units are made of.
    """

    result: dict
    genes: list[str]
    units: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    base_spots: object = None


def scale_choices(spots: Spots, path: str | Path | None = None) -> list[tuple[float, bool]]:
    """(size µm, checked by default) offered for ``spots``: native, sums of bins, 55 µm disks."""
    if spots.footprint != "square":
        return [(float(spots.bin_um), True)]
    try:
        sizes = [s for s in available_bin_sizes(path or spots.source) if s >= spots.bin_um]
    except Exception:
        sizes = []
    sizes = sorted(set(sizes) | {float(spots.bin_um)} | set(EXTRA_SCALES_UM))
    return [(s, s in (spots.bin_um, 16.0, 32.0)) for s in sizes]


def store_predictions(pred, meas: Measured, units: dict) -> dict:
    """Predicted counts (n, G_model + 1) of every unit from a predictor's store (blocking).

    ``pred`` is a :class:`~napari_stmap.core.predict.Predictor`; missing tiles are predicted
    once. Units made of measured bins (``members``) are sums of the base bins' values. What
    :func:`run_compare` scores for a dense model.
    """
    source = StoreSource(pred, timeout=COMPARE_TIMEOUT_S)
    return source.unit_predictions(meas, units)


def run_compare(
    source: PredictionSource,
    model,
    model_path: str | Path,
    slide: Slide,
    spots_path: str | Path,
    scales_um: Sequence[float],
) -> CompareResult:
    """``stmap evaluate``'s metrics on ``source``'s predictions, plus plot data (blocking).

    ``source`` predicts the measured units (:meth:`~PredictionSource.unit_predictions`: a
    store predicts missing tiles once and reuses the others; a bin model runs at the units'
    centres); ``model`` is the loaded model (genes, metadata), ``model_path`` its file.
    """
    measured = load_measured(spots_path, scales_um=scales_um, slide=slide)
    seen: dict = {}

    def predict(meas, units: dict) -> dict:
        seen["meas"], seen["units"] = meas, units
        seen["preds"] = source.unit_predictions(meas, units)
        return seen["preds"]

    result = evaluate_measured(model, slide, measured, scales_um, predict=predict)
    return _compare_result(result, model, model_path, seen)


def _compare_result(result: dict, model, model_path, seen: dict) -> CompareResult:
    result["model"]["path"] = str(model_path)
    meas, units = seen["meas"], seen["units"]
    names = list(meas.genes)
    cols = [model.genes.index(g) for g in names] + [model.num_outputs - 1]
    predicted = {k: v[:, cols] for k, v in seen["preds"].items()}
    return CompareResult(result, names, units, predicted, meas.spots)


def unit_values(res: CompareResult, key: str, gene: str) -> tuple[np.ndarray, np.ndarray]:
    """(measured, predicted) normalised expression ``log1p(1e4·g/total)`` of ``gene``, (n,)."""
    u, p = res.units[key], res.predicted[key]
    g = res.genes.index(gene)
    measured = normalize_expression(u.counts[:, [g]], u.total)[:, 0]
    predicted = normalize_expression(p[:, [g]], p[:, -1])[:, 0]
    return measured, predicted


def unit_spots(res: CompareResult, key: str, mpp: float) -> Spots:
    """A :class:`~napari_stmap.core.io.spots.Spots` of the units of one scale (for layers).

    ``mpp``: µm per level-0 px of the slide.
    """
    u, base = res.units[key], res.base_spots
    if u.members is None:
        return base
    n = u.n
    return Spots(
        centers_yx=u.centers_yx,
        footprint=u.footprint,
        size_px=u.size_px,
        size_um=u.bin_um,
        mpp=mpp,
        counts=u.counts,
        genes=np.asarray(res.genes),
        gene_ids=np.asarray(res.genes),
        barcodes=np.array([f"u{k}" for k in range(n)]),
        bin_um=u.bin_um,
        pitch_um=None,
        in_tissue=np.ones(n, bool),
        array_rc=None,
        library_id=base.library_id,
        source=base.source,
    )


def residual_limits(measured: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Symmetric colour limits of ``predicted − measured``: ± its 99th |percentile| (> 0)."""
    diff = np.asarray(predicted, dtype=float) - np.asarray(measured, dtype=float)
    hi = float(np.nanpercentile(np.abs(diff), 99)) if np.isfinite(diff).any() else 1.0
    hi = max(hi, 1e-6)
    return -hi, hi


def pcc_table(result: dict) -> tuple[list[str], list[str], np.ndarray]:
    """Per-gene PCC of an evaluation: ``(scale keys, genes, (genes, scales) PCC, NaN if None)``.

    Genes are those of the first scale, in its order.
    """
    keys = list(result["scales"])
    genes = list(result["genes"][keys[0]]) if keys else []
    values = np.full((len(genes), len(keys)), np.nan)
    for j, k in enumerate(keys):
        per_gene = result["genes"][k]
        for i, g in enumerate(genes):
            r = per_gene.get(g)
            values[i, j] = np.nan if r is None else r
    return keys, genes, values


def summary_html(result: dict) -> str:
    """PCC@F/S/M and spots per scale of an evaluation, as a rich-text (HTML) table."""
    lines = ["<table><tr><th>µm</th><th>n</th><th>PCC@F</th><th>PCC@S</th><th>PCC@M</th></tr>"]
    for k, m in result["scales"].items():
        f = [("nan" if m[x] is None else f"{m[x]:.3f}") for x in ("pcc_f", "pcc_s", "pcc_m")]
        cells = "".join(f"<td>{v}</td>" for v in (k, m["n_spots"], *f))
        lines.append(f"<tr>{cells}</tr>")
    lines.append(
        "</table><small>normalised log1p(1e4·g/total); <tt>stmap evaluate</tt>'s metrics on "
        "the viewer's predictions</small>"
    )
    return "".join(lines)
