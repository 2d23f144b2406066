"""Model registry (timm-style) and :class:`StmapModel`, the base every architecture implements.

``create_model(arch, **config)`` builds a registered architecture; the config is JSON-safe and
enough to rebuild the same network (it is stored in every model file).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_stmap.core.errors import StmapInputError

__all__ = [
    "TOTAL_CHANNEL",
    "StmapModel",
    "create_model",
    "fill_config",
    "list_models",
    "register_model",
]

_logger = logging.getLogger(__name__)

_MODEL_BUILDERS: dict[str, Callable[..., StmapModel]] = {}
_BUILTIN_MODULES = (
    "napari_stmap.core.model.pixnet",
    "napari_stmap.core.model.spotnet",
    "napari_stmap.core.model.magnet",
)

#: Name of the extra output channel holding all transcripts together (the library size).
TOTAL_CHANNEL = "total"


def register_model(name: str) -> Callable[[Callable[..., StmapModel]], Callable[..., StmapModel]]:
    """Decorator registering ``builder(**config) -> StmapModel`` under ``name``."""

    def _register(builder: Callable[..., StmapModel]) -> Callable[..., StmapModel]:
        if name in _MODEL_BUILDERS and _MODEL_BUILDERS[name] is not builder:
            _logger.warning("model %r registered again; the new builder replaces the old", name)
        _MODEL_BUILDERS[name] = builder
        return builder

    return _register


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    _load_builtins()
    return sorted(_MODEL_BUILDERS)


def create_model(arch: str, **config: Any) -> StmapModel:
    """Build the registered architecture ``arch`` with keyword ``config``.

    Raises
    ------
    StmapInputError
        ``arch`` is not registered; the message lists the valid names.
    """
    names = list_models()
    if arch not in _MODEL_BUILDERS:
        msg = f"unknown model architecture {arch!r}; valid names: {', '.join(names)}"
        raise StmapInputError(msg)
    return _MODEL_BUILDERS[arch](**config)


def fill_config(
    arch: str, genes: Sequence[str], config: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Merge ``config`` over ``defaults``, refuse unknown keys, make values JSON-safe.

    The result (with ``genes``) is what :func:`create_model` needs to rebuild the network.
    """
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        msg = f"unknown {arch} option(s) {unknown}; valid options: {sorted(defaults)}"
        raise StmapInputError(msg)
    cfg = {**defaults, **config, "genes": list(_check_genes(genes))}
    return {k: _json_safe(v) for k, v in cfg.items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # paths and other scalars: their text


def _check_genes(genes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(genes, str) or not isinstance(genes, Sequence) or len(genes) == 0:
        msg = f"genes must be a non-empty list of gene names, got {genes!r}"
        raise StmapInputError(msg)
    out = tuple(str(g) for g in genes)
    if len(set(out)) != len(out) or TOTAL_CHANNEL in out:
        msg = f"gene names must be unique and must not be {TOTAL_CHANNEL!r}; got {len(out)} names"
        raise StmapInputError(msg)
    return out


class StmapModel(nn.Module):
    """Base of all napari-stmap networks: predicts expected counts of G genes + 1 total channel.

    Attributes
    ----------
    arch : str
        Registered architecture name (``create_model(arch, **config)`` rebuilds the network).
    config : dict
        JSON-serialisable keyword arguments of the builder.
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
    input_kind : {"dense", "spot"}
        ``"dense"``: tiles in, maps out. ``"spot"``: one crop per spot in, one vector out.
    metadata : dict
        Metadata of the file the model was loaded from (empty for a new model).
    """

    arch: str = ""
    input_kind: str = "dense"

    def __init__(
        self,
        *,
        genes: Sequence[str],
        mpp: float,
        normalisation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.genes = _check_genes(genes)
        self.mpp = float(mpp)
        self.normalisation = str(normalisation)
        self.config: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}
        self.stride = 1
        self.halo_px = 0
        self.align_px = 1
        self.exact_tiling = True
        self.register_buffer("pixel_mean", _as_pixel_stat(mean), persistent=False)
        self.register_buffer("pixel_std", _as_pixel_stat(std), persistent=False)

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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Everything except the pointwise head (implemented by subclasses)."""
        raise NotImplementedError

    def head(self, e: torch.Tensor) -> torch.Tensor:
        """Pointwise head: embedding -> non-negative expected counts (subclasses)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
