"""SpotNet: the spot-crop baseline (ST-Net style).

One crop per spot (``crop_um`` µm wide, default 112 µm = 224 px at 0.5 µm/px as in ST-Net)
-> timm encoder -> global average pooling of the deepest features -> linear head + softplus
-> (B, G + 1) expected counts of the spot (genes, then total). This is what the dense
:class:`~napari_stmap.core.model.pixnet.PixNet` replaces; it stays as the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from napari_stmap.core.errors import StmapInputError

from .base import BASE_OPTIONS, StmapModel
from .heads import GlobalPool, LinearHead
from .registry import register_presets

__all__ = ["SPOTNET_TINY_CONFIG", "SpotNet"]

#: Tiny random-init config for tests: timm's ``test_resnet``, 32 µm crops (64 px).
SPOTNET_TINY_CONFIG: dict[str, Any] = {"encoder": "test_resnet", "crop_um": 32.0}


class SpotNet(StmapModel):
    """Spot-crop model: (B, 3, crop_px, crop_px) in [0, 1] -> (B, G + 1) counts per spot.

    Parameters
    ----------
    genes : sequence of str
        Gene names (G); a ``"total"`` channel is appended.
    crop_um : float
        Width of the square crop around each spot centre (µm); ``crop_px = round(crop_um / mpp)``.
    init_counts_per_spot : float or list of float, optional
        Prior mean counts per spot for the head bias.
    mpp, normalisation, encoder, pretrained, encoder_weights, allow_pickle, encoder_out_indices,
    encoder_kwargs, mean, std
        As for :class:`~napari_stmap.core.model.base.StmapModel`.
    """

    arch = "spotnet"
    input_kind = "spot"
    options: ClassVar[dict[str, Any]] = {
        **BASE_OPTIONS,
        "crop_um": 112.0,
        "init_counts_per_spot": None,
    }

    def __init__(self, genes: Sequence[str], **config: Any) -> None:
        super().__init__(genes, **config)
        self.pool = GlobalPool(self.encoder.deepest)
        self.embed_dim = self.encoder.deepest_channels
        self.head_ = LinearHead(
            self.embed_dim, self.num_outputs, self.config["init_counts_per_spot"]
        )
        self.crop_px = round(float(self.config["crop_um"]) / self.mpp)
        self.stride = self.crop_px  # one output per crop; not tiled: no halo

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, crop_px, crop_px) in [0, 1] -> (B, D) pooled features."""
        if tuple(x.shape[-2:]) != (self.crop_px, self.crop_px):
            msg = (
                f"spot crops must be {self.crop_px} × {self.crop_px} px, got {tuple(x.shape[-2:])}"
            )
            raise StmapInputError(msg)
        return self.pool(self.encoder(self.normalise(x)))

    def describe(self) -> dict[str, Any]:
        """Metadata of the network, plus ``crop_px``."""
        return {**super().describe(), "crop_px": self.crop_px, "crop_um": self.config["crop_um"]}


register_presets(SpotNet, {"spotnet": {}, "spotnet_tiny": SPOTNET_TINY_CONFIG})
