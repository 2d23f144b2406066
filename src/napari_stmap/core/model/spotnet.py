"""SpotNet: the spot-crop baseline (ST-Net style).

One crop per spot (``crop_um`` µm wide, default 112 µm = 224 px at 0.5 µm/px as in ST-Net)
-> timm encoder -> global average pooling of the deepest features -> linear head + softplus
-> (B, G + 1) expected counts of the spot (genes, then total). This is what the dense
:class:`~napari_stmap.core.model.pixnet.PixNet` replaces; it stays as the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_stmap.core.errors import StmapInputError

from .encoder import ENCODER_OPTIONS, encoder_from_config
from .registry import StmapModel, fill_config, register_model

__all__ = ["SPOTNET_TINY_CONFIG", "LinearHead", "SpotNet"]

#: Tiny random-init config for tests: timm's ``test_resnet``, 32 µm crops (64 px).
SPOTNET_TINY_CONFIG: dict[str, Any] = {"encoder": "test_resnet", "crop_um": 32.0}

_SPOTNET_OPTIONS: dict[str, Any] = {
    **ENCODER_OPTIONS,
    "crop_um": 112.0,
    "mpp": 0.5,
    "init_counts_per_spot": None,
    "normalisation": "log1p_cp10k",
}


class LinearHead(nn.Module):
    """Linear + softplus: (B, D) -> (B, G + 1) non-negative expected counts.

    ``init_counts`` (one value or one per output) sets the bias to softplus⁻¹(prior) and the
    weights near zero, so first outputs ≈ the prior.
    """

    def __init__(self, in_features: int, out_features: int, init_counts: Any = None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.act = nn.Softplus()
        if init_counts is not None:
            prior = torch.as_tensor(init_counts, dtype=torch.float32).clamp_min(1e-6)
            nn.init.normal_(self.fc.weight, std=0.01)
            with torch.no_grad():
                self.fc.bias.copy_((prior + torch.log(-torch.expm1(-prior))).expand(out_features))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(e))


class GlobalPool(nn.Module):
    """Mean over (H, W) of the concatenated deepest features: list of maps -> (B, D)."""

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__()
        self.indices = list(indices)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([features[i].mean(dim=(2, 3)) for i in self.indices], dim=1)


class SpotNet(StmapModel):
    """Spot-crop model: (B, 3, crop_px, crop_px) in [0, 1] -> (B, G + 1) counts per spot.

    Parameters
    ----------
    genes : sequence of str
        Gene names (G); a ``"total"`` channel is appended.
    crop_um : float
        Width of the square crop around each spot centre (µm); ``crop_px = round(crop_um / mpp)``.
    mpp : float
        µm/px the model works at.
    init_counts_per_spot : float or list of float, optional
        Prior mean counts per spot for the head bias.
    normalisation : str
        Target normalisation (``"log1p_cp10k"``).
    encoder, pretrained, encoder_weights, allow_pickle, encoder_out_indices, encoder_kwargs,
    mean, std
        As for :class:`~napari_stmap.core.model.pixnet.PixNet`.
    """

    arch = "spotnet"
    input_kind = "spot"

    def __init__(self, genes: Sequence[str], **config: Any) -> None:
        cfg = fill_config(self.arch, genes, config, _SPOTNET_OPTIONS)
        encoder = encoder_from_config(cfg)
        super().__init__(
            genes=genes,
            mpp=cfg["mpp"],
            normalisation=cfg["normalisation"],
            mean=cfg["mean"],
            std=cfg["std"],
        )
        self.encoder = encoder
        deepest = max(encoder.reductions)
        idx = [i for i, r in enumerate(encoder.reductions) if r == deepest]
        self.pool = GlobalPool(idx)
        self.embed_dim = sum(encoder.out_channels[i] for i in idx)
        self.head_ = LinearHead(self.embed_dim, self.num_outputs, cfg["init_counts_per_spot"])
        self.config = cfg
        self.crop_px = round(float(cfg["crop_um"]) / self.mpp)
        self.stride = self.crop_px  # one output per crop
        self.align_px = encoder.max_stride
        self.halo_px = 0  # not tiled: each spot has its own crop

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop_px, crop_px) in [0, 1] -> (B, D) pooled features."""
        if tuple(x.shape[-2:]) != (self.crop_px, self.crop_px):
            msg = (
                f"spot crops must be {self.crop_px} × {self.crop_px} px, got {tuple(x.shape[-2:])}"
            )
            raise StmapInputError(msg)
        return self.pool(self.encoder(self.normalise(x)))

    def head(self, e: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, G + 1) non-negative expected counts per spot."""
        return self.head_(e)

    def head_rows(self, gene_indices: Sequence[int | str]) -> tuple[np.ndarray, np.ndarray]:
        """Head weights (k, D) and biases (k,) of some outputs (indices or names), numpy."""
        idx = [self.channel_index(g) for g in gene_indices]
        w = self.head_.fc.weight.detach()[idx].float().cpu().numpy()
        b = self.head_.fc.bias.detach()[idx].float().cpu().numpy()
        return w, b

    def describe(self) -> dict[str, Any]:
        """Metadata of the network, plus ``crop_px``."""
        return {**super().describe(), "crop_px": self.crop_px, "crop_um": self.config["crop_um"]}


@register_model("spotnet")
def spotnet(genes: Sequence[str], **config: Any) -> SpotNet:
    """SpotNet baseline (ResNet-18, 112 µm crops by default)."""
    return SpotNet(genes, **config)


@register_model("spotnet_tiny")
def spotnet_tiny(genes: Sequence[str], **config: Any) -> SpotNet:
    """SpotNet preset for tests (:data:`SPOTNET_TINY_CONFIG`); saved files say ``spotnet``."""
    return SpotNet(genes, **{**SPOTNET_TINY_CONFIG, **config})
