"""Whole slides and cohorts as one dask graph over blocks of tiles (threads or a cluster).

:func:`predict_slide` / :func:`predict_cohort` plan each slide, open (or resume) its store,
skip tiles off tissue and group the rest into spatial blocks; each block is a dask task that
runs the tiled pipeline (:mod:`~napari_stmap.core.predict.pipeline`) into the store. Tasks
run on dask's threaded scheduler or on a ``dask.distributed`` cluster; each worker process
loads the model once (a per-process cache keyed by model path and tensor hash) and reopens the
slide and the store by path. Boxes are level-0 px ``(y0, x0, y1, x1)``; tiles are ``(i, j)``.

Determinism: on the CPU a tile's embedding does not depend on which other tiles share its
batch, so an interrupted and resumed run writes exactly the same store as an uninterrupted one
(on GPUs this holds for a fixed ``batch_size`` only: give one, as the automatic choice follows
the free device memory).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StmapInputError
from ..io.slide import Slide, open_slide
from ..store import TODO, PredictionStore, model_hash, open_store
from ..tiling import TileSpec
from .budget import BatchPlan, choose_batch, measure_window_cost
from .device import ready_model, resolve_precision, torch_device
from .pipeline import _ListFeed, _Pipeline
from .predictor import plan_for_store, stored_tiling, tissue_grid
from .reader import DEFAULT_IMAGE_CACHE_BYTES, SlideReader, Tile, as_slide

__all__ = ["model_cache_info", "predict_cohort", "predict_slide"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    """What a dask task needs to predict tiles of one slide (picklable; no open files)."""

    slide_path: str
    slide_mpp: float
    model_path: str
    model_sha: str
    store_path: str
    store_id: str
    batch_size: int
    device: str
    precision: str
    readers: int
    image_cache_bytes: int
    slide_backend: str = "auto"  # the reader the slide was opened with (workers reopen it)


_CACHE_LOCK = threading.RLock()
_MODELS: OrderedDict[tuple, Any] = OrderedDict()
_SLIDES: OrderedDict[tuple, tuple[Any, SlideReader]] = OrderedDict()
_STORES: OrderedDict[tuple, PredictionStore] = OrderedDict()
_MODEL_LOADS = [0]
_MAX_MODELS, _MAX_SLIDES, _MAX_STORES = 2, 4, 16


def _lru_get(cache: OrderedDict, key: tuple, make: Callable[[], Any], limit: int) -> Any:
    with _CACHE_LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = make()
        cache[key] = value
        while len(cache) > limit:
            cache.popitem(last=False)
        return value


def model_cache_info() -> dict[str, int]:
    """Per-process engine caches: models loaded so far (a load per worker, not per task)."""
    return {"model_loads": _MODEL_LOADS[0], "models": len(_MODELS), "slides": len(_SLIDES)}


def _cached_model(path: str, sha: str | None, device: str) -> Any:
    """The model in ``path`` on ``device``, loaded once per process and checked by hash."""
    from ..model import load_model

    def load() -> Any:
        model = load_model(path)
        _MODEL_LOADS[0] += 1
        if sha is not None and model_hash(model) != sha:
            msg = (
                f"{path} changed while predicting (its tensors differ from the run's model); rerun"
            )
            raise StmapInputError(msg)
        return ready_model(model, torch_device(device))

    key = path if path.startswith("<memory:") else str(Path(path).resolve())
    return _lru_get(_MODELS, (key, sha, str(device)), load, _MAX_MODELS)


def _cached_slide(job: _Job, spec: TileSpec) -> SlideReader:
    def make() -> tuple[Any, SlideReader]:
        slide = open_slide(job.slide_path, mpp=job.slide_mpp, backend=job.slide_backend)
        return slide, SlideReader(slide, spec, job.image_cache_bytes)

    key = (job.slide_path, job.slide_mpp, job.slide_backend, job.store_id)
    return _lru_get(_SLIDES, key, make, _MAX_SLIDES)[1]


def _cached_store(job: _Job) -> PredictionStore:
    def make() -> PredictionStore:
        store = open_store(job.store_path, mode="r+")
        if store.meta.get("store_id") != job.store_id:
            msg = f"{job.store_path} was replaced while predicting; rerun"
            raise StmapInputError(msg)
        return store

    return _lru_get(_STORES, (job.store_path, job.store_id), make, _MAX_STORES)


def _predict_block(job: _Job, tiles: list[Tile]) -> int:
    """Dask task: predict ``tiles`` of one slide into its store; returns tiles written."""
    import torch

    store = _cached_store(job)
    reader = _cached_slide(job, store.spec)
    model = _cached_model(job.model_path, job.model_sha, job.device)
    todo = [t for t in map(tuple, tiles) if store.state(t) == TODO]
    feed = _ListFeed(todo)
    device = torch.device(job.device)
    precision = resolve_precision(device, model, job.precision)  # "auto": for this worker
    pipe = _Pipeline(
        model,
        reader,
        store,
        batch_size=job.batch_size,
        device=device,
        precision=precision,
        readers=job.readers,
    )
    pipe.run(feed, pooled=True)
    return feed.written


def _blocks(tiles: Iterable[Tile], per_task: int) -> list[list[Tile]]:
    """Group tiles into spatial k × k blocks (k = round(√per_task)), row-major within."""
    k = max(1, round(math.sqrt(max(1, per_task))))
    groups: dict[tuple[int, int], list[Tile]] = {}
    for i, j in tiles:
        groups.setdefault((i // k, j // k), []).append((i, j))
    return [groups[g] for g in sorted(groups)]


def _prepare_slide(
    slide: Any,
    model: Any,
    model_path: Path,
    sha: str,
    store_path: Any,
    opts: dict[str, Any],
) -> tuple[PredictionStore, _Job, list[list[Tile]]]:
    """Driver side: plan, open/create the store, skip off-tissue tiles, group the rest."""
    slide = as_slide(slide)
    spec = plan_for_store(
        slide, model, store_path, opts["tile_px"], opts["halo_px"], opts["new_tile_px"]
    )
    recorded = None if str(model_path).startswith("<memory:") else model_path
    store = open_store(
        store_path, model, slide, spec, "a", dtype=opts["dtype"], model_path=recorded
    )
    box = (0.0, 0.0, *map(float, slide.shape_yx)) if opts["region"] is None else opts["region"]
    tiles = [t for t in spec.tiles_in_bbox(box) if store.state(t) == TODO]
    on = tissue_grid(slide, spec, opts["tissue"])
    store.mark_skipped([t for t in tiles if not on[t]])
    tiles = [t for t in tiles if on[t]]
    job = _Job(
        slide_path=str(Path(slide.path).resolve()),
        slide_mpp=float(slide.mpp),
        model_path=str(model_path),
        model_sha=sha,
        store_path=str(Path(store_path).resolve()),
        store_id=store.meta["store_id"],
        batch_size=int(opts["batch_size"]),
        device=str(opts["device"]),
        precision=opts["precision"],
        readers=int(opts["readers"]),
        image_cache_bytes=int(opts["image_cache_bytes"]),
        slide_backend=_reopen_backend(slide),
    )
    return store, job, _blocks(tiles, opts["tiles_per_task"])


def _reopen_backend(slide: Any) -> str:
    """``backend=`` that reopens ``slide`` with the same reader (``"auto"`` for JPEG/PNG)."""
    backend = getattr(slide, "backend", "auto")
    return backend if backend in ("tifffile", "openslide") else "auto"


def predict_slide(
    slide: Slide | str | Path,
    model_path: str | Path,
    store_path: str | Path,
    *,
    scheduler: Any = None,
    batch_size: int | None = None,
    device: str = "cpu",
    region: Sequence[float] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    **options: Any,
) -> PredictionStore:
    """Predict a whole slide (or a level-0 px ``region`` of it) into a store.

    Parameters
    ----------
    slide : Slide or path
        The slide; workers reopen it from its path (with its µm/px).
    model_path : path
        The model file (``.safetensors``); each worker process loads it once.
    store_path : path
        Prediction store: created, or resumed (tiles already done are not recomputed).
    scheduler : None, "threads", "sync", a ``dask.distributed`` address or Client
        ``None``/``"threads"``: dask's threaded scheduler in this process. A string like
        ``"tcp://10.0.0.5:8786"`` (or a Client) runs on that cluster: start one worker per
        GPU (``CUDA_VISIBLE_DEVICES``) and pass ``device="cuda"``.
    batch_size : int, optional
        Tiles per forward pass (default: chosen for the device within ``max_memory_gb`` by
        :func:`~napari_stmap.core.predict.budget.choose_batch`: 1 on the CPU).
    device : str
        Where the network runs on each worker.
    region : (y0, x0, y1, x1), optional
        Only tiles overlapping this level-0 px box (the store still spans the slide).
    progress : callable, optional
        ``progress(done_tiles, total_tiles)`` as blocks of tiles finish.
    **options
        ``tile_px``, ``halo_px`` (as :class:`Predictor`), ``tissue`` (True/False/TissueMask),
        ``tiles_per_task`` (16), ``num_workers`` (threads of the threaded scheduler, 1: each task already overlaps reading, inference and writing, and more would multiply activation memory),
        ``precision`` ("auto": resolved on each worker by
        :func:`~napari_stmap.core.predict.device.resolve_precision`), ``dtype`` ("float16"),
        ``readers`` (1),
        ``image_cache_bytes``, ``max_memory_gb`` (the budget of the automatic batch size and
        tile, GB; default a fraction of the free memory), ``on_plan`` (called with the
        :class:`~napari_stmap.core.predict.budget.BatchPlan` before anything is written).

    Returns
    -------
    PredictionStore
        The store (done-map refreshed).
    """
    return predict_cohort(
        [(slide, store_path)],
        model_path,
        scheduler=scheduler,
        batch_size=batch_size,
        device=device,
        region=region,
        progress=progress,
        **options,
    )[0]


_OPTIONS = {
    "tile_px": None,
    "halo_px": None,
    "tissue": True,
    "tiles_per_task": 16,
    "num_workers": 1,
    "precision": "auto",
    "dtype": "float16",
    "readers": 1,
    "image_cache_bytes": DEFAULT_IMAGE_CACHE_BYTES,
    "region": None,
    "max_memory_gb": None,
    "on_plan": None,
}


def predict_cohort(
    pairs: Sequence[tuple[Any, str | Path]],
    model_path: str | Path,
    *,
    scheduler: Any = None,
    batch_size: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], Any] | None = None,
    **options: Any,
) -> list[PredictionStore]:
    """Predict many slides as one dask graph: ``pairs`` of (slide or path, store path).

    Options and scheduler as :func:`predict_slide` (``region`` applies to every slide).
    Returns the stores in the order of ``pairs``.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        msg = f"unknown option(s) {unknown}; valid: {sorted(_OPTIONS)}"
        raise StmapInputError(msg)
    opts = {**_OPTIONS, **options, "batch_size": batch_size, "device": device}
    local = scheduler is None or scheduler in ("threads", "sync", "synchronous")
    if local:
        torch_device(device)
    model, path, sha = _driver_model(model_path, local)
    plan = _plan(model, path, sha, [out for _, out in pairs], opts, local)
    log.info("%s", plan.describe())
    if opts["on_plan"] is not None:
        opts["on_plan"](plan)
    opts.update(batch_size=plan.batch_size, new_tile_px=plan.tile_px)
    prepared = [_prepare_slide(s, model, path, sha, out, opts) for s, out in pairs]
    tasks = _tasks(prepared)
    total = sum(len(b) for _, _, blocks in prepared for b in blocks)
    log.info("predicting %d tiles of %d slide(s) in %d tasks", total, len(pairs), len(tasks))
    if tasks:
        _run_graph(tasks, scheduler, int(opts["num_workers"]), total, progress)
    for store, _, _ in prepared:
        store.refresh()
    return [store for store, _, _ in prepared]


def _plan(
    model: Any, path: Path, sha: str, outs: Sequence[Any], opts: dict[str, Any], local: bool
) -> BatchPlan:
    """Batch size and tile core of a run (:func:`~.budget.choose_batch`): one batch size for
    the cohort, sized for the largest tile among the given ``tile_px`` and existing stores."""
    stored = [stored_tiling(o, opts["tile_px"], opts["halo_px"]) for o in outs]
    tile = max((t for t, _ in stored if t), default=None)
    halo = max((h for _, h in stored if h is not None), default=None)
    device = torch_device(opts["device"]) if local else opts["device"]
    if str(device) == "cpu" or not local or str(path).startswith("<memory:"):
        cost = measure_window_cost(model, "cpu", opts["precision"])  # tensors alike anywhere
    else:
        net = _cached_model(str(path), sha, str(device))
        cost = measure_window_cost(net, device, opts["precision"])
    return choose_batch(
        model,
        device,
        batch_size=opts["batch_size"],
        tile_px=tile,
        halo_px=halo,
        max_memory_gb=opts["max_memory_gb"],
        cost=cost,
        extra_bytes=opts["image_cache_bytes"],
        precision=opts["precision"],
    )


_SHA_BY_FILE: dict[tuple, str] = {}


def _driver_model(model_path: Any, local: bool) -> tuple[Any, Path | None, str]:
    """(model on the CPU, its file or None, sha256): loaded once per process and file version.

    A model object (not a file) is registered in this process's cache under a placeholder
    path, so it only works with a local scheduler.
    """
    if hasattr(model_path, "embed"):
        if not local:
            msg = "a distributed scheduler needs the model as a file: save_model(model, path) and pass the path"
            raise StmapInputError(msg)
        model = ready_model(model_path, torch_device("cpu"))
        sha = model_hash(model)
        pseudo = f"<memory:{sha[:16]}>"
        _lru_get(_MODELS, (pseudo, sha, "cpu"), lambda: model, _MAX_MODELS)
        return model, Path(pseudo), sha
    path = Path(model_path).resolve()
    if not path.is_file():
        msg = f"model file {path} does not exist"
        raise StmapInputError(msg)
    stat = path.stat()
    sha = _SHA_BY_FILE.get((str(path), stat.st_size, stat.st_mtime_ns))
    if sha is None:
        from ..model import load_model

        model = load_model(path)
        _MODEL_LOADS[0] += 1
        sha = model_hash(model)
        _SHA_BY_FILE[(str(path), stat.st_size, stat.st_mtime_ns)] = sha
        _lru_get(
            _MODELS,
            (str(path), sha, "cpu"),
            lambda: ready_model(model, torch_device("cpu")),
            _MAX_MODELS,
        )
    return _cached_model(str(path), sha, "cpu"), path, sha


def _tasks(prepared: list) -> list[Any]:
    import dask

    out = []
    for _, job, blocks in prepared:
        for n, block in enumerate(blocks):
            key = f"stmap-tiles-{job.store_id[:12]}-{n}"
            out.append(dask.delayed(_predict_block, pure=False)(job, block, dask_key_name=key))
    return out


def _run_graph(
    tasks: list, scheduler: Any, num_workers: int, total: int, progress: Callable | None
) -> None:
    """Compute the task list on the threaded/sync scheduler or a distributed cluster."""
    import dask
    from dask.callbacks import Callback

    if scheduler is None or scheduler in ("threads", "sync", "synchronous"):
        done = [0]

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if isinstance(result, int) and progress is not None:
                done[0] += result
                progress(done[0], total)

        name = "sync" if scheduler in ("sync", "synchronous") else "threads"
        with Callback(posttask=posttask):
            dask.compute(*tasks, scheduler=name, num_workers=max(1, num_workers))
        return
    _run_distributed(tasks, scheduler, total, progress)


def _run_distributed(tasks: list, scheduler: Any, total: int, progress: Callable | None) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        msg = "a dask.distributed scheduler address needs the 'distributed' package: pip install 'napari-stmap[distributed]'"
        raise StmapInputError(msg) from exc
    own = not isinstance(scheduler, Client)
    client = Client(scheduler) if own else scheduler
    try:
        futures = client.compute(tasks)
        done = 0
        for fut in as_completed(futures):
            done += int(fut.result())
            if progress is not None:
                progress(done, total)
    finally:
        if own:
            client.close()
