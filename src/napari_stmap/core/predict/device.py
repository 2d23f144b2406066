"""Where and how the network runs: torch device, autocast precision, a model ready to infer, TTA.

Precision: ``"auto"`` (the default of every dense prediction path) is resolved here by
:func:`resolve_precision`, from the device and the network: bf16 autocast where it was measured
to be at least 1.5x faster than fp32 with the same accuracy (``docs/benchmarks.md``, "Precision
by device"), fp32 elsewhere. ``"fp32"`` runs without autocast, exactly as before.

torch is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import StmapInputError

__all__ = [
    "AUTO_BF16",
    "BF16_ARCHS",
    "BF16_CPU_FLAGS",
    "PRECISIONS",
    "PRECISION_CHOICES",
    "as_model",
    "autocast",
    "available_devices",
    "cpu_flags",
    "dihedral_embed",
    "ready_model",
    "resolve_precision",
    "torch_device",
]

#: Autocast precisions: fp32 (no autocast), bf16 (GPUs and the CPU), fp16 (GPUs only; the
#: CPU runs it as fp32).
PRECISIONS = ("fp32", "bf16", "fp16")

#: What ``precision`` arguments accept: a precision, or ``"auto"`` (:func:`resolve_precision`).
PRECISION_CHOICES = ("auto", *PRECISIONS)

#: ``"auto"`` picks bf16 where the device supports it (False: ``"auto"`` is always fp32).
#: Switched on by measurement: ``benchmarks/bench_precision.py``.
AUTO_BF16 = False

#: Networks (``model.arch``) measured to keep their accuracy under bf16; ``"auto"`` gives the
#: others fp32.
BF16_ARCHS = frozenset({"pixnet"})

#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: AVX-512 BF16 or AMX.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """Feature flags of this CPU from ``/proc/cpuinfo`` (Linux); empty where it is unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_precision(
    device: Any,
    model: Any = None,
    precision: str = "auto",
    *,
    flags: frozenset[str] | None = None,
    auto_bf16: bool | None = None,
) -> str:
    """The precision to run: ``precision`` itself, or for ``"auto"`` bf16 or fp32.

    Parameters
    ----------
    device : str or torch.device
        Where the network runs.
    model : StmapModel, optional
        The network; ``"auto"`` gives bf16 only to architectures in :data:`BF16_ARCHS`
        (None: judged by the device alone).
    precision : {"auto", "fp32", "bf16", "fp16"}
        What was asked for; anything but ``"auto"`` is returned as it is.
    flags : frozenset of str, optional
        CPU flags (default :func:`cpu_flags`; tests inject them).
    auto_bf16 : bool, optional
        Whether ``"auto"`` may pick bf16 at all (default :data:`AUTO_BF16`).

    Returns
    -------
    str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``. ``"auto"`` is bf16 on CUDA devices with bf16
        support and on CPUs with :data:`BF16_CPU_FLAGS`, fp32 on anything else (MPS included).
    """
    if precision not in PRECISION_CHOICES:
        msg = f"precision must be one of {PRECISION_CHOICES}, got {precision!r}; use 'auto'"
        raise StmapInputError(msg)
    if precision != "auto":
        return precision
    if not (AUTO_BF16 if auto_bf16 is None else auto_bf16):
        return "fp32"
    if model is not None and getattr(model, "arch", None) not in BF16_ARCHS:
        return "fp32"
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind == "cpu":
        have = cpu_flags() if flags is None else flags
        return "bf16" if have & BF16_CPU_FLAGS else "fp32"
    if kind == "cuda":
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if ok else "fp32"
    return "fp32"


def autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device``.

    A no-op for fp32, and for fp16 on the CPU; bf16 autocasts on GPUs and the CPU.
    ``"auto"`` is resolved by :func:`resolve_precision` (device only).
    """
    import torch

    precision = resolve_precision(device, None, precision)
    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
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
