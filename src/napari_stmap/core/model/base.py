""":class:`StmapModel`, the base every architecture implements, and its shared constructor.

The constructor does what every architecture needs: merge the config over the architecture's
defaults (:attr:`StmapModel.options`), build the timm encoder, and set the genes, µm/px,
normalisation and RGB standardisation. Subclasses then build their own decoder / head
(``self.head_``) and set ``stride`` (and ``halo_px`` where tiles need context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from napari_stmap.core.errors import StmapInputError

from .encoder import ENCODER_OPTIONS, encoder_from_config
from .registry import TOTAL_CHANNEL, fill_config

__all__ = ["BASE_OPTIONS", "StmapModel"]

#: Config keys (and defaults) every architecture has: the encoder's, µm/px and normalisation.
BASE_OPTIONS: dict[str, Any] = {
    **ENCODER_OPTIONS,
    "mpp": 0.5,
    "normalisation": "log1p_cp10k",
}


class StmapModel(nn.Module):
    """Base of all napari-stmap networks: predicts expected counts of G genes + 1 total channel.

    Parameters
    ----------
    genes : sequence of str
        Gene names (G); a ``"total"`` channel is appended.
    encoder : str
        timm model name (see :mod:`~napari_stmap.core.model.encoder`).
    pretrained, encoder_weights, allow_pickle, encoder_out_indices, encoder_kwargs
        Encoder weights and timm options (:class:`~napari_stmap.core.model.encoder.TimmEncoder`).
    mean, std : list of float, optional
        RGB standardisation; default: the encoder's pretrained config.
    mpp : float
        µm/px of the input the model works at.
    normalisation : str
        Target normalisation (``"log1p_cp10k"``).
    **config
        The architecture's own keywords (keys of :attr:`options`; unknown keys are refused).

    Attributes
    ----------
    arch : str
        Registered architecture name (``create_model(arch, **config)`` rebuilds the network).
    options : dict
        Config keys of the architecture and their defaults (class attribute).
    config : dict
        JSON-serialisable keyword arguments of the builder, defaults filled in, with ``genes``.
    encoder : TimmEncoder
        The image encoder (:mod:`~napari_stmap.core.model.encoder`).
    genes : tuple of str
        The G gene names; outputs have G + 1 channels, the last one is ``"total"``.
    mpp : float
        µm per pixel of the input the model expects.
    stride : int
        One output pixel covers ``stride × stride`` input px (``input_kind="dense"``).
    halo_px : int
        Input px of context needed on each side of a tile for exact (seamless) dense output.
    align_px : int
        Tile origins and sizes must be multiples of this many input px (the encoder's max stride).
    exact_tiling : bool
        Whether tiles with ``halo_px`` reproduce one big forward pass exactly.
    normalisation : str
        How targets are judged; ``"log1p_cp10k"`` means ``log1p(1e4 · gene / total)`` per spot.
    input_kind : {"dense", "spot", "bins"}
        ``"dense"``: tiles in, maps out. ``"spot"``: one crop per spot in, one vector out.
        ``"bins"``: bin views and context in, one vector per bin out.
    head_ : PointwiseHead or LinearHead
        The head (:mod:`~napari_stmap.core.model.heads`), built by the subclass;
        :meth:`head` and :meth:`head_rows` use it.
    metadata : dict
        Metadata of the file the model was loaded from (empty for a new model).
    """

    arch: str = ""
    input_kind: str = "dense"
    options: ClassVar[dict[str, Any]] = BASE_OPTIONS

    def __init__(self, genes: Sequence[str], **config: Any) -> None:
        super().__init__()
        cfg = fill_config(self.arch, genes, config, self.options)
        self.check_config(cfg)
        encoder = encoder_from_config(cfg)  # fills cfg["mean"] / cfg["std"]
        self.genes: tuple[str, ...] = tuple(cfg["genes"])
        self.mpp = float(cfg["mpp"])
        self.normalisation = str(cfg["normalisation"])
        self.config: dict[str, Any] = cfg
        self.metadata: dict[str, Any] = {}
        self.stride = 1
        self.halo_px = 0
        self.align_px = encoder.max_stride
        self.exact_tiling = True
        self.register_buffer("pixel_mean", _as_pixel_stat(cfg["mean"]), persistent=False)
        self.register_buffer("pixel_std", _as_pixel_stat(cfg["std"]), persistent=False)
        self.encoder = encoder

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Refuse inconsistent options before anything is built (subclasses; default: none)."""

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the G + 1 output channels: the genes, then ``"total"``."""
        return (*self.genes, TOTAL_CHANNEL)

    @property
    def num_outputs(self) -> int:
        """G + 1."""
        return len(self.genes) + 1

    def channel_index(self, name_or_index: str | int) -> int:
        """Output channel index of a gene name (or ``"total"``) or of an integer index."""
        if isinstance(name_or_index, (int, np.integer)):
            idx = int(name_or_index)
            if -self.num_outputs <= idx < self.num_outputs:
                return idx % self.num_outputs
        elif name_or_index in self.output_names:
            return self.output_names.index(name_or_index)
        msg = f"{name_or_index!r} is not an output of this model ({self.num_outputs} channels)"
        raise StmapInputError(msg)

    def preprocess(self, x: Any) -> torch.Tensor:
        """Turn an RGB batch into the float input of :meth:`embed` / :meth:`forward`.

        Parameters
        ----------
        x : array or tensor
            ``uint8`` (0–255) or float (0–1) RGB, axes (B, 3, H, W), (B, H, W, 3) or (H, W, 3).

        Returns
        -------
        torch.Tensor
            float32 in [0, 1], (B, 3, H, W), channels_last memory, on the model's device.
            Mean/std normalisation is applied inside :meth:`embed` (the model owns it).
        """
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or 3 not in (t.shape[1], t.shape[-1]):
            msg = f"expected RGB images (B, 3, H, W) or (B, H, W, 3), got shape {tuple(t.shape)}"
            raise StmapInputError(msg)
        if t.shape[1] != 3:
            t = t.permute(0, 3, 1, 2)
        t = t.float().div(255.0) if t.dtype == torch.uint8 else t.float()
        return t.to(self.pixel_mean.device, memory_format=torch.channels_last)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> standardised with the encoder's mean/std."""
        return (x - self.pixel_mean) / self.pixel_std

    def embed(self, x: Any) -> torch.Tensor:
        """Everything except the pointwise head (implemented by subclasses)."""
        raise NotImplementedError

    def head(self, e: torch.Tensor) -> torch.Tensor:
        """Pointwise head ``head_``: embedding (B, D, ...) -> (B, G + 1, ...) expected counts.

        Dense models keep the spatial axes (B, D, h, w) -> (B, G + 1, h, w); spot and bin
        models map (N, D) -> (N, G + 1). Values are non-negative.
        """
        return self.head_(e)

    def head_rows(self, gene_indices: Sequence[int | str]) -> tuple[np.ndarray, np.ndarray]:
        """Head weights (k, D) and biases (k,) for some outputs (indices or names, "total").

        ``softplus(W @ e + b)`` with e of shape (D, ...) reproduces :meth:`head` for those
        channels, so a viewer can map one gene from a cached embedding with numpy.
        """
        return self.head_.rows([self.channel_index(g) for g in gene_indices])

    def forward(self, x: Any) -> torch.Tensor:
        """``head(embed(x))``: expected counts, G + 1 channels (genes, then total)."""
        return self.head(self.embed(x))

    def describe(self) -> dict[str, Any]:
        """The metadata that describes this network (stored in model files)."""
        return {
            "arch": self.arch,
            "config": self.config,
            "encoder": self.config.get("encoder"),
            "genes": list(self.genes),
            "mpp": self.mpp,
            "stride": self.stride,
            "halo_px": self.halo_px,
            "align_px": self.align_px,
            "exact_tiling": self.exact_tiling,
            "normalisation": self.normalisation,
            "input_kind": self.input_kind,
        }


def _as_pixel_stat(values: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.numel() != 3:
        msg = f"mean/std must have 3 values (R, G, B), got {list(values)}"
        raise StmapInputError(msg)
    return t.view(1, 3, 1, 1)
