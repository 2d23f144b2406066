"""Heads shared by the architectures: embedding -> non-negative expected counts, and pooling.

- :class:`PointwiseHead` (dense maps, PixNet): 1×1 conv + softplus per output pixel.
- :class:`LinearHead` (one vector per spot or bin, SpotNet and MagNet): linear + softplus.
- :class:`GlobalPool`: mean over (H, W) of the deepest encoder features -> one vector per crop.

Both heads can start at a prior (``init_counts``: bias softplus⁻¹(prior), weights near zero)
and give their rows as numpy (``rows``), so a viewer can apply one gene without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["GlobalPool", "LinearHead", "PointwiseHead"]

Prior = float | Sequence[float] | None


class PointwiseHead(nn.Module):
    """1×1 conv + softplus: (B, D, h, w) -> (B, G + 1, h, w) non-negative expected counts.

    Parameters
    ----------
    in_ch : int
        D, embedding channels.
    out_ch : int
        G + 1.
    init_counts : float or sequence of float, optional
        Prior mean counts per output pixel (one value or one per channel): the bias starts at
        softplus⁻¹(prior) and the weights near zero, so the first outputs ≈ the prior.
    """

    def __init__(self, in_ch: int, out_ch: int, init_counts: Prior = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.act = nn.Softplus()
        _init_prior(self.conv, init_counts)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(e))

    def rows(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Weights (k, D) and biases (k,) of output channels ``indices``, float32 numpy."""
        return _rows(self.conv.weight[:, :, 0, 0], self.conv.bias, indices)


class LinearHead(nn.Module):
    """Linear + softplus: (N, D) -> (N, G + 1) non-negative expected counts.

    Parameters
    ----------
    in_features : int
        D, embedding width.
    out_features : int
        G + 1.
    init_counts : float or sequence of float, optional
        Prior mean counts per spot or bin, as for :class:`PointwiseHead`.
    """

    def __init__(self, in_features: int, out_features: int, init_counts: Prior = None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.act = nn.Softplus()
        _init_prior(self.fc, init_counts)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(e))

    def rows(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Weights (k, D) and biases (k,) of outputs ``indices``, float32 numpy."""
        return _rows(self.fc.weight, self.fc.bias, indices)


class GlobalPool(nn.Module):
    """Mean over (H, W) of the concatenated features ``indices``: list of maps -> (B, D)."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__()
        self.indices = list(indices)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([features[i].mean(dim=(2, 3)) for i in self.indices], dim=1)


def _init_prior(layer: nn.Conv2d | nn.Linear, init_counts: Prior) -> None:
    """Bias softplus⁻¹(prior) (one value or one per output), weights N(0, 0.01²)."""
    if init_counts is None:
        return
    prior = torch.as_tensor(init_counts, dtype=torch.float32).clamp_min(1e-6)
    nn.init.normal_(layer.weight, std=0.01)
    with torch.no_grad():
        layer.bias.copy_((prior + torch.log(-torch.expm1(-prior))).expand(layer.bias.shape[0]))


def _rows(
    weight: torch.Tensor, bias: torch.Tensor, indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``indices`` of a (G + 1, D) weight and (G + 1,) bias, float32 numpy."""
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=weight.device)
    w = weight.detach()[idx]
    b = bias.detach()[idx]
    return w.float().cpu().numpy(), b.float().cpu().numpy()
