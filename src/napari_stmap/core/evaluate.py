"""Evaluation harness: measured spots/bins at chosen scales vs any model's predictions.

One code path measures every architecture (``model.input_kind`` "dense" or "spot"), so PixNet
and the SpotNet baseline are compared on the same units, genes and normalisation.

The units of every scale (spots, bins, full blocks of bins, Visium-like disks built from bins)
and the depth statistic come from :mod:`napari_stmap.core.measured`
(:func:`~napari_stmap.core.measured.load_measured`,
:meth:`~napari_stmap.core.measured.Measured.units`), as in training.

Values and normalisation
------------------------
Dense models are summed over exactly the same base bins as the measurement (their map is
additive, so this equals predicting the coarse footprint directly). Spot models predict each
unit's footprint from one crop, scaled by area (see
:func:`~napari_stmap.core.predict.spots.predict_spots`). Headline metrics use
``log1p(1e4 · gene / total)`` per unit, computed after summing, measured total = all
transcripts of the unit (all genes of the matrix), predicted total = the model's total channel
(:func:`~napari_stmap.core.metrics.evaluate_expression`). Absolute figures compare predicted
counts (at the model's reference depth) with measured counts scaled to that depth by the test
slide's own depth factor (see :func:`~napari_stmap.core.measured.depth_factors`); they are
reported under ``"absolute"``.

Scoring from a prediction store
-------------------------------
:func:`evaluate_store` scores a dense model's units from its prediction store (``stmap
evaluate --pred``) through :meth:`~napari_stmap.core.predict.StoreSource.unit_predictions`,
the path the Compare dock takes (:func:`~napari_stmap.core.compare.store_predictions`): the
network runs only for tiles the store lacks, and writes them into it. The metrics equal those
of :func:`evaluate_measured` up to the store's float16 embeddings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .aggregate import aggregate
from .errors import StmapInputError
from .geometry import MapGrid
from .io.slide import Slide, open_slide
from .measured import Measured, Units, load_measured, scale_key, spot_density
from .metrics import evaluate_expression
from .predict import Predictor, StoreSource, predict_units, spot_footprints, unit_spots
from .predict.device import resolve_precision
from .store import model_hash, read_store_meta, slide_identity, store_path_for
from .synthetic import TRUTH_GRID_UM, load_synthetic, truth_density

__all__ = [
    "METRIC_KEYS",
    "evaluate_measured",
    "evaluate_model",
    "evaluate_store",
    "format_table",
    "store_for_evaluation",
]

logger = logging.getLogger(__name__)

#: Keys of every per-scale entry of the evaluation JSON.
METRIC_KEYS = ("pcc_f", "pcc_s", "pcc_m", "mse", "mae", "n_spots", "n_genes")


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
    precision: str = "auto",
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
        From :func:`~napari_stmap.core.measured.load_measured` (gene columns are matched to
        the model's by name).
    scales_um : sequence of float, optional
        Default: the measured size (HD: every available size that can be built).
    truth : path, optional
        Synthetic sample root: also evaluate against its truth density (key ``"truth"``).
    top_k : int, optional
        Evaluate only the ``top_k`` model genes with the highest mean measured count.
    device, tile_px, batch_size, tta, precision
        Passed to :func:`~napari_stmap.core.predict.spots.predict_spots` (``tta``: average
        over the 8 turns and flips of every tile or crop; ``precision``: autocast dtype of
        dense models, ``"auto"`` resolved for the device, recorded in ``result["model"]``).
    predict : callable, optional
        ``predict(measured, units) -> {key: (n, G_model + 1) counts}``: predictions of the
        units to score instead of running the model (e.g. from the viewer's prediction store,
        so the network does not run twice; any
        :meth:`~napari_stmap.core.predict.source.PredictionSource.unit_predictions` fits);
        ``model`` then only gives genes and metadata.
    progress : callable, optional
        ``progress(done, total)`` in spots while the model predicts (see
        :func:`~napari_stmap.core.predict.units.predict_units`); not called when ``predict``
        is given.

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
    kw["precision"] = _precision(model, device, precision)
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
    result["model"] = {**_model_info(model), "tta": bool(tta), "precision": kw["precision"]}
    result["data"] = _data_info(measured, meas, units, factor, len(model.genes))
    return result


def _precision(model: Any, device: Any, precision: str) -> str:
    """The precision a model runs at here: ``precision`` resolved for dense models, else fp32."""
    if getattr(model, "input_kind", "dense") != "dense":
        return "fp32"
    return resolve_precision(device, model, precision)


def _default_scales(measured: Measured) -> list[float]:
    sizes = [a for a in measured.available_um if a >= measured.base_um * (1 - 1e-6)]
    ok = [a for a in sizes if abs(a / measured.base_um - round(a / measured.base_um)) < 1e-6]
    return ok or [measured.base_um]


def _truth_block(truth, slide, meas, units, preds, cols, names, top_k, factor) -> dict[str, Any]:
    """The same metrics against the synthetic truth density of every unit."""
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
    cell = TRUTH_GRID_UM / float(sample.mpp)
    boxes = [np.array([f.bbox_yx() for f in spot_footprints(meas.spots)])]
    boxes += [
        np.array([f.bbox_yx() for f in spot_footprints(unit_spots(u))])
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
            out[key] = aggregate(dens, grid, spot_footprints(unit_spots(u)))
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
    store: str | Path | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`evaluate_measured` after opening the slide and reading the spots.

    ``model`` may be a path to a ``.safetensors`` model file. ``result["data"]["slide"]``
    records the slide path. With ``store`` (a prediction store, or a folder of them, see
    :func:`store_for_evaluation`) the units are scored from the store instead
    (:func:`evaluate_store`; ``tta`` is refused there); ``result["data"]["store"]`` records it.
    """
    if store is not None and kw.get("tta"):
        msg = (
            f"--tta cannot use the prediction store {store}: a store holds single-pass "
            "embeddings (one per tile, no turns or flips); drop --tta to score the store, "
            "or --pred to evaluate with TTA"
        )
        raise StmapInputError(msg)
    model_path = None
    if isinstance(model, (str, Path)):
        from .model import load_model  # torch: only when a model file is given

        model_path = Path(model)
        model = load_model(model_path, device=kw.get("device", "cpu"))
        model.metadata["path"] = str(model_path)
    sl = slide if isinstance(slide, Slide) else open_slide(slide, mpp=slide_mpp)
    if store is not None:  # refuse a foreign store before reading the spots
        store = store_for_evaluation(store, model, sl, model_path=model_path)
    measured = load_measured(spots, scales_um=scales_um, slide=sl)
    if store is None:
        result = evaluate_measured(model, sl, measured, scales_um, **kw)
    else:
        kw.pop("tta", None)
        result = evaluate_store(model, sl, measured, store, scales_um, model_path=model_path, **kw)
    result["data"]["slide"] = str(sl.path)
    return result


# -------------------------------------------------------------------------- from a store
def store_for_evaluation(
    store: str | Path, model: Any, slide: Slide, *, model_path: str | Path | None = None
) -> Path:
    """The prediction store to score ``model`` on ``slide`` from, checked; nothing is written.

    Parameters
    ----------
    store : str or Path
        A store folder (``*.zarr``; it may not exist yet: :func:`evaluate_store` creates it),
        or an existing folder of stores named as the viewer names them
        (:func:`~napari_stmap.core.store.store_path_for`; needs the model file).
    model : StmapModel
        A dense model (the store must hold its embeddings: same tensors, genes, µm/px).
    slide : Slide
        The slide (the store must be of the same file content, level-0 shape and µm/px).
    model_path : path, optional
        The model file (default ``model.metadata["path"]``): names it in messages, and a
        store in a folder of stores.

    Returns
    -------
    Path
        The store folder.

    Raises
    ------
    StmapInputError
        A model that is not dense; a folder of stores without the model file; a store made
        by another model or on another slide (one line naming both and the fix).
    """
    model_path = model_path or (getattr(model, "metadata", {}) or {}).get("path")
    kind = getattr(model, "input_kind", "dense")
    if kind != "dense":
        msg = (
            f"{model_path or model.arch}: a {kind} model ({model.arch}) has no dense map to "
            f"store; evaluate it without a prediction store (drop --pred {store})"
        )
        raise StmapInputError(msg)
    path = Path(store)
    if path.is_dir() and path.suffix != ".zarr" and read_store_meta(path) is None:
        if model_path is None:
            msg = f"{path} is a folder of stores: pass the model file to find its store in it"
            raise StmapInputError(msg)
        path = store_path_for(slide.path, model_path, path)
    meta = read_store_meta(path)
    if meta is not None:
        _check_store_identity(path, meta, model, slide, model_path)
    return path


def _check_store_identity(path: Path, meta: dict, model: Any, slide: Slide, model_path) -> None:
    """Refuse a store whose model hash or slide identity differs, naming both."""
    old_m, old_s = meta["model"], meta["slide"]
    sha, ident = model_hash(model), slide_identity(slide)
    keys = ("size_bytes", "shape_yx", "sha256_ends")
    same_slide = all(old_s.get(k) == ident[k] for k in keys) and math.isclose(
        old_s["mpp"], ident["mpp"]
    )
    wrong = []
    if old_m["sha256"] != sha:
        wrong.append(
            f"of model {old_m.get('path') or '(file not recorded)'} (sha256 "
            f"{old_m['sha256'][:12]}), not of {model_path or 'this model'} (sha256 {sha[:12]})"
        )
    if not same_slide:
        wrong.append(
            f"on slide {old_s['path']} ({old_s['shape_yx'][0]} x {old_s['shape_yx'][1]} px, "
            f"{old_s['mpp']:g} µm/px), not on {ident['path']} ({ident['shape_yx'][0]} x "
            f"{ident['shape_yx'][1]} px, {ident['mpp']:g} µm/px)"
        )
    if wrong:
        msg = (
            f"{path} holds predictions {'; '.join(wrong)}: pass the store made with this "
            "model and slide, or a new store path"
        )
        raise StmapInputError(msg)


def evaluate_store(
    model: Any,
    slide: Slide,
    measured: Measured,
    store: str | Path,
    scales_um: Sequence[float] | None = None,
    *,
    model_path: str | Path | None = None,
    truth: str | Path | None = None,
    top_k: int | None = None,
    device: Any = "cpu",
    tile_px: int | None = None,
    batch_size: int = 4,
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_measured` scored on a prediction store's predictions of the units.

    The store is opened by a :class:`~napari_stmap.core.predict.Predictor` (which refuses a
    store of another model or slide; :func:`store_for_evaluation` refuses it with a message
    naming both, and finds a store in a folder of stores), which predicts the tiles the
    units touch and the store lacks (every such tile, on tissue or not, as
    :func:`evaluate_measured` does) and writes them into it; a store that does not exist yet
    is created (recording ``model_path``). Units are summed from the store by
    :meth:`~napari_stmap.core.predict.StoreSource.unit_predictions`, as the Compare dock does.

    Parameters
    ----------
    model, slide, measured, scales_um, truth, top_k
        As :func:`evaluate_measured` (``model`` a dense model).
    store : str or Path
        The store folder (``*.zarr``).
    model_path : path, optional
        The model file (default ``model.metadata["path"]``).
    device, batch_size, precision
        Where, how many tiles per pass and at which autocast dtype the network runs for
        missing tiles (``precision`` ``"auto"``: resolved for the device).
    tile_px : int, optional
        Tile core side of a new store, model px (default: an existing store's, else
        :func:`~napari_stmap.core.tiling.default_tile_px`).
    progress : callable, optional
        ``progress(done, total)`` in spatial blocks of units (each block's missing tiles are
        predicted before it is summed).

    Returns
    -------
    dict
        As :func:`evaluate_measured`, with ``result["data"]["store"]`` the store's path.

    Raises
    ------
    StmapInputError
        A store of another model or slide, or with another ``tile_px``; units on tiles the
        store skipped as off tissue (their counts are unknown).
    """
    model_path = model_path or (getattr(model, "metadata", {}) or {}).get("path")
    path = Path(store)
    new = read_store_meta(path) is None
    net = model_path if new and model_path else model  # a new store records the model file
    with Predictor(
        slide,
        net,
        path,
        device=device,
        batch_size=batch_size,
        tile_px=tile_px,
        tissue=False,
        precision=precision,
    ) as pred:

        def predict(meas: Measured, units: dict[str, Units]) -> dict[str, np.ndarray]:
            preds = StoreSource(pred).unit_predictions(meas, units, progress=progress)
            _check_known(path, preds)
            return preds

        result = evaluate_measured(
            model, slide, measured, scales_um, truth=truth, top_k=top_k, predict=predict
        )
        result["model"]["precision"] = pred.precision
    result["data"]["store"] = str(path)
    return result


def _check_known(path: Path, preds: dict[str, np.ndarray]) -> None:
    """Refuse units with NaN counts (on tiles the store skipped as off tissue)."""
    for key, p in preds.items():
        bad = int((~np.isfinite(p)).any(axis=1).sum()) if p.size else 0
        if bad:
            msg = (
                f"{path}: {bad} of {len(p)} units at {key} µm lie on tiles the store skipped as "
                "off tissue; evaluate without the store, or delete it to predict them"
            )
            raise StmapInputError(msg)


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
