"""How many tiles per forward pass, and how large, within a memory budget.

The network's activations dominate the memory of tiled prediction, and they grow with the
number of windows per pass (batch) and with the window's area. :func:`measure_window_cost`
measures them once per model and device with a dry run on two small windows (tensor bytes alive
at once, counted by a dispatch mode on the CPU, torch's allocator peak on CUDA), so the cost of
any window is ``fixed + per_px · W²``. :func:`choose_batch` picks the batch size and tile core
from the device and a budget:

- **CPU**: one window per pass (:data:`CPU_BATCH`). Measured on the default HER2ST PixNet
  (docs/benchmarks.md, "Lean defaults (issue 14)"): batch 8 cost 3.7 GB more than batch 1 and
  was slower per tile, since the CPU already parallelises inside one large window.
- **CUDA** (and MPS): as many windows as fit the budget, at most :data:`GPU_MAX_BATCH`.
- The budget is ``max_memory_gb`` if given, else a fraction of the free memory of the device
  (host memory for the CPU and MPS, :data:`HOST_FRACTION`; device memory for CUDA,
  :data:`CUDA_FRACTION`). When batch 1 of the default tile does not fit, the tile core
  shrinks (not below :func:`min_tile_px`); when nothing fits, a
  :class:`~napari_stmap.core.errors.StmapInputError` names the smallest budget that works.

Memory is in bytes, budgets in GB (10⁹ bytes); windows and tiles in model px.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StmapInputError
from ..tiling import default_tile_px
from .device import autocast
from .pipeline import input_tensor

__all__ = [
    "CPU_BATCH",
    "CUDA_FRACTION",
    "GPU_MAX_BATCH",
    "HOST_FRACTION",
    "BatchPlan",
    "WindowCost",
    "choose_batch",
    "free_memory_bytes",
    "host_available_bytes",
    "measure_window_cost",
    "min_tile_px",
]

log = logging.getLogger(__name__)

#: Windows per forward pass on the CPU (the fastest per tile there, and the leanest).
CPU_BATCH = 1
#: Most windows per forward pass on a GPU (larger batches gain little and delay the first tile).
GPU_MAX_BATCH = 16
#: Default budget on the CPU and MPS: this fraction of the host's available memory.
HOST_FRACTION = 0.5
#: Default budget on CUDA: this fraction of the device's free memory.
CUDA_FRACTION = 0.8
#: Budget when the free memory cannot be read (not Linux, no ``sysconf``), bytes.
FALLBACK_BUDGET_BYTES = 2e9
#: Smallest automatic tile core side, model px (before rounding up to the halo and alignment).
MIN_TILE_PX = 256
#: Activation bytes per window px assumed when the dry run cannot count them (5× a ResNet PixNet).
FALLBACK_BYTES_PER_PX = 1000.0
GB = 1e9
#: How messages name the budget: the command-line option and the keyword.
_OPTION = "--max-memory / max_memory_gb"


@dataclass(frozen=True)
class WindowCost:
    """Memory of one forward pass, measured: ``fixed_bytes + per_px_bytes · W²`` per window.

    Attributes
    ----------
    fixed_bytes : float
        Bytes independent of the window size (per pass).
    per_px_bytes : float
        Bytes per model px of a window (float input and activations alive at the peak).
    out_bytes_per_px : float
        Bytes of the kept embedding per model px of a tile core (``D · 4 / stride²``).
    device : str
        Where it was measured (``"cpu"``, ``"cuda:0"``, ...).
    """

    fixed_bytes: float
    per_px_bytes: float
    out_bytes_per_px: float
    device: str

    def window_bytes(self, window_px: int, tile_px: int) -> float:
        """Bytes one window adds to a batch: activations, its uint8 copies in the read queue
        and batch (4 × 3 B/px), and its embedding in flight (compute, writer queue: 3×)."""
        return (self.per_px_bytes + 12.0) * window_px**2 + 3 * self.out_bytes_per_px * tile_px**2


@dataclass(frozen=True)
class BatchPlan:
    """What tiled prediction will run: batch size, tile core and the memory it should take.

    Attributes
    ----------
    batch_size : int
        Windows per forward pass.
    tile_px, window_px : int
        Tile core side and read window side (core + 2 halos), model px.
    device : str
        Where the network runs.
    estimate_bytes : float
        Expected working memory: a batch of windows (:meth:`WindowCost.window_bytes`), the
        pass's fixed part and the slide-block cache. The Python process, torch and the model
        weights come on top.
    budget_bytes : float, optional
        The budget (None: unknown, only when both batch and tile were given).
    budget_from : str
        Where the budget came from (``"given"``, ``"50% of free host memory"``, ...).
    automatic : bool
        Whether the batch size was chosen here (not given).
    """

    batch_size: int
    tile_px: int
    window_px: int
    device: str
    estimate_bytes: float
    budget_bytes: float | None
    budget_from: str
    automatic: bool

    def describe(self) -> str:
        """One line, e.g. ``batch 1 × 1664² px windows on cpu (≈0.6 GB of a 6.0 GB budget)``."""
        budget = (
            f" of a {self.budget_bytes / GB:.1f} GB budget" if self.budget_bytes is not None else ""
        )
        return (
            f"batch {self.batch_size} × {self.window_px}² px windows on {self.device} "
            f"(≈{self.estimate_bytes / GB:.1f} GB{budget})"
        )


# ================================================================================ free memory
def host_available_bytes() -> float | None:
    """Memory the host can give without swapping, bytes: ``MemAvailable`` of /proc/meminfo,
    else free pages × page size from ``os.sysconf``; None when neither can be read."""
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def free_memory_bytes(device: Any) -> float | None:
    """Free memory where ``device``'s tensors live, bytes (CUDA: the device's; else the host's).

    None when it cannot be read (e.g. a CUDA device asked for on a machine without one).
    """
    dev = _device(device)
    if dev.type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(dev)
        return float(free)
    return host_available_bytes()


def _device(device: Any) -> Any:
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


# ================================================================================ dry run
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def measure_window_cost(model: Any, device: Any, precision: str = "fp32") -> WindowCost:
    """Measure the memory of ``model``'s forward pass on ``device`` (once per model and device).

    Two dry runs on small windows (about 256² and 384² model px, aligned) give the fixed and
    the per-px part. On CUDA the measure is torch's allocator peak; elsewhere a dispatch mode
    adds up the bytes of tensors alive at once (``tracemalloc`` does not see torch).

    Parameters
    ----------
    model : StmapModel
        A dense model on ``device``, in eval mode.
    device : str or torch.device
        Where it runs.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype on GPUs (as the prediction will run).

    Returns
    -------
    WindowCost
    """
    dev = _device(device)
    key = (str(dev), precision)
    per_model = _COSTS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _measure(model, dev, precision)
    return per_model[key]


def _measure(model: Any, dev: Any, precision: str) -> WindowCost:
    align = math.lcm(int(model.align_px), int(model.stride))
    small = _round_up(256, align)
    sizes = (small, small + _round_up(128, align))
    try:
        peaks, dim = zip(*(_dry_run(model, dev, precision, w) for w in sizes), strict=True)
    except Exception as exc:  # an exotic op the counter cannot follow: a conservative guess
        log.warning(
            "could not measure activation memory (%s); assuming %g B/px", exc, FALLBACK_BYTES_PER_PX
        )
        return WindowCost(0.0, FALLBACK_BYTES_PER_PX, 0.0, str(dev))
    (w0, w1), (p0, p1) = sizes, peaks
    per_px = max((p1 - p0) / (w1**2 - w0**2), 0.0)
    fixed = max(p0 - per_px * w0**2, 0.0)
    out_per_px = 4.0 * dim[0] / int(model.stride) ** 2
    return WindowCost(fixed, per_px, out_per_px, str(dev))


def _dry_run(model: Any, dev: Any, precision: str, window_px: int) -> tuple[float, int]:
    """Peak bytes of one forward pass on a ``window_px``² window, and the embedding depth D."""
    import torch

    image = torch.zeros((1, window_px, window_px, 3), dtype=torch.uint8).numpy()

    def run() -> int:
        with torch.inference_mode(), autocast(dev, precision):
            e = model.embed(input_tensor(image, dev))
            return int(e.shape[1])

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        dim = run()
        torch.cuda.synchronize(dev)
        return float(torch.cuda.max_memory_allocated(dev) - base), dim
    counter = _live_bytes_mode()()
    with counter:
        dim = run()
    return float(counter.peak), dim


@functools.cache
def _live_bytes_mode() -> type:
    """The dispatch mode class that counts live tensor bytes (made on first use: torch is
    imported lazily)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        """Counts the bytes of storages that op outputs hold, alive at once (peak)."""

        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, int] = {}
            self.sizes: dict[int, int] = {}
            self.current = self.peak = 0

        def _release(self, key: int) -> None:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                self.current -= self.sizes.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            import torch

            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0:
                    continue
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
            return out

    return LiveBytes


# ================================================================================ the choice
def min_tile_px(model: Any) -> int:
    """Smallest tile core :func:`choose_batch` shrinks to: the halo or :data:`MIN_TILE_PX`,
    aligned (a smaller core spends most of its window on the halo)."""
    align = math.lcm(int(model.align_px), int(model.stride))
    return _round_up(max(MIN_TILE_PX, int(model.halo_px)), align)


def choose_batch(
    model: Any,
    device: Any,
    *,
    batch_size: int | None = None,
    tile_px: int | None = None,
    halo_px: int | None = None,
    max_memory_gb: float | None = None,
    free_bytes: float | None = None,
    cost: WindowCost | None = None,
    extra_bytes: float = 0.0,
    precision: str = "fp32",
) -> BatchPlan:
    """Choose the batch size and tile core for ``model`` on ``device`` within a memory budget.

    Parameters
    ----------
    model : StmapModel
        A dense model (``align_px``, ``stride``, ``halo_px``), on ``device`` for a dry run.
    device : str or torch.device
        ``"cpu"``: :data:`CPU_BATCH` window per pass; ``"cuda"`` / ``"mps"``: as many as fit
        (at most :data:`GPU_MAX_BATCH`).
    batch_size : int, optional
        Given: used as it is (the plan still says what it should cost).
    tile_px : int, optional
        Tile core side, model px (rounded up to the model's alignment). Given (or a store's):
        kept; None: :func:`~napari_stmap.core.tiling.default_tile_px`, shrunk towards
        :func:`min_tile_px` while batch 1 does not fit (only when ``batch_size`` is None too).
    halo_px : int, optional
        Halo per side, model px (default the model's).
    max_memory_gb : float, optional
        The budget, GB (10⁹ bytes). Default: :data:`HOST_FRACTION` of the host's available
        memory (CPU, MPS) or :data:`CUDA_FRACTION` of the CUDA device's free memory.
    free_bytes : float, optional
        Free memory of the device, bytes (default: read with :func:`free_memory_bytes`; tests
        inject it).
    cost : WindowCost, optional
        Memory of a pass (default: :func:`measure_window_cost`).
    extra_bytes : float
        Working memory besides the batch (the slide-block cache), bytes.
    precision : {"fp32", "bf16", "fp16"}
        For the dry run.

    Returns
    -------
    BatchPlan

    Raises
    ------
    StmapInputError
        A budget that is not positive, or that fits no window (the message names the smallest
        budget that works), or an unknown budget (CUDA not visible here and no
        ``max_memory_gb``) when the batch is to be chosen.
    """
    dev = _device(device)
    align = math.lcm(int(model.align_px), int(model.stride))
    halo = _round_up(int(model.halo_px if halo_px is None else halo_px), align)
    fixed_tile = tile_px is not None or batch_size is not None
    tile = _round_up(int(tile_px or default_tile_px(model)), align)
    budget, source = _budget(dev, max_memory_gb, free_bytes)
    cost = cost or measure_window_cost(model, dev, precision)

    def need(batch: int, t: int) -> float:
        return cost.fixed_bytes + extra_bytes + batch * cost.window_bytes(t + 2 * halo, t)

    if batch_size is not None:
        plan = _plan(
            int(batch_size), tile, halo, dev, need(int(batch_size), tile), budget, source, False
        )
        if budget is not None and plan.estimate_bytes > budget:
            log.warning(
                "%s exceeds the %.1f GB budget (%s); leave the batch size unset to fit it",
                plan.describe(),
                budget / GB,
                source,
            )
        return plan
    if budget is None:
        msg = f"free memory of {dev} cannot be read here; give a budget ({_OPTION}) or a batch size"
        raise StmapInputError(msg)
    smallest = tile if fixed_tile else min(tile, min_tile_px(model))
    while need(1, tile) > budget and tile - align >= smallest:
        tile -= align
    if need(1, tile) > budget:
        floor_gb = math.ceil(need(1, tile) / GB * 10) / 10
        msg = (
            f"memory budget {budget / GB:.2g} GB fits no tile window of this model: one "
            f"{tile + 2 * halo}² px window ({tile} px tile) needs ≈{need(1, tile) / GB:.2f} GB; "
            f"raise the budget ({_OPTION}) to {floor_gb:g} GB or more"
        )
        raise StmapInputError(msg)
    batch = CPU_BATCH if dev.type == "cpu" else _fit(need, tile, budget)
    return _plan(batch, tile, halo, dev, need(batch, tile), budget, source, True)


def _fit(need: Any, tile: int, budget: float) -> int:
    """Most windows per pass within ``budget`` (1 … :data:`GPU_MAX_BATCH`)."""
    batch = 1
    while batch < GPU_MAX_BATCH and need(batch + 1, tile) <= budget:
        batch += 1
    return batch


def _plan(batch, tile, halo, dev, need, budget, source, automatic) -> BatchPlan:  # noqa: ANN001
    return BatchPlan(
        batch_size=batch,
        tile_px=tile,
        window_px=tile + 2 * halo,
        device=str(dev),
        estimate_bytes=float(need),
        budget_bytes=budget,
        budget_from=source,
        automatic=automatic,
    )


def _budget(
    dev: Any, max_memory_gb: float | None, free_bytes: float | None
) -> tuple[float | None, str]:
    """(budget bytes or None, where it came from)."""
    if max_memory_gb is not None:
        if not max_memory_gb > 0:
            msg = f"the memory budget ({_OPTION}) must be a positive number of GB, got {max_memory_gb}"
            raise StmapInputError(msg)
        return float(max_memory_gb) * GB, "given"
    free = free_memory_bytes(dev) if free_bytes is None else float(free_bytes)
    if free is None:
        if dev.type == "cuda":
            return None, "unknown"
        return FALLBACK_BUDGET_BYTES, "fallback (free memory unknown)"
    fraction = CUDA_FRACTION if dev.type == "cuda" else HOST_FRACTION
    where = "device" if dev.type == "cuda" else "host"
    return fraction * free, f"{fraction:.0%} of free {where} memory"


def _round_up(value: int, step: int) -> int:
    return -(-int(value) // step) * step
