"""timm encoders (``features_only=True``) and receptive-field bookkeeping for exact tiling.

Any timm CNN or ViT works as an encoder. CNNs (``resnet18``, ``convnext_tiny``, ...) give a
pyramid at strides 2–32. ViTs give several block outputs, all at the patch stride (16 px):

* pathology foundation models are ViTs: UNI is ``vit_large_patch16_224`` (timm kwargs
  ``init_values=1e-5``), H-optimus-0 is ``vit_giant_patch14_reg4_dinov2`` (patch 14: tiles must
  be multiples of 14 px, so prefer patch-16 models with this engine); load their weights from a
  local ``.safetensors`` file with ``encoder_weights=PATH``;
* ``dynamic_img_size=True`` is passed automatically for names containing ``vit`` so any tile
  size that is a multiple of the patch works; pick the blocks with ``out_indices``, e.g.
  ``(5, 11, 17, 23)`` for a 24-block ViT-L. All their outputs are at stride 16.

ViTs attend globally within a tile, so tiled output is only approximately seamless:
:func:`receptive_field` reports that (``exact=False``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_stmap.core.errors import StmapInputError

from ._torchvision_compat import import_timm

__all__ = [
    "ENCODER_OPTIONS",
    "ReceptiveField",
    "TimmEncoder",
    "check_weights_file",
    "encoder_from_config",
    "receptive_field",
]

_logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# Class-name fragments of timm modules that mix information across the whole feature map.
_GLOBAL_HINTS = (
    "Attention",
    "SqueezeExcite",
    "SEModule",
    "EcaModule",
    "CecaModule",
    "GlobalContext",
    "GatherExcite",
    "Cbam",
    "NonLocal",
    "Lambda",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "SelectAdaptivePool",
)


#: Encoder options shared by every architecture's config (see :class:`TimmEncoder`).
ENCODER_OPTIONS: dict[str, Any] = {
    "encoder": "resnet18",
    "pretrained": False,
    "encoder_weights": None,
    "allow_pickle": False,
    "encoder_out_indices": None,
    "encoder_kwargs": {},
    "mean": None,
    "std": None,
}


def encoder_from_config(cfg: dict[str, Any]) -> TimmEncoder:
    """Build the encoder of a model config; fills ``cfg["mean"]``/``cfg["std"]`` if unset."""
    encoder = TimmEncoder(
        cfg["encoder"],
        pretrained=cfg["pretrained"],
        weights=cfg["encoder_weights"],
        allow_pickle=cfg["allow_pickle"],
        out_indices=cfg["encoder_out_indices"],
        **cfg["encoder_kwargs"],
    )
    cfg["mean"] = [float(v) for v in cfg["mean"] or encoder.mean]
    cfg["std"] = [float(v) for v in cfg["std"] or encoder.std]
    return encoder


class TimmEncoder(nn.Module):
    """A timm model in ``features_only`` mode.

    Parameters
    ----------
    name : str
        timm model name (``"resnet18"``, ``"vit_large_patch16_224"``, ``"hf-hub:..."``).
    pretrained : bool
        Download timm's pretrained weights (needs internet; default False).
    weights : path, optional
        Local weights of the full timm model: ``.safetensors`` (preferred). Pickle-based files
        (``.pth``/``.pt``/``.bin``) are refused unless ``allow_pickle=True``; even then they are
        read with ``torch.load(weights_only=True)`` by timm.
    allow_pickle : bool
        Accept a pickle-based ``weights`` file.
    out_indices : sequence of int, optional
        Which feature levels / ViT blocks to return (timm's ``out_indices``).
    **kwargs
        More timm ``create_model`` keyword arguments (e.g. ``init_values=1e-5`` for UNI).

    Notes
    -----
    ``forward(x)`` takes (B, 3, H, W) standardised images and returns a list of feature maps
    (B, C_i, H / r_i, W / r_i) with ``C_i = out_channels[i]`` and ``r_i = reductions[i]`` px.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = False,
        weights: str | Path | None = None,
        allow_pickle: bool = False,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        timm = import_timm()
        kw = _timm_kwargs(name, pretrained, weights, allow_pickle, out_indices, kwargs)
        try:
            with _WeightLoadReport(name, weights):
                self.model = timm.create_model(name, features_only=True, **kw)
        except RuntimeError as exc:
            if "Unknown model" not in str(exc):
                raise
            msg = f"unknown timm encoder {name!r}; see timm.list_models() for valid names"
            raise StmapInputError(msg) from exc
        self.name = name
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @property
    def max_stride(self) -> int:
        """Largest feature stride in input px; tiles must be aligned to it."""
        return max(self.reductions)

    @property
    def deepest(self) -> list[int]:
        """Indices of the features at :attr:`max_stride` (several for ViT blocks)."""
        return [i for i, r in enumerate(self.reductions) if r == self.max_stride]

    @property
    def deepest_channels(self) -> int:
        """Channels of the :attr:`deepest` features together."""
        return sum(self.out_channels[i] for i in self.deepest)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> list of (B, C_i, H / r_i, W / r_i)."""
        return list(self.model(x))


def _timm_kwargs(
    name: str,
    pretrained: bool,
    weights: str | Path | None,
    allow_pickle: bool,
    out_indices: Sequence[int] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    kw: dict[str, Any] = {"pretrained": bool(pretrained), **extra}
    if "vit" in name.lower():
        kw.setdefault("dynamic_img_size", True)
    if out_indices is not None:
        kw["out_indices"] = tuple(int(i) for i in out_indices)
    if weights is not None:
        path = check_weights_file(weights, allow_pickle=allow_pickle)
        kw["pretrained"] = True
        kw["pretrained_cfg_overlay"] = {"file": str(path)}
    return kw


# Classifier layers: absent from headless (foundation-model) checkpoints, unused by encoders.
_CLASSIFIER_NAMES = ("head", "fc", "classifier", "head_dist", "last_linear")


class _WeightLoadReport(logging.Handler):
    """Escalates timm's INFO "Missing keys" note to a warning when loading local weights.

    timm loads feature-extractor weights with ``strict=False``, so a checkpoint for another
    architecture would otherwise leave the encoder silently (partly) random.
    """

    def __init__(self, name: str, weights: str | Path | None) -> None:
        super().__init__(logging.INFO)
        self.name, self.weights = name, weights
        self._logger = logging.getLogger("timm.models._builder")
        self._level = self._logger.level

    def __enter__(self) -> _WeightLoadReport:
        if self.weights is not None:
            self._logger.addHandler(self)
            self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not text.startswith(("Missing keys", "Unexpected keys")):
            return
        keys = text[text.find("(") + 1 : text.find(")")].split(", ")
        keys = [k for k in keys if k.split(".")[0] not in _CLASSIFIER_NAMES]
        if keys:
            kind = text.split(" (")[0].lower()
            shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
            _logger.warning(
                "encoder %s: %d %s in weights %s (%s); is this checkpoint for this model?",
                self.name,
                len(keys),
                kind,
                self.weights,
                shown,
            )


def check_weights_file(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """Validate a local encoder weights file; refuse pickles unless ``allow_pickle``.

    Raises
    ------
    StmapInputError
        The file is missing, or is pickle-based and ``allow_pickle`` is False.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        msg = f"encoder weights file {p} does not exist; pass the path of a .safetensors file"
        raise StmapInputError(msg)
    if p.suffix.lower() != ".safetensors" and not allow_pickle:
        msg = (
            f"encoder weights {p} are not .safetensors (pickle-based files can run code when "
            "loaded); convert them to .safetensors, or pass allow_pickle=True if you trust it"
        )
        raise StmapInputError(msg)
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        _logger.warning("loading pickle-based encoder weights %s (allow_pickle=True)", p)
    return p


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a dense network, in input px.

    Attributes
    ----------
    radius_px : float
        Upper bound of how far (input px) beyond an output pixel's own footprint its value can
        depend on the input, counting only local operations.
    exact : bool
        False if the network has global operations (global attention, squeeze-excitation,
        global pooling): then no finite halo makes tiling exact.
    global_modules : tuple of str
        Names of the modules that made ``exact`` False.
    """

    radius_px: float
    exact: bool
    global_modules: tuple[str, ...] = ()

    def halo(self, align_px: int) -> int:
        """``radius_px`` rounded up to a multiple of ``align_px`` (at least one ``align_px``)."""
        return max(1, math.ceil(self.radius_px / align_px)) * align_px


def receptive_field(model: nn.Module, embed: Any, *, probe_px: int) -> ReceptiveField:
    """Measure the receptive-field radius of ``embed`` by walking its modules with hooks.

    Parameters
    ----------
    model : nn.Module
        The module tree whose submodules run inside ``embed``.
    embed : callable
        ``embed(x)`` with x of shape (1, 3, probe_px, probe_px).
    probe_px : int
        Size of the probe input (px); use at least 4 × the max stride.

    Notes
    -----
    Every convolution / pooling / module with an ``rf_radius`` attribute adds its radius (in
    its own input px) times its input stride (input px per pixel of its input). Contributions
    of parallel branches are summed, so the result is an upper bound for networks built from
    modules (operations done with bare functions inside ``forward`` are not seen). A module
    fed a 1-pixel-wide map (it follows a global pool; a probe of ≥ 4 × the max stride keeps
    real feature maps wider) or whose class name suggests global mixing (attention,
    squeeze-excitation, ...) makes the field non-exact.
    """
    radius = [0.0]
    global_mods: list[str] = []
    hooks = [
        m.register_forward_hook(_rf_hook(name, probe_px, radius, global_mods))
        for name, m in model.named_modules()
    ]
    was_training = model.training
    model.eval()  # no batch-norm statistics updates from the probe
    try:
        with torch.no_grad():
            embed(torch.zeros(1, 3, probe_px, probe_px, device=_device_of(model)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return ReceptiveField(radius[0], not global_mods, tuple(dict.fromkeys(global_mods)))


def _rf_hook(name: str, probe_px: int, radius: list[float], global_mods: list[str]) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0] if inputs else None
        if _is_global(module):
            global_mods.append(name or type(module).__name__)
            return
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            return
        jump = probe_px / x.shape[-1]
        if jump > probe_px / 2:  # a 1-pixel-wide input: it follows a global pool
            global_mods.append(name or type(module).__name__)
            return
        radius[0] += _module_radius(module) * jump

    return hook


def _is_global(module: nn.Module) -> bool:
    if hasattr(module, "rf_radius"):
        return False
    cls = type(module).__name__
    return any(h in cls for h in _GLOBAL_HINTS)


def _module_radius(module: nn.Module) -> float:
    """Extent (module input px) beyond an output pixel's footprint that it reads."""
    if hasattr(module, "rf_radius"):
        return float(module.rf_radius)
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return 0.0
    k, s, p, d = (
        _pair(getattr(module, a, 1)) for a in ("kernel_size", "stride", "padding", "dilation")
    )
    if isinstance(module, nn.AvgPool2d):
        d = (1, 1)
    if isinstance(module.padding, str) or "Same" in type(module).__name__:
        return float(max((k[i] - 1) * d[i] for i in range(2)))  # dynamic padding: conservative
    ext = [max(p[i], (k[i] - 1) * d[i] - p[i] - (s[i] - 1), 0) for i in range(2)]
    return float(max(ext))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, str):
        return (0, 0)
    if isinstance(v, Sequence):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
