"""Import timm even when torchvision's C++ extension does not match torch.

Why this exists
---------------
timm imports torchvision (``timm.layers._fx`` uses its feature-extraction helpers). When the
installed torchvision wheel was built against a different torch (e.g. the PyPI torchvision
wheel next to a CPU-only torch), ``torchvision/_C.so`` fails to load. torchvision tolerates
that for most ops, but ``torchvision/_meta_registrations.py`` unconditionally calls
``torch.library.register_fake("torchvision::nms")`` (and ``"torchvision::qnms"``), which raises
``RuntimeError: operator torchvision::nms does not exist``. The import of torchvision, and so of
timm, dies half-way.

What the workaround does (only after that exact error)
------------------------------------------------------
:func:`import_timm` first tries a plain ``import timm``. Only if it raises a ``RuntimeError``
naming a missing ``torchvision::`` operator does it

1. define *schemas only* for ``torchvision::nms`` and ``torchvision::qnms`` with
   ``torch.library`` (no kernels: calling them still raises torchvision's usual "Couldn't load
   custom C++ ops" error, so nothing silently computes wrong results),
2. drop the half-imported ``torchvision``/``timm`` modules from ``sys.modules``,
3. imports timm again.

These two ops are the only ones torchvision registers without checking that its extension
loaded (verified with torch 2.13 + torchvision 0.28). napari-stmap never uses torchvision's
detection ops; timm's models, layers and feature extraction work unchanged. With a matching
torchvision (the normal case) the first import succeeds and nothing is registered.

Import timm through :func:`import_timm` inside napari-stmap, never with ``import timm``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import Any

__all__ = ["import_timm", "placeholder_ops_registered"]

_logger = logging.getLogger(__name__)

#: Schemas of the torchvision ops whose fake-kernel registration is not guarded by torchvision.
_PLACEHOLDER_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_PURGED_PACKAGES = ("torchvision", "timm")

# The torch.library.Library that owns the placeholder definitions. It must stay referenced:
# a Library removes its definitions when it is garbage collected.
_LIBRARY: Any = None

# Indirection so tests can simulate the failing import without touching the real modules.
_import_module = importlib.import_module


def import_timm() -> ModuleType:
    """Import and return :mod:`timm`, working around a torch/torchvision mismatch if needed.

    Returns
    -------
    module
        The ``timm`` module.

    Raises
    ------
    RuntimeError
        Any import error other than the missing-torchvision-operator one, unchanged.
    """
    try:
        return _import_module("timm")
    except RuntimeError as exc:
        if not _is_missing_torchvision_op(exc):
            raise
        _logger.debug(  # set-up noise: nothing napari-stmap uses is affected
            "torchvision's C++ extension does not match torch (%s); registering placeholder "
            "torchvision::nms/qnms schemas so that timm can be imported. torchvision.ops "
            "detection functions will not work; install a torchvision built for this torch "
            "to silence this.",
            exc,
        )
    _register_placeholder_ops()
    _purge_modules(_PURGED_PACKAGES)
    return _import_module("timm")


def placeholder_ops_registered() -> bool:
    """Whether :func:`import_timm` had to register the placeholder torchvision ops."""
    return _LIBRARY is not None


def _is_missing_torchvision_op(exc: BaseException) -> bool:
    msg = str(exc)
    return "torchvision::" in msg and "does not exist" in msg


def _register_placeholder_ops() -> None:
    """Define the placeholder schemas once (idempotent; ops already defined are skipped)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _PLACEHOLDER_SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError as exc:  # already defined by a working extension or an earlier call
            _logger.debug("torchvision placeholder %s not defined: %s", schema, exc)
    _LIBRARY = lib


def _purge_modules(packages: tuple[str, ...]) -> None:
    """Remove ``packages`` and their submodules from ``sys.modules`` (half-imported state)."""
    prefixes = tuple(f"{p}." for p in packages)
    for name in [m for m in sys.modules if m in packages or m.startswith(prefixes)]:
        del sys.modules[name]
