"""Where and how the network runs: torch device, autocast precision, a model ready to infer, TTA.

torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import StmapInputError

__all__ = [
    "PRECISIONS",
    "as_model",
    "autocast",
    "available_devices",
    "dihedral_embed",
    "ready_model",
    "torch_device",
]

#: Autocast precisions a GPU can run (the CPU always runs fp32).
PRECISIONS = ("fp32", "bf16", "fp16")


def available_devices() -> list[str]:
    """Devices torch can use here, best first: ``cuda`` (``cuda:1``, …), ``mps``, then ``cpu``."""
    import torch

    out = []
    if torch.cuda.is_available():
        out += [f"cuda:{i}" if i else "cuda" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return [*out, "cpu"]


def torch_device(device: Any) -> Any:
    """``torch.device(device)``, refused with a hint when CUDA or MPS is not available here."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r}: CUDA is not available here; use device='cpu'"
        raise StmapInputError(msg)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device {device!r}: MPS is not available here; use device='cpu'"
        raise StmapInputError(msg)
    return dev


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32 and on the CPU)."""
    import torch

    if precision not in PRECISIONS:
        msg = f"precision must be one of {PRECISIONS}, got {precision!r}"
        raise StmapInputError(msg)
    if precision == "fp32" or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def ready_model(model: Any, device: Any) -> Any:
    """Move a dense ``model`` to ``device`` in eval mode (channels_last weights on CUDA).

    Raises
    ------
    StmapInputError
        For a spot or bin model, which the tiled engine cannot run.
    """
    import torch

    kind = getattr(model, "input_kind", "dense")
    if kind != "dense":
        arch = getattr(model, "arch", "?")
        how = (
            "one value per bin: predict it with napari_stmap.core.predict.predict_bin_region, "
            "`stmap evaluate` or the viewer"
            if kind == "bins"
            else "one value per spot crop"
        )
        msg = f"the tiled engine needs a dense model (e.g. pixnet); {arch!r} predicts {how}"
        raise StmapInputError(msg)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def as_model(model: Any | str | Path) -> Any:
    """``model`` itself, or the model loaded from its ``.safetensors`` file."""
    from ..model import load_model

    return model if hasattr(model, "embed") else load_model(model)


def dihedral_embed(model: Any, x: Any) -> Any:
    """Mean of ``model.embed`` over the 8 turns and flips of ``x``, each turned back.

    Parameters
    ----------
    model : StmapModel
        Dense (embedding (B, D, h, w)) or spot model (embedding (B, D)).
    x : torch.Tensor
        (B, 3, H, W) model input (H and W multiples of ``align_px`` for dense models).

    Returns
    -------
    torch.Tensor
        The averaged embedding; ``model.head`` of it is the TTA prediction. A dense map
        pixel covering input px ``[i·s, (i+1)·s)`` is turned back onto the same pixel, so the
        result is exactly equivariant: ``dihedral_embed(turn(x)) == turn(dihedral_embed(x))``.
    """
    import torch

    total = None
    for k in range(4):
        for flip in (False, True):
            xt = torch.rot90(x, k, dims=(2, 3))
            xt = torch.flip(xt, dims=(3,)) if flip else xt
            e = model.embed(xt)
            if e.ndim == 4:
                e = torch.flip(e, dims=(3,)) if flip else e
                e = torch.rot90(e, -k, dims=(2, 3))
            total = e if total is None else total + e
    return total / 8.0
