"""What survives an epoch: the resumable state files and the running average of the weights.

After every epoch the full state (model weights, averaged weights and AdamW state as
safetensors; epoch, history, best metric and configuration as JSON; never pickle) is written
next to the model file (:func:`state_paths`). Randomness is re-seeded from ``(seed, epoch)``
at the start of every epoch, so a resumed run reproduces an uninterrupted one.

Weight averaging (``ema_decay`` > 0): :func:`_ema_update` folds the model's weights and
batch-norm statistics into an exponential moving average after every step; validation, the
saved model and the returned model use the average, the raw weights stay in the state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import StmapInputError

__all__ = ["load_state", "read_state_info", "save_state", "state_paths"]


def state_paths(out: str | Path) -> tuple[Path, Path]:
    """``(MODEL.state.safetensors, MODEL.state.json)`` next to the model file ``out``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(stem + ".state.safetensors"), out.with_name(stem + ".state.json")


def save_state(
    out: str | Path,
    model: Any,
    optimizer: Any,
    info: dict[str, Any],
    *,
    ema: dict[str, Any] | None = None,
) -> None:
    """Write model + optimizer (+ averaged weights) tensors (safetensors) and ``info`` (JSON); atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema or {}).items()})
    opt = optimizer.state_dict()
    scalars = {}
    for pid, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    info = {**info, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    st_path, js_path = state_paths(out)
    save_file(tensors, str(st_path) + ".tmp")
    js_path.with_suffix(".json.tmp").write_text(json.dumps(info, indent=1))
    os.replace(str(st_path) + ".tmp", st_path)
    os.replace(js_path.with_suffix(".json.tmp"), js_path)


def read_state_info(out: str | Path) -> dict[str, Any]:
    """The JSON part of a saved training state (raises when there is none)."""
    st_path, js_path = state_paths(out)
    if not (st_path.is_file() and js_path.is_file()):
        msg = f"nothing to resume: {js_path.name} / {st_path.name} not found next to {out}; run without --resume"
        raise StmapInputError(msg)
    try:
        return json.loads(js_path.read_text())
    except json.JSONDecodeError as exc:
        msg = f"{js_path}: corrupt training state ({exc.msg}); run without --resume"
        raise StmapInputError(msg) from exc


def load_state(out: str | Path, model: Any, optimizer: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Load model and optimizer tensors saved by :func:`save_state` (never unpickles).

    Returns the averaged weights saved with them (``{}`` when there were none).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(state_paths(out)[0]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in info["optimizer"]["scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g
        for g in info["optimizer"]["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}


def _ema_init(model: Any) -> dict[str, Any]:
    """A copy of the model's state (parameters and buffers) to average into."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ema_update(ema: dict[str, Any], model: Any, decay: float, n: int) -> int:
    """``ema ← d · ema + (1 − d) · current``, ``d = min(decay, (1 + n) / (10 + n))``.

    Floating-point entries are averaged; integer buffers (batch-norm counters) are copied.
    Returns ``n + 1``.
    """
    import torch

    d = min(float(decay), (1.0 + n) / (10.0 + n))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                ema[k].copy_(v)
    return n + 1
