"""PCC per gene, PCC@F/S/M summaries and the normalised/absolute evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from napari_stmap.core.aggregate import sum_bins
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.metrics import (
    evaluate_expression,
    normalize_expression,
    pearson_per_gene,
    summarize,
)


def test_pearson_matches_scipy_and_flags_constant_genes() -> None:
    rng = np.random.default_rng(0)
    true = rng.gamma(1.0, 2.0, (80, 6))
    pred = true + rng.normal(0, 1.5, true.shape)
    true[:, 4] = 3.7  # constant measured gene
    pred[:, 5] = 1e-3  # constant prediction (with a value whose mean is not exact in floats)
    r = pearson_per_gene(pred, true)
    assert r.shape == (6,)
    for g in range(4):
        assert r[g] == pytest.approx(stats.pearsonr(pred[:, g], true[:, g])[0], abs=1e-12)
    assert np.isnan(r[4]) and np.isnan(r[5])
    np.testing.assert_allclose(pearson_per_gene(sp.csr_matrix(pred), true), r, equal_nan=True)


def test_pearson_leaves_out_nan_spots_per_gene() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=(50, 2))
    pred = true + rng.normal(size=(50, 2))
    pred[3, 0] = np.nan
    r = pearson_per_gene(pred, true)
    keep = np.arange(50) != 3
    assert r[0] == pytest.approx(stats.pearsonr(pred[keep, 0], true[keep, 0])[0], abs=1e-12)
    assert r[1] == pytest.approx(stats.pearsonr(pred[:, 1], true[:, 1])[0], abs=1e-12)
    assert np.isnan(pearson_per_gene(pred[:1], true[:1])).all()  # one spot: undefined
    with pytest.raises(StmapInputError):
        pearson_per_gene(pred, true[:, :1])


def test_summarize_quartiles_and_nan_count() -> None:
    r = np.array([0.1, np.nan, 0.5, 0.3, -0.2, np.nan, 0.9])
    s = summarize(r)
    valid = r[np.isfinite(r)]
    assert s["pcc_f"] == pytest.approx(np.percentile(valid, 25))
    assert s["pcc_s"] == pytest.approx(np.percentile(valid, 50))
    assert s["pcc_m"] == pytest.approx(valid.mean())
    assert (s["n_genes"], s["n_nan"]) == (7, 2)
    empty = summarize(np.array([np.nan, np.nan]))
    assert np.isnan(empty["pcc_m"]) and empty["n_nan"] == 2


def make_counts(n=120, g=8, seed=2):
    rng = np.random.default_rng(seed)
    scale = np.geomspace(20, 0.2, g)
    true = rng.poisson(scale * rng.gamma(3, 1 / 3, (n, 1)), (n, g)).astype(float)
    total = true.sum(1) * 1.5 + 5
    return true, total, [f"gene{i}" for i in range(g)]


def test_evaluate_perfect_prediction() -> None:
    true, total, genes = make_counts()
    pred = np.column_stack([true, total])
    res = evaluate_expression(pred, sp.csr_matrix(true), total, genes=genes)
    for view in ("normalised", "absolute"):
        block = res[view]
        assert block["pcc_m"] == pytest.approx(1.0) and block["pcc_f"] == pytest.approx(1.0)
        assert block["mse"] == pytest.approx(0.0, abs=1e-20) and block["mae"] == 0.0
        assert block["n_spots"] == 120 and block["n_genes"] == 8 and block["n_nan"] == 0
        assert set(block["per_gene"]) == set(genes)


def test_evaluate_normalised_uses_each_side_total_and_skips_empty_spots() -> None:
    true, total, genes = make_counts()
    rng = np.random.default_rng(3)
    pred_genes = true * rng.uniform(0.5, 2.0, true.shape) + 0.1
    pred_total = total * 3.0  # a different depth: normalised values use the model's own total
    total = total.copy()
    total[7] = 0.0  # a spot without transcripts is left out of the normalised view only
    res = evaluate_expression(np.column_stack([pred_genes, pred_total]), true, total, genes=genes)
    keep = np.arange(120) != 7
    nt = np.log1p(1e4 * true[keep] / total[keep, None])
    npred = np.log1p(1e4 * pred_genes[keep] / pred_total[keep, None])
    norm = res["normalised"]
    assert norm["n_spots"] == 119 and res["absolute"]["n_spots"] == 120
    assert norm["mse"] == pytest.approx(np.mean((npred - nt) ** 2))
    assert norm["mae"] == pytest.approx(np.mean(np.abs(npred - nt)))
    r0 = stats.pearsonr(npred[:, 0], nt[:, 0])[0]
    assert norm["per_gene"]["gene0"] == pytest.approx(r0, abs=1e-12)
    ra = stats.pearsonr(pred_genes[:, 2], true[:, 2])[0]
    assert res["absolute"]["per_gene"]["gene2"] == pytest.approx(ra, abs=1e-12)
    assert res["absolute"]["mse"] == pytest.approx(np.mean((pred_genes - true) ** 2))


def test_evaluate_top_k_and_gene_list_and_constant_genes() -> None:
    true, total, genes = make_counts()
    true[:, 1] = 50.0  # highest mean but constant -> NaN, counted
    pred = np.column_stack([true + 1.0, total])
    res = evaluate_expression(pred, true, total, genes=genes, top_k=3)
    top = res["absolute"]["per_gene"]
    assert list(top) == ["gene0", "gene1", "gene2"]
    assert np.isnan(top["gene1"]) and res["absolute"]["n_nan"] == 1
    assert res["absolute"]["pcc_m"] == pytest.approx(1.0)
    chosen = evaluate_expression(pred, true, total, genes=genes, gene_list=["gene7", "gene3"])
    assert list(chosen["normalised"]["per_gene"]) == ["gene7", "gene3"]
    with pytest.raises(StmapInputError, match="not among"):
        evaluate_expression(pred, true, total, genes=genes, gene_list=["nope"])
    with pytest.raises(StmapInputError, match="total last"):
        evaluate_expression(true, true, total, genes=genes)


def test_normalised_metric_of_summed_bins_uses_summed_total() -> None:
    """Evaluation at 8 µm from 2 µm bins: normalise AFTER summing genes and total."""
    rng = np.random.default_rng(4)
    n, g, bin_px = 16, 5, 7.6
    iy, ix = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    centers = (np.stack([iy.ravel(), ix.ravel()], 1) + 0.5) * bin_px
    true = rng.poisson(0.5, (n * n, g)).astype(float)
    total = true.sum(1) + rng.poisson(2.0, n * n)
    pred = np.column_stack([true + rng.uniform(0, 1, true.shape), total + 1.0])
    _, t8, _ = sum_bins(
        np.column_stack([true, total]), centers, bin_px=bin_px, target_px=4 * bin_px
    )
    _, p8, _ = sum_bins(pred, centers, bin_px=bin_px, target_px=4 * bin_px)
    res = evaluate_expression(p8, t8[:, :g], t8[:, g], genes=list("abcde"))
    nt = normalize_expression(t8[:, :g], t8[:, g])
    np.testing.assert_allclose(nt, np.log1p(1e4 * t8[:, :g] / t8[:, g : g + 1]))
    npred = normalize_expression(p8[:, :g], p8[:, g])
    assert res["normalised"]["mse"] == pytest.approx(np.mean((npred - nt) ** 2))
