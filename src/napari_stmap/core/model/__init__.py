"""Networks that map H&E to expected counts: registry, encoders, PixNet, SpotNet, MagNet, files.

Public API (imported lazily, so ``read_model_metadata`` needs neither torch nor timm)::

    create_model(arch, **config) -> StmapModel     list_models()     register_model(name)
    save_model(model, path, metadata=...)          load_model(path, device=...)
    read_model_metadata(path) -> dict

Modules: :mod:`.base` (:class:`StmapModel` and the constructor all architectures share),
:mod:`.heads` (heads and pooling shared by them), :mod:`.registry` (names -> builders),
:mod:`.encoder` (timm), :mod:`.checkpoint` (model files). Architectures: ``pixnet`` (dense
maps, :mod:`.pixnet`), ``spotnet`` (spot-crop baseline, :mod:`.spotnet`), ``magnet``
(multi-magnification bins + neighbour graph, :mod:`.magnet`; its slide reading and inference
live in :mod:`napari_stmap.core.predict.bins`), plus the test presets ``pixnet_tiny`` /
``spotnet_tiny`` / ``magnet_tiny``. timm is always imported through
:func:`._torchvision_compat.import_timm`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "MagNet",
    "PixNet",
    "SpotNet",
    "StmapModel",
    "create_model",
    "list_models",
    "load_model",
    "read_model_metadata",
    "register_model",
    "save_model",
]

_LAZY = {
    "FORMAT_VERSION": "checkpoint",
    "load_model": "checkpoint",
    "read_model_metadata": "checkpoint",
    "save_model": "checkpoint",
    "StmapModel": "base",
    "create_model": "registry",
    "list_models": "registry",
    "register_model": "registry",
    "MagNet": "magnet",
    "PixNet": "pixnet",
    "SpotNet": "spotnet",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
