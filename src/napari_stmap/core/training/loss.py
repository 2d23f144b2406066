"""The training loss, always on **spot sums** normalised after summing.

A dense model's map is summed over each measured footprint inside a tile (exact fractional
weights, :func:`~napari_stmap.core.geometry.weight_matrix` →
:func:`~napari_stmap.core.aggregate.aggregate_torch`); a spot model predicts one vector per
crop. :func:`expression_loss` compares the two, normalised as ``log1p(1e4 · gene / total)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["expression_loss", "pearson_columns"]


def expression_loss(
    pred: Any,
    meas: Any,
    *,
    mse_weight: float = 1.0,
    pcc_weight: float = 0.5,
    total_weight: float = 0.1,
    gene_std: Any = None,
    eps: float = 1e-6,
) -> tuple[Any, dict[str, float]]:
    """Loss on normalised spot sums.

    Predicted and measured sums are normalised the same way, after summing::

        norm = log1p(1e4 · gene / total)     (total = all transcripts of the spot)
        loss = mse_weight · MSE(norm_pred, norm_meas) + pcc_weight · (1 − mean_g PCC_g)
               + total_weight · MSE(log1p totals)

    PCC_g is Pearson r of gene g across the spots of the batch (genes constant in the batch
    are left out, :func:`pearson_columns`).

    Parameters
    ----------
    pred, meas : torch.Tensor
        (N, G + 1) predicted and measured counts per spot, total last. Measured totals must
        be > 0.
    mse_weight, pcc_weight, total_weight : float
        Weights of the three terms.
    gene_std : torch.Tensor, optional
        (G,) per-gene std of the normalised training expression
        (:func:`~napari_stmap.core.training.data.target_stats`, floored at 0.05): the MSE
        term is then taken on z-scores, ``mean(((norm_pred − μ) / σ − (norm_meas − μ) / σ)²)``
        (μ cancels), so every gene weighs the same instead of the few genes with the largest
        spread dominating. The model still predicts counts; only the loss changes. With
        several scales (Visium HD) σ is taken per scale, so a batch of sparse 2 µm bins
        (σ several times that of 16 µm bins) does not outweigh the coarser batches.
    eps : float
        Guards the divisions.

    Returns
    -------
    loss, parts
        Scalar tensor and the float values of its ``mse``, ``pcc`` (mean r) and ``total`` terms.
    """
    import torch

    pg, pt = pred[:, :-1], pred[:, -1:]
    mg, mt = meas[:, :-1], meas[:, -1:]
    pn = torch.log1p(1e4 * pg / (pt + eps))
    mn = torch.log1p(1e4 * mg / mt.clamp_min(eps))
    diff = pn - mn if gene_std is None else (pn - mn) / gene_std
    mse = torch.mean(diff**2)
    r = pearson_columns(pn, mn, eps)
    tot = torch.mean((torch.log1p(pt) - torch.log1p(mt)) ** 2)
    loss = mse_weight * mse + pcc_weight * (1 - r) + total_weight * tot
    return loss, {
        "mse": float(mse.detach()),
        "pcc": float(r.detach()),
        "total": float(tot.detach()),
    }


def pearson_columns(p: Any, t: Any, eps: float = 1e-6) -> Any:
    """Mean over columns of Pearson r across rows; columns constant in ``t`` are left out."""
    import torch

    if p.shape[0] < 2:
        return p.new_zeros(())
    dp, dt = p - p.mean(dim=0), t - t.mean(dim=0)
    vt = (dt * dt).sum(dim=0)
    ok = vt > 1e-12
    if not bool(ok.any()):
        return p.new_zeros(())
    r = (dp * dt).sum(dim=0) / torch.sqrt((dp * dp).sum(dim=0) * vt + eps)
    return r[ok].mean()
