"""Evaluation metrics for predicted spatial expression.

The field's protocol (see ``DESIGN.md``): per gene, Pearson r across held-out spots on
normalised expression ``log1p(1e4 · gene / total)``; report PCC@F / PCC@S / PCC@M = first
quartile / median / mean over genes (top 250 genes by mean measured counts unless a list is
given), plus MSE and MAE. Genes with zero variance get r = NaN and are counted (``n_nan``), never
silently dropped. Absolute (raw count) metrics are reported next to them, never as the headline.
:func:`normalize_expression` is that normalisation, for everyone (metrics, losses, the viewer).

Axis order: (n spots, G genes). Predictions carry one extra last column, the "total" channel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from napari_stmap.core.errors import StmapInputError

__all__ = ["evaluate_expression", "normalize_expression", "pearson_per_gene", "summarize"]

logger = logging.getLogger(__name__)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def normalize_expression(
    genes: np.ndarray | sp.spmatrix | sp.sparray, total: np.ndarray, *, scale: float = 1e4
) -> np.ndarray:
    """Library-size normalisation: ``log1p(scale · gene / total)`` per spot.

    Parameters
    ----------
    genes
        (n, G) counts (dense or sparse; the result is dense, so select genes first).
    total
        (n,) total counts of each spot (all transcripts, or the model's "total" channel).
    scale
        Target library size (1e4, as in scanpy ``normalize_total`` + ``log1p``).

    Returns
    -------
    numpy.ndarray
        (n, G) float64. Rows whose total is <= 0 or not finite are all NaN (a spot without
        transcripts has no defined composition): filter them with ``np.isfinite(out).all(1)``.

    Notes
    -----
    Apply it **after** summing regions, to summed genes and summed total, so that the
    normalised value of a region is the same whatever bins it was built from.
    """
    dense = genes.toarray() if sp.issparse(genes) else np.asarray(genes)
    dense = np.asarray(dense, dtype=np.float64)
    tot = np.asarray(total, dtype=np.float64).reshape(-1)
    if dense.ndim != 2 or tot.shape[0] != dense.shape[0]:
        msg = f"genes {dense.shape} and total {tot.shape} do not match: pass (n, G) and (n,)."
        raise StmapInputError(msg)
    good = np.isfinite(tot) & (tot > 0)
    safe = np.where(good, tot, 1.0)
    out = np.log1p(scale * dense / safe[:, None])
    out[~good] = np.nan
    if not good.all():
        logger.debug("normalize_expression: %d spots with total <= 0 set to NaN", (~good).sum())
    return out


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r between predicted and measured values, per gene (column).

    Parameters
    ----------
    pred, true
        (n, G) arrays (sparse accepted), spots × genes.

    Returns
    -------
    numpy.ndarray
        (G,) float64 r in [-1, 1]. NaN where the gene is constant in ``pred`` or in ``true``
        (zero variance) or has fewer than 2 spots. Spots where either value is NaN/inf are
        left out for that gene only.
    """
    p, t = _dense(pred), _dense(true)
    if p.shape != t.shape or p.ndim != 2:
        msg = f"pred {p.shape} and true {t.shape} differ: pass two (n_spots, n_genes) arrays."
        raise StmapInputError(msg)
    ok = np.isfinite(p) & np.isfinite(t)
    count = ok.sum(axis=0)
    p, t = np.where(ok, p, 0.0), np.where(ok, t, 0.0)
    safe = np.maximum(count, 1)
    dp = np.where(ok, p - p.sum(axis=0) / safe, 0.0)
    dt = np.where(ok, t - t.sum(axis=0) / safe, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dp * dt).sum(axis=0) / np.sqrt((dp * dp).sum(axis=0) * (dt * dt).sum(axis=0))
    constant = _is_constant(p, ok) | _is_constant(t, ok) | (count < 2)
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def _is_constant(x: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Exact test (max == min over valid spots), immune to round-off in the variance."""
    hi = np.where(ok, x, -np.inf).max(axis=0, initial=-np.inf)
    lo = np.where(ok, x, np.inf).min(axis=0, initial=np.inf)
    return hi <= lo


def summarize(r: np.ndarray) -> dict[str, float | int]:
    """PCC@F / PCC@S / PCC@M over genes.

    Parameters
    ----------
    r
        (G,) per-gene Pearson r, NaN for genes without a defined r.

    Returns
    -------
    dict
        ``pcc_f`` first quartile, ``pcc_s`` median (``numpy.percentile`` 25 / 50, linear
        interpolation), ``pcc_m`` mean, all over the non-NaN genes (NaN when there are none);
        ``n_genes`` (all genes, NaN ones included) and ``n_nan``.
    """
    r = np.asarray(r, dtype=np.float64).ravel()
    valid = r[np.isfinite(r)]
    if valid.size == 0:
        q1 = med = mean = float("nan")
    else:
        q1, med = (float(v) for v in np.percentile(valid, [25, 50]))
        mean = float(valid.mean())
    return {
        "pcc_f": q1,
        "pcc_s": med,
        "pcc_m": mean,
        "n_genes": int(r.size),
        "n_nan": int(r.size - valid.size),
    }


def _select_genes(
    true: np.ndarray | sp.spmatrix, genes: Sequence[str], top_k: int, gene_list
) -> np.ndarray:
    """Column indices: the given genes in their order, or top-k by mean measured counts."""
    if gene_list is not None:
        where = {g: i for i, g in enumerate(genes)}
        missing = [g for g in gene_list if g not in where]
        if missing:
            msg = f"genes {missing[:5]} are not among the {len(genes)} genes: pass names from `genes`."
            raise StmapInputError(msg)
        return np.array([where[g] for g in gene_list], dtype=np.int64)
    mean = np.asarray(true.mean(axis=0)).ravel()
    order = np.argsort(-mean, kind="stable")  # ties keep gene order
    return np.sort(order[: max(1, int(top_k))])


def _block(pred: np.ndarray, true: np.ndarray, names: list[str]) -> dict:
    """Metrics of one view (normalised or absolute) on spots valid in both."""
    rows = np.isfinite(pred).all(axis=1) & np.isfinite(true).all(axis=1)
    p, t = pred[rows], true[rows]
    r = pearson_per_gene(p, t)
    diff = p - t
    out = summarize(r)
    out["mse"] = float(np.mean(diff**2)) if diff.size else float("nan")
    out["mae"] = float(np.mean(np.abs(diff))) if diff.size else float("nan")
    out["n_spots"] = int(rows.sum())
    out["per_gene"] = {name: float(v) for name, v in zip(names, r, strict=True)}
    return out


def evaluate_expression(
    pred_counts: np.ndarray,
    true_counts: np.ndarray | sp.spmatrix,
    true_total: np.ndarray,
    *,
    genes: Sequence[str],
    top_k: int = 250,
    gene_list: Sequence[str] | None = None,
    scale: float = 1e4,
) -> dict[str, dict]:
    """Compare predicted with measured expression of the same spots.

    Parameters
    ----------
    pred_counts
        (n, G + 1) predicted counts per spot (region sums of the map); last column = total.
    true_counts
        (n, G) measured counts, dense or sparse, columns in ``genes`` order.
    true_total
        (n,) measured total counts per spot (all transcripts, not only the G genes).
    genes
        The G gene names.
    top_k
        Evaluate the ``top_k`` genes with the highest mean measured count (kept in gene
        order); ignored when ``gene_list`` is given.
    gene_list
        Explicit genes to evaluate, in this order.
    scale
        Library size of the normalisation (1e4).

    Returns
    -------
    dict
        ``"normalised"``: metrics on ``log1p(scale · gene / total)`` (measured total for the
        measured values, the predicted total channel for predictions); spots whose total is
        <= 0 on either side are left out. ``"absolute"``: the same on raw counts. Each holds
        ``pcc_f, pcc_s, pcc_m, mse, mae, n_spots, n_genes, n_nan, per_gene {name: r}``; MSE
        and MAE are means over spots and genes of that view's values.
    """
    pred = _dense(pred_counts)
    n, g = pred.shape[0], len(genes)
    if pred.ndim != 2 or pred.shape[1] != g + 1 or true_counts.shape != (n, g):
        msg = f"pred {pred.shape}, true {true_counts.shape}, {g} genes do not fit: pass (n, G+1) with total last, (n, G), G names."
        raise StmapInputError(msg)
    cols = _select_genes(true_counts, genes, top_k, gene_list)
    names = [str(genes[i]) for i in cols]
    true_sel = _dense(
        true_counts[:, cols] if sp.issparse(true_counts) else np.asarray(true_counts)[:, cols]
    )
    pred_sel = pred[:, cols]
    norm_true = normalize_expression(true_sel, true_total, scale=scale)
    norm_pred = normalize_expression(pred_sel, pred[:, -1], scale=scale)
    result = {
        "normalised": _block(norm_pred, norm_true, names),
        "absolute": _block(pred_sel, true_sel, names),
    }
    logger.info(
        "evaluated %d spots, %d genes: normalised PCC@M %.3f (%d NaN genes)",
        result["normalised"]["n_spots"],
        len(names),
        result["normalised"]["pcc_m"],
        result["normalised"]["n_nan"],
    )
    return result
