"""Model registry (timm-style): builders by name, and the JSON-safe config every model keeps.

``create_model(arch, **config)`` builds a registered architecture; the config is JSON-safe and
enough to rebuild the same network (it is stored in every model file). Each architecture
module registers its class and its presets with :func:`register_presets` on import; a preset's
files name the architecture (``pixnet``), never the preset (``pixnet_tiny``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stmap.core.errors import StmapInputError

if TYPE_CHECKING:  # typed as nn.Module: base.StmapModel imports this module, not the reverse
    from torch import nn

__all__ = [
    "TOTAL_CHANNEL",
    "check_genes",
    "create_model",
    "fill_config",
    "list_models",
    "register_model",
    "register_presets",
]

_logger = logging.getLogger(__name__)

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_BUILTIN_MODULES = (
    "napari_stmap.core.model.pixnet",
    "napari_stmap.core.model.spotnet",
    "napari_stmap.core.model.magnet",
)

#: Name of the extra output channel holding all transcripts together (the library size).
TOTAL_CHANNEL = "total"


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(genes, **config) -> StmapModel`` under ``name``."""

    def _register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODEL_BUILDERS and _MODEL_BUILDERS[name] is not builder:
            _logger.warning("model %r registered again; the new builder replaces the old", name)
        _MODEL_BUILDERS[name] = builder
        return builder

    return _register


def register_presets(cls: type[nn.Module], presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Register ``cls`` under every preset name: ``cls(genes, **{**preset, **config})``.

    Parameters
    ----------
    cls : type of StmapModel
        The architecture; its files say ``cls.arch`` whatever preset built it.
    presets : mapping of str to dict
        Name -> config keywords the preset sets (the caller's keywords win); ``{}`` for the
        bare architecture.
    """
    for name, preset in presets.items():
        register_model(name)(_preset_builder(cls, name, dict(preset)))


def _preset_builder(
    cls: type[nn.Module], name: str, preset: dict[str, Any]
) -> Callable[..., nn.Module]:
    def build(genes: Sequence[str], **config: Any) -> nn.Module:
        return cls(genes, **{**preset, **config})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{cls.__name__} with preset {preset or 'defaults'}."
    return build


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    _load_builtins()
    return sorted(_MODEL_BUILDERS)


def create_model(arch: str, **config: Any) -> nn.Module:
    """Build the registered architecture ``arch`` with keyword ``config``.

    Returns
    -------
    StmapModel
        A new network (random init unless the config loads weights), in training mode.

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
    cfg = {**defaults, **config, "genes": list(check_genes(genes))}
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


def check_genes(genes: Sequence[str]) -> tuple[str, ...]:
    """Gene names as a tuple; refuses none, duplicates and the name :data:`TOTAL_CHANNEL`."""
    if isinstance(genes, str) or not isinstance(genes, Sequence) or len(genes) == 0:
        msg = f"genes must be a non-empty list of gene names, got {genes!r}"
        raise StmapInputError(msg)
    out = tuple(str(g) for g in genes)
    if len(set(out)) != len(out) or TOTAL_CHANNEL in out:
        msg = f"gene names must be unique and must not be {TOTAL_CHANNEL!r}; got {len(out)} names"
        raise StmapInputError(msg)
    return out
