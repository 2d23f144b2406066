"""The prediction engine: tiled, cached, lazy dense prediction on a thread or a dask cluster.

The network runs once per tile; its embedding ``(D, h, w)`` goes into a
:class:`~napari_stmap.core.store.PredictionStore` and every gene map is then a cheap pointwise
function of the cached embeddings (``softplus(w·e + b)``, the model's head row for that gene).

Pieces
------
- :class:`SlideReader` reads a tile's window (core + halo) from the best pyramid level and
  resizes it to the model's µm/px (antialiased), caching decoded slide blocks in a byte-limited
  LRU cache.
- :class:`Predictor` is the interactive engine: :meth:`Predictor.request` schedules the tiles
  covering a region, nearest to its centre first, latest request first; reader threads
  prefetch windows, a worker thread (never the caller's) runs the network in batches and a
  writer thread stores embeddings and reports finished tiles (``on_tile_done`` callback and/or
  a :class:`queue.Queue`).
- :func:`gene_view` / :func:`gene_pyramid` are lazy dask views of one gene (NaN where not yet
  predicted); :func:`ensure_region` predicts what a region needs, blocking, and returns its
  dense map and :class:`~napari_stmap.core.geometry.MapGrid`.
- :func:`predict_slide` / :func:`predict_cohort` run whole slides as one dask graph over blocks
  of tiles, on the threaded scheduler or a ``dask.distributed`` cluster; each worker process
  loads the model once (a per-process cache keyed by model path and tensor hash) and reopens
  the slide and the store by path.

Units: boxes ``bbox_yx = (y0, x0, y1, x1)`` are level-0 px of the slide; tiles are ``(i, j)``
(row, column) in the tile grid of the store's :class:`~napari_stmap.core.tiling.TileSpec`;
maps are (C, H, W) in output px of the store's grid.

Determinism: on the CPU a tile's embedding does not depend on which other tiles share its
batch, so an interrupted and resumed run writes exactly the same store as an uninterrupted one
(on GPUs this holds for a fixed ``batch_size`` only).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import math
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StmapInputError
from .geometry import MapGrid
from .io.slide import Slide, open_slide, resample_window
from .store import (
    DONE,
    SKIPPED,
    TODO,
    LRUCache,
    PredictionStore,
    model_hash,
    open_store,
    read_store_meta,
)
from .tiling import TileSpec, TissueMask, plan_tiles, tissue_mask, tissue_tiles

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "DEFAULT_IMAGE_CACHE_BYTES",
    "LiveGeneView",
    "Predictor",
    "SlideReader",
    "embed_windows",
    "ensure_region",
    "gene_pyramid",
    "gene_view",
    "model_cache_info",
    "predict_cohort",
    "predict_slide",
    "region_map",
    "view_grid",
    "ViewWorker",
]

log = logging.getLogger(__name__)

#: Default byte limit of the cache of decoded slide blocks (per slide reader).
DEFAULT_IMAGE_CACHE_BYTES = 64 * 2**20
_PRECISIONS = ("fp32", "bf16", "fp16")
Tile = tuple[int, int]


# ================================================================================ reading
class SlideReader:
    """Reads tile windows at the model's µm/px from one pyramid level.

    Parameters
    ----------
    slide : Slide
        The slide.
    spec : TileSpec
        The tile plan (level, scale and window geometry).
    cache_bytes : int
        Byte limit of the LRU cache of decoded level blocks (the dask chunks of the level).
    """

    def __init__(self, slide: Slide, spec: TileSpec, cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES):
        self.slide = slide
        self.spec = spec
        self._arr = slide.levels[spec.level]
        self._ybounds = np.cumsum((0, *self._arr.chunks[0]))
        self._xbounds = np.cumsum((0, *self._arr.chunks[1]))
        self.cache = LRUCache(cache_bytes)

    def window(self, tile: Tile) -> np.ndarray:
        """The read window of ``tile``: ``(W, W, 3)`` uint8 RGB at model px, white off-slide.

        Read from ``spec.level`` through the block cache and resized by
        :func:`~napari_stmap.core.io.slide.resample_window` (the resampler behind
        :func:`~napari_stmap.core.io.slide.read_at_mpp`); no resize when the level is at the
        model's µm/px.
        """
        y0, x0, y1, x1 = self.spec.window_model(tile)
        return resample_window(self.read_level, (y0, x0), (y1 - y0, x1 - x0), self.spec.scale)

    def read_level(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Level px ``[y0, y1) × [x0, x1)`` of ``spec.level`` as (h, w, 3) uint8; white outside."""
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        ys, xs = self._ybounds, self._xbounds
        cy0, cy1 = max(y0, 0), min(y1, int(ys[-1]))
        cx0, cx1 = max(x0, 0), min(x1, int(xs[-1]))
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        for bi in range(
            np.searchsorted(ys, cy0, "right") - 1, np.searchsorted(ys, cy1 - 1, "right")
        ):
            for bj in range(
                np.searchsorted(xs, cx0, "right") - 1, np.searchsorted(xs, cx1 - 1, "right")
            ):
                block = self._block(bi, bj)
                by, bx = int(ys[bi]), int(xs[bj])
                a0, a1 = max(cy0, by), min(cy1, by + block.shape[0])
                b0, b1 = max(cx0, bx), min(cx1, bx + block.shape[1])
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = block[
                    a0 - by : a1 - by, b0 - bx : b1 - bx
                ]
        return out

    def _block(self, bi: int, bj: int) -> np.ndarray:
        def load() -> np.ndarray:
            return np.asarray(self._arr.blocks[bi, bj].compute(scheduler="sync"))

        return self.cache.get_or_compute((int(bi), int(bj)), load)


# ============================================================================== inference
def _torch_device(device: Any) -> Any:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {device!r}: CUDA is not available here; use device='cpu'"
        raise StmapInputError(msg)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        msg = f"device {device!r}: MPS is not available here; use device='cpu'"
        raise StmapInputError(msg)
    return dev


def _autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision not in _PRECISIONS:
        msg = f"precision must be one of {_PRECISIONS}, got {precision!r}"
        raise StmapInputError(msg)
    if precision == "fp32" or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _ready_model(model: Any, device: Any) -> Any:
    """Move ``model`` to ``device`` in eval mode (channels_last weights on CUDA)."""
    import torch

    kind = getattr(model, "input_kind", "dense")
    if kind != "dense":
        arch = getattr(model, "arch", "?")
        how = (
            "one value per bin: predict it with napari_stmap.core.bins.predict_bin_region, "
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


def embed_windows(
    model: Any, images: np.ndarray, spec: TileSpec, device: Any, precision: str = "fp32"
) -> np.ndarray:
    """Run the network on a batch of windows and keep each core's output.

    Parameters
    ----------
    images : numpy.ndarray
        ``(B, W, W, 3)`` uint8 RGB windows at model px (``W = spec.window_px``).

    Returns
    -------
    numpy.ndarray
        ``(B, D, T/s, T/s)`` float32 embeddings of the cores (``T = spec.tile_px``).
    """
    import torch

    hs, to = spec.halo_px // spec.stride, spec.out_tile_px
    with torch.inference_mode(), _autocast(device, precision):
        x = torch.from_numpy(np.ascontiguousarray(images))
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        e = model.embed(x)[:, :, hs : hs + to, hs : hs + to]
        return e.float().cpu().numpy()


# =============================================================================== pipeline
_END, _FLUSH, _EMPTY = object(), object(), object()


def _put(q: queue.Queue, item: Any, halt: threading.Event) -> bool:
    """Put ``item`` unless ``halt`` is set first; True if it was put."""
    while not halt.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


_IO_POOL: list[Any] = []
_IO_POOL_LOCK = threading.Lock()


def _spawn(fn: Callable, args: tuple, name: str, pooled: bool) -> Callable[[], None]:
    """Run ``fn(*args)`` on a new daemon thread or the shared I/O pool; returns a join."""
    if not pooled:
        thread = threading.Thread(target=fn, args=args, daemon=True, name=name)
        thread.start()
        return thread.join
    from concurrent.futures import ThreadPoolExecutor

    with _IO_POOL_LOCK:
        if not _IO_POOL:
            _IO_POOL.append(ThreadPoolExecutor(max_workers=64, thread_name_prefix="stmap-io"))
    future = _IO_POOL[0].submit(fn, *args)
    return future.result


def shutdown_io_pool() -> None:
    """Join the idle threads of the shared whole-slide I/O pool (a later task makes a new one).

    The viewer calls it when it closes, so no thread of ours outlives the viewer.
    """
    with _IO_POOL_LOCK:
        pools = list(_IO_POOL)
        _IO_POOL.clear()
    for pool in pools:
        pool.shutdown(wait=True)


class _ListFeed:
    """Feeds a fixed list of tiles to a :class:`_Pipeline` (whole-slide tasks)."""

    def __init__(self, tiles: Iterable[Tile]) -> None:
        self._tiles = iter(list(tiles))
        self._lock = threading.Lock()
        self.written = 0

    def next(self, block: bool, halt: threading.Event) -> tuple[Tile, int] | None:
        with self._lock:
            tile = next(self._tiles, None)
        return None if tile is None else (tile, 0)

    def keep(self, tile: Tile, tag: int) -> bool:
        return True

    def finished(self, tile: Tile, tag: int, ok: bool) -> None:
        self.written += int(ok)


class _Pipeline:
    """Read → infer → write, overlapped: reader threads prefetch windows, the calling thread
    runs the network in batches, a writer thread stores embeddings (chunk, then done flag).

    A *feed* supplies tiles: ``next(block, halt)`` returns ``(tile, tag)``, ``_EMPTY`` (nothing
    right now; only when ``block`` is False) or None (finished); ``keep(tile, tag)`` says whether
    a prefetched tile is still wanted; ``finished(tile, tag, ok)`` is called once per tile
    taken, after its write (``ok``) or when it is dropped.
    """

    def __init__(
        self,
        model: Any,
        reader: SlideReader,
        store: PredictionStore,
        *,
        batch_size: int,
        device: Any,
        precision: str = "fp32",
        readers: int = 1,
    ) -> None:
        self.model, self.reader, self.store = model, reader, store
        self.batch_size = max(1, int(batch_size))
        self.device, self.precision = device, precision
        self.readers = max(1, int(readers))
        self._write_error: BaseException | None = None

    def run(self, feed: Any, stop: threading.Event | None = None, *, pooled: bool = False) -> None:
        """Process tiles from ``feed`` until it is exhausted or ``stop`` is set.

        ``pooled``: run the reader and writer loops on this process's shared I/O thread pool
        (for short runs, e.g. dask tasks: threads are reused, so memory held by the
        allocator's per-thread arenas does not grow with the number of tasks) instead of
        threads of their own (long runs: a :class:`Predictor`).
        """
        halt = threading.Event()
        q_in: queue.Queue = queue.Queue(maxsize=2 * self.batch_size)
        q_out: queue.Queue = queue.Queue(maxsize=2)
        self._write_error = None
        readers = [
            _spawn(self._read_loop, (feed, q_in, halt), f"stmap-reader-{k}", pooled)
            for k in range(self.readers)
        ]
        writer = _spawn(self._write_loop, (feed, q_out), "stmap-writer", pooled)
        try:
            self._compute_loop(feed, q_in, q_out, stop or threading.Event())
        finally:
            halt.set()
            for join in readers:
                join()
            self._drop_pending(feed, q_in)
            q_out.put(_END)
            writer()
        if self._write_error is not None:
            raise self._write_error

    def _read_loop(self, feed: Any, q_in: queue.Queue, halt: threading.Event) -> None:
        while not halt.is_set():
            item = feed.next(False, halt)
            if item is _EMPTY:
                if not _put(q_in, _FLUSH, halt):
                    break
                item = feed.next(True, halt)
            if item is None or item is _EMPTY:
                break
            tile, tag = item
            try:
                image = self.reader.window(tile)
            except Exception as exc:  # handed to the compute thread, which raises it
                feed.finished(tile, tag, False)
                _put(q_in, ("error", exc), halt)
                break
            if not _put(q_in, (tile, tag, image), halt):
                feed.finished(tile, tag, False)
                break
        _put(q_in, _END, halt)

    def _compute_loop(
        self, feed: Any, q_in: queue.Queue, q_out: queue.Queue, stop: threading.Event
    ) -> None:
        batch: list[tuple[Tile, int, np.ndarray]] = []
        ended = 0
        try:
            while ended < self.readers and not stop.is_set() and self._write_error is None:
                try:
                    item = q_in.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    ended += 1
                elif item is _FLUSH or isinstance(item[0], str):
                    batch = self._flush(feed, batch, q_out)
                    if item is not _FLUSH:
                        raise item[1]
                else:
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        batch = self._flush(feed, batch, q_out)
        except BaseException:
            for tile, tag, _ in batch:  # never inferred: release them
                feed.finished(tile, tag, False)
            raise
        self._flush(feed, batch, q_out)

    def _flush(self, feed: Any, batch: list, q_out: queue.Queue) -> list:
        """Infer the tiles of ``batch`` still wanted and hand them to the writer; returns []."""
        kept = []
        for tile, tag, image in batch:
            if feed.keep(tile, tag):
                kept.append((tile, tag, image))
            else:
                feed.finished(tile, tag, False)
        if kept:
            images = np.stack([k[2] for k in kept])
            try:
                emb = embed_windows(
                    self.model, images, self.reader.spec, self.device, self.precision
                )
            except BaseException:
                for tile, tag, _ in kept:
                    feed.finished(tile, tag, False)
                raise
            q_out.put([(tile, tag, e) for (tile, tag, _), e in zip(kept, emb, strict=True)])
        return []

    def _write_loop(self, feed: Any, q_out: queue.Queue) -> None:
        while (item := q_out.get()) is not _END:
            for tile, tag, emb in item:
                ok = False
                if self._write_error is None:
                    try:
                        self.store.write_tile(tile, emb)
                        ok = True
                    except BaseException as exc:
                        self._write_error = exc
                feed.finished(tile, tag, ok)

    @staticmethod
    def _drop_pending(feed: Any, q_in: queue.Queue) -> None:
        while True:
            try:
                item = q_in.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple) and not isinstance(item[0], str):
                feed.finished(item[0], item[1], False)


# ============================================================================== scheduler
class _Scheduler:
    """Priority queue of tiles for a :class:`Predictor` (thread-safe; a pipeline feed).

    Order: higher ``priority`` first, then the latest request, then distance of the tile's
    centre to the request's centre. :meth:`cancel` empties the queue and bumps a generation so
    tiles already prefetched are dropped before inference.
    """

    def __init__(self, store: PredictionStore, on_finished: Callable[[Tile, bool], None]) -> None:
        self.store = store
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._heap: list[tuple] = []
        self._keys: dict[Tile, tuple] = {}
        self._inflight: dict[Tile, int] = {}
        self._seq = itertools.count()
        self.generation = 0
        self.paused = False
        self.closed = False

    def push(self, tiles: Sequence[Tile], dists: Sequence[float], priority: float) -> int:
        seq = next(self._seq)
        n = 0
        with self._cond:
            for tile, dist in zip(tiles, dists, strict=True):
                if self.store.state(tile) != TODO or self._inflight.get(tile) == self.generation:
                    continue
                key = (-float(priority), -seq, float(dist), tile)
                self._keys[tile] = key
                heapq.heappush(self._heap, key)
                n += 1
            if len(self._heap) > 4 * len(self._keys) + 64:  # drop superseded entries
                self._heap = list(self._keys.values())
                heapq.heapify(self._heap)
            self._cond.notify_all()
        return n

    def next(self, block: bool, halt: threading.Event) -> tuple[Tile, int] | None | object:
        with self._cond:
            while True:
                if self.closed or halt.is_set():
                    return None
                if not self.paused:
                    item = self._pop()
                    if item is not None:
                        return item
                if not block:
                    return _EMPTY
                self._cond.wait(0.1)

    def _pop(self) -> tuple[Tile, int] | None:
        while self._heap:
            key = heapq.heappop(self._heap)
            tile = key[3]
            if self._keys.get(tile) != key:
                continue  # superseded by a later request
            del self._keys[tile]
            if self.store.state(tile) != TODO:
                continue
            self._inflight[tile] = self.generation
            return tile, self.generation
        return None

    def keep(self, tile: Tile, tag: int) -> bool:
        return tag == self.generation and not self.closed

    def finished(self, tile: Tile, tag: int, ok: bool) -> None:
        self._on_finished(tile, ok)  # before the tile stops counting as pending
        with self._cond:
            if self._inflight.get(tile) == tag:
                del self._inflight[tile]
            self._cond.notify_all()

    def cancel(self) -> int:
        with self._cond:
            n = len(self._keys)
            self._heap.clear()
            self._keys.clear()
            self.generation += 1
            self._cond.notify_all()
        return n

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Tiles queued or in flight."""
        with self._cond:
            return len(self._keys) + len(self._inflight)

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


# ============================================================================== predictor
class Predictor:
    """Interactive, prioritised tile prediction into a store.

    Parameters
    ----------
    slide : Slide or path
        The slide (opened with :func:`~napari_stmap.core.io.slide.open_slide` if a path).
    model : StmapModel or path
        A dense model, or its ``.safetensors`` file (loaded once). A model object is moved to
        ``device`` and put in eval mode.
    store_path : path
        Prediction store (created, or resumed if it holds this model's predictions on this
        slide; any other store is refused, see :func:`~napari_stmap.core.store.open_store`).
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    batch_size : int
        Tiles per forward pass.
    tile_px, halo_px : int, optional
        Tile core side and halo in model px (default: the store's, else
        :func:`~napari_stmap.core.tiling.default_tile_px` and the model's ``halo_px``).
    tissue : bool or TissueMask
        Skip tiles off tissue (mask from a low pyramid level, dilated by one halo); False
        predicts every tile.
    on_tile_done : callable, optional
        ``on_tile_done((i, j))`` after each tile is stored, from the writer thread (keep it
        short; it may call :meth:`request` or :meth:`cancel`, never :meth:`wait` or
        :meth:`close`). If it raises, the error is logged, pending work is cancelled and
        :meth:`wait` re-raises it.
    done_queue : queue.Queue, optional
        Receives ``(i, j)`` of each stored tile (for a GUI thread to poll).
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype on GPUs (the CPU always runs fp32).
    dtype : {"float16", "float32"}
        Embedding dtype of a new store.
    readers : int
        Prefetch threads reading and resampling tiles.
    image_cache_bytes : int
        Byte limit of the decoded slide-block cache.
    paused : bool
        Start paused (requests queue up until :meth:`resume`).
    num_threads : int, optional
        CPU threads of the network: ``torch.set_num_threads`` called in the worker thread
        (torch applies it there and to threads started later, not to running ones). A GUI
        passes ``cores - 1`` so its thread keeps a core: torch's OpenMP threads spin at
        barriers. None leaves torch's setting.

    Notes
    -----
    Threads: ``readers`` prefetch threads, one worker thread that owns the network, one writer
    thread. Nothing heavy runs on the caller's thread. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        slide: Slide | str | Path,
        model: Any,
        store_path: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        tile_px: int | None = None,
        halo_px: int | None = None,
        tissue: bool | TissueMask = True,
        on_tile_done: Callable[[Tile], Any] | None = None,
        done_queue: queue.Queue | None = None,
        precision: str = "fp32",
        dtype: str = "float16",
        readers: int = 1,
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
        paused: bool = False,
        num_threads: int | None = None,
    ) -> None:
        self.device = _torch_device(device)
        self._num_threads = None if num_threads is None else max(1, int(num_threads))
        self.slide = _as_slide(slide)
        model_path = None if hasattr(model, "embed") else Path(model)
        self.model = _ready_model(_as_model(model), self.device)
        self.spec = _plan_for_store(self.slide, self.model, store_path, tile_px, halo_px)
        self.store = open_store(
            store_path, self.model, self.slide, self.spec, "a", dtype=dtype, model_path=model_path
        )
        self._on_tissue = _tissue_grid(self.slide, self.spec, tissue)
        self._tissue_arg = tissue
        self._display_mask: TissueMask | None | bool = False  # False: not computed yet
        self.reader = SlideReader(self.slide, self.spec, image_cache_bytes)
        self.on_tile_done, self.done_queue = on_tile_done, done_queue
        self._error: BaseException | None = None
        self._scheduler = _Scheduler(self.store, self._tile_finished)
        self._scheduler.set_paused(paused)
        self._stop = threading.Event()
        self._pipeline = _Pipeline(
            self.model,
            self.reader,
            self.store,
            batch_size=batch_size,
            device=self.device,
            precision=precision,
            readers=readers,
        )
        self._worker = threading.Thread(target=self._work, daemon=True, name="stmap-predictor")
        self._worker.start()

    # --- description --------------------------------------------------------------------
    @property
    def grid(self) -> MapGrid:
        """Where the output map lies (level-0 px)."""
        return self.spec.grid

    @property
    def output_names(self) -> tuple[str, ...]:
        """Genes, then ``"total"``."""
        return self.store.output_names

    @property
    def pending(self) -> int:
        """Tiles queued or in flight."""
        return self._scheduler.pending

    # --- scheduling ---------------------------------------------------------------------
    def request(self, bbox_yx: Sequence[float] | None = None, priority: float = 0) -> int:
        """Schedule the tiles covering a level-0 px box (default: the whole slide).

        Tiles run nearest to the box's centre first; a later request (or a higher
        ``priority``) goes before earlier ones. Tiles done, queued or off tissue are not
        queued again (off-tissue ones are flagged skipped). Returns the number queued.
        """
        box = (0.0, 0.0, *map(float, self.slide.shape_yx)) if bbox_yx is None else tuple(bbox_yx)
        tiles = self.spec.tiles_in_bbox(box)
        off = [t for t in tiles if not self._on_tissue[t]]
        if off:
            self.store.mark_skipped(off)
        tiles = [t for t in tiles if self._on_tissue[t]]
        cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        dists = [math.dist(self.spec.tile_center_level0(t), (cy, cx)) for t in tiles]
        return self._scheduler.push(tiles, dists, priority)

    def cancel(self) -> int:
        """Drop all queued tiles (tiles being inferred are still written); returns how many."""
        n = self._scheduler.cancel()
        log.debug("cancelled %d queued tiles", n)
        return n

    def pause(self) -> None:
        """Stop taking new tiles (the batch in flight finishes)."""
        self._scheduler.set_paused(True)

    def resume(self) -> None:
        """Take tiles again after :meth:`pause` (or ``paused=True``)."""
        self._scheduler.set_paused(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight; False on timeout.

        Raises the error of a failed tile or callback (once).
        """
        ok = self._scheduler.wait_for(
            lambda: self._scheduler.pending == 0 or self._error is not None, timeout
        )
        self._raise_error()
        return ok

    def wait_tiles(self, tiles: Iterable[Tile], timeout: float | None = None) -> bool:
        """Block until ``tiles`` are done or skipped; False on timeout.

        Raises
        ------
        StmapInputError
            When the work stops (cancelled) before they are done.
        """
        tiles = list(tiles)
        sched = self._scheduler

        def settled() -> bool:
            return (
                self._error is not None
                or all(self.store.state(t) != TODO for t in tiles)
                or sched.pending == 0
            )

        ok = sched.wait_for(settled, timeout)
        self._raise_error()
        if ok and any(self.store.state(t) == TODO for t in tiles):
            msg = "prediction was cancelled before the region was complete; request it again"
            raise StmapInputError(msg)
        return ok

    def close(self) -> None:
        """Cancel pending work, stop and join the threads (idempotent)."""
        self._scheduler.cancel()
        self._scheduler.close()
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- views --------------------------------------------------------------------------
    def display_mask(self) -> TissueMask | None:
        """Tissue mask for heatmaps: predictions on glass are hidden (``None``: show all).

        The slide's tissue mask dilated by :data:`DISPLAY_MASK_MARGIN_UM` (computed once, on
        the caller's thread: call it from a worker). ``None`` when the predictor was made with
        ``tissue=False``. Predictions themselves (store, region sums) are never masked.
        """
        if self._display_mask is False:
            tissue = self._tissue_arg
            if tissue is False or tissue is None:
                self._display_mask = None
            elif isinstance(tissue, TissueMask):
                self._display_mask = tissue
            else:
                self._display_mask = tissue_mask(self.slide, dilate_um=DISPLAY_MASK_MARGIN_UM)
        return self._display_mask

    def gene_view(
        self,
        gene: str | int,
        *,
        mode: str = "normalised",
        level: int = 0,
        background: float = np.nan,
    ) -> da.Array:
        """Lazy view of one gene over the whole output grid (see :func:`gene_view`)."""
        return gene_view(self.store, gene, mode=mode, level=level, background=background)

    def gene_pyramid(
        self, gene: str | int, mode: str = "normalised", *, background: float = np.nan
    ) -> list[da.Array]:
        """Multiscale lazy views of one gene (see :func:`gene_pyramid`)."""
        return gene_pyramid(self.store, gene, mode, background=background)

    # --- threads ------------------------------------------------------------------------
    def _work(self) -> None:
        if self._num_threads is not None and self.device.type == "cpu":
            import torch

            torch.set_num_threads(self._num_threads)
        while not self._stop.is_set() and not self._scheduler.closed:
            try:
                self._pipeline.run(self._scheduler, self._stop)
            except BaseException as exc:
                log.exception("tile prediction failed")
                self._fail(exc)

    def _tile_finished(self, tile: Tile, ok: bool) -> None:
        if not ok:
            return
        if self.done_queue is not None:
            self.done_queue.put(tile)
        if self.on_tile_done is not None:
            try:
                self.on_tile_done(tile)
            except BaseException as exc:
                log.exception("on_tile_done(%s) raised; cancelling pending tiles", tile)
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._scheduler.cancel()

    def _raise_error(self) -> None:
        exc, self._error = self._error, None
        if exc is not None:
            raise exc


def _as_slide(slide: Any) -> Slide:
    return slide if hasattr(slide, "levels") else open_slide(slide)


def _as_model(model: Any) -> Any:
    from napari_stmap.core.model import load_model

    return model if hasattr(model, "embed") else load_model(model)


def _plan_for_store(
    slide: Slide, model: Any, store_path: Any, tile_px: int | None, halo_px: int | None
) -> TileSpec:
    """Whole-slide plan; unset tile size/halo come from an existing store."""
    meta = read_store_meta(store_path)
    if meta is not None:
        tile_px = tile_px or int(meta["spec"]["tile_px"])
        halo_px = int(meta["spec"]["halo_px"]) if halo_px is None else halo_px
    return plan_tiles(slide, model, tile_px=tile_px, halo_px=halo_px)


#: Margin around tissue kept in displayed heatmaps, µm (one mask pixel of the default mask).
DISPLAY_MASK_MARGIN_UM = 8.0


def _tissue_grid(slide: Slide, spec: TileSpec, tissue: bool | TissueMask) -> np.ndarray:
    """Bool tile grid: which tiles touch tissue (mask dilated by one halo)."""
    if tissue is False or tissue is None:
        return np.ones(spec.grid_shape, dtype=bool)
    mask = (
        tissue
        if isinstance(tissue, TissueMask)
        else tissue_mask(slide, dilate_um=spec.halo_px * spec.model_mpp)
    )
    return tissue_tiles(mask, spec)


# ================================================================================= views
_MODES = ("normalised", "absolute")


def _as_store(source: Any) -> PredictionStore:
    if isinstance(source, Predictor):
        return source.store
    if isinstance(source, PredictionStore):
        return source
    return open_store(source, mode="r")


def _softplus_rows(emb: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``softplus(w @ e + b)``: (k, D) rows on a (D, h, w) embedding -> (k, h, w) float32.

    A few rows go through ``einsum`` (several times faster than BLAS for such skinny
    products); softplus is torch's (linear above 20).
    """
    d, h, wd = emb.shape
    flat = emb.reshape(d, -1)
    z = np.einsum("kd,dp->kp", w, flat) if len(w) <= 8 else w @ flat
    z += b[:, None]
    return _softplus(z).reshape(-1, h, wd)


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log1p(exp(z))``, and ``z`` where ``z > 20`` (as ``torch.nn.functional.softplus``)."""
    out = _log1p(np.exp(np.minimum(z, np.float32(20.0))))
    np.copyto(out, z, where=z > 20)
    return out


def _log1p(x: np.ndarray) -> np.ndarray:
    """``log1p`` of float32 ``x >= 0`` to a few ulps, ~5x faster than numpy's (not SIMD).

    Goldberg's trick: ``log(u) · x / (u - 1)`` with ``u = 1 + x`` rounded; ``x`` where
    ``u == 1``.
    """
    x = np.asarray(x, dtype=np.float32)
    u = 1 + x
    d = u - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(u) * (x / d)
    np.copyto(out, x, where=d == 0)
    return out


def _channel_tile(
    store: PredictionStore, rows: tuple[int, ...], tile: Tile, cached: bool = True
) -> np.ndarray | None:
    """Expected counts (k, h, w) of output channels ``rows`` on a done tile, else None."""
    key = (rows, tile)
    vals = store.view_cache.get(key) if cached else None
    if vals is None:
        emb = store.read_embedding(tile)
        if emb is None:
            return None
        vals = _softplus_rows(emb, store.head_weight[list(rows)], store.head_bias[list(rows)])
        if cached:
            store.view_cache.put(key, vals)
    return vals


def _pool(a: np.ndarray, k: int, how: str) -> np.ndarray:
    """(c, h, w) -> (c, ceil(h/k), ceil(w/k)) by mean or sum of k × k blocks (NaN-padded)."""
    c, h, w = a.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    if (hp, wp) != (h, w):
        a = np.pad(a, ((0, 0), (0, hp - h), (0, wp - w)), constant_values=np.nan)
    blocks = a.reshape(c, hp // k, k, wp // k, k)
    return (np.nanmean if how == "mean" else np.nansum)(blocks, axis=(2, 4)).astype(np.float32)


def _view_block(
    store: PredictionStore,
    rows: tuple[int, ...],
    mode: str,
    level: int,
    background: float,
    i: int,
    j: int,
) -> np.ndarray:
    """One chunk of a gene view: tile (i, j) at pyramid ``level``, (h, w) float32.

    Each channel's tile is computed and cached on its own, so the total channel of the
    normalised view is computed once per tile and shared by every gene.
    """
    tile = (i, j)
    vals = [_channel_tile(store, (r,), tile) for r in rows]
    k = 2**level
    if any(v is None for v in vals):
        r, c = store.spec.output_slices(tile)
        shape = (-(-(r.stop - r.start) // k), -(-(c.stop - c.start) // k))
        fill = background if store.state(tile) == SKIPPED else np.nan
        return np.full(shape, fill, dtype=np.float32)
    if level:
        vals = [_pool(v, k, "mean" if mode == "absolute" else "sum") for v in vals]
    if mode == "absolute":
        return vals[0][0]
    return _log1p(np.float32(1e4) * vals[0][0] / vals[1][0])


def gene_view(
    source: Any,
    gene: str | int,
    *,
    mode: str = "normalised",
    level: int = 0,
    background: float = np.nan,
) -> da.Array:
    """Lazy map of one gene from cached embeddings (the network never runs).

    Parameters
    ----------
    source : Predictor, PredictionStore or path of a store
        Where the embeddings are.
    gene : str or int
        Gene name (or ``"total"``) or output channel index.
    mode : {"normalised", "absolute"}
        ``"absolute"``: expected counts per output pixel, ``softplus(w·e + b)``.
        ``"normalised"``: ``log1p(1e4 · gene / total)`` per pixel (the total channel's row
        gives the denominator).
    level : int
        Pyramid level: output pixels are ``2**level`` × ``2**level`` level-0 output pixels.
        Absolute values are the *mean* over the block (units stay counts per level-0 output
        pixel, so one colour scale serves all levels); normalised values are computed after
        *summing* gene and total over the block (as for any spot, see ``DESIGN.md``).
    background : float
        Value of tiles skipped as off-tissue (default NaN, like tiles not yet predicted).

    Returns
    -------
    dask.array.Array
        ``(H_out, W_out)`` float32 (ceil-divided by ``2**level``), one chunk per tile; NaN
        where the tile is not yet predicted. Chunks read embeddings through the store's LRU
        cache and the computed gene chunks through its view cache. :func:`view_grid` gives
        where it lies.

    Notes
    -----
    The graph holds the open store, so compute views in this process: with a
    ``dask.distributed`` Client as the default scheduler, use ``.compute(scheduler="threads")``.
    """
    import dask.array as da

    store = _as_store(source)
    if mode not in _MODES:
        msg = f"mode must be one of {_MODES}, got {mode!r}"
        raise StmapInputError(msg)
    _check_level(store.spec, level)
    g = store.channel_index(gene)
    rows = (g,) if mode == "absolute" else (g, len(store.output_names) - 1)
    spec, k = store.spec, 2**level
    ys = [spec.output_slices((i, 0))[0] for i in range(spec.grid_shape[0])]
    xs = [spec.output_slices((0, j))[1] for j in range(spec.grid_shape[1])]
    chunks = tuple(tuple(-(-(s.stop - s.start) // k) for s in sl) for sl in (ys, xs))
    name = f"stmap-{mode}-{g}-L{level}-{uuid.uuid4().hex[:12]}"
    fn = functools.partial(_view_block, store, rows, mode, level, float(background))
    dsk = {(name, i, j): (fn, i, j) for i, j in spec.tiles()}
    return da.Array(dsk, name, chunks, dtype=np.float32)


def _check_level(spec: TileSpec, level: int) -> None:
    top = _max_level(spec)
    if not (isinstance(level, (int, np.integer)) and 0 <= level <= top):
        msg = f"level must be an integer in 0..{top} for tiles of {spec.out_tile_px} output px, got {level!r}"
        raise StmapInputError(msg)


def _max_level(spec: TileSpec) -> int:
    """Deepest level whose 2**level divides a tile's output side."""
    t, n = spec.out_tile_px, 0
    while t % 2 == 0 and t > 1:
        t //= 2
        n += 1
    return n


def gene_pyramid(
    source: Any,
    gene: str | int,
    mode: str = "normalised",
    *,
    background: float = np.nan,
    min_px: int = 256,
) -> list[da.Array]:
    """Multiscale lazy views of one gene for napari (``multiscale=True``), finest first.

    Levels halve the map (2 × 2 blocks: mean for ``"absolute"``, sum-then-normalise for
    ``"normalised"``, see :func:`gene_view`) until its longest side is at most ``min_px`` or a
    tile's output can be halved no more. Level ``k`` has pixels ``2**k`` times larger
    (:func:`view_grid`).
    """
    store = _as_store(source)
    levels = _pyramid_levels(store.spec, min_px)
    return [gene_view(store, gene, mode=mode, level=k, background=background) for k in levels]


def _pyramid_levels(spec: TileSpec, min_px: int) -> list[int]:
    """Levels 0, 1, … until the longest side is at most ``min_px`` or tiles halve no more."""
    top, levels = _max_level(spec), [0]
    while levels[-1] < top and max(spec.out_shape_hw) / 2 ** levels[-1] > min_px:
        levels.append(levels[-1] + 1)
    return levels


def view_grid(source: Any, level: int = 0) -> MapGrid:
    """Where level ``level`` of a gene view lies: origin and pixel size in level-0 px."""
    store = _as_store(source)
    grid, k = store.grid, 2**level
    h, w = grid.shape_hw
    return MapGrid(grid.origin_yx, grid.pixel_px * k, (-(-h // k), -(-w // k)))


# ============================================================================= live views
#: Default byte limit of the blocks a :class:`LiveGeneView` keeps (per view).
DEFAULT_LIVE_CACHE_BYTES = 96 * 2**20


class ViewWorker:
    """A background thread computing the blocks of :class:`LiveGeneView` s for a GUI.

    Blocks run newest read first (a read is what a view shows now), nearest the centre of the
    read first within it; reads of the thumbnail kind (priority 1) wait behind on-screen ones.
    A GUI thread never waits on it. :meth:`close` joins the thread (or use ``with``).
    """

    def __init__(self, name: str = "stmap-views") -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple] = []
        self._entries: dict[tuple, tuple] = {}  # (id(view), level, tile) -> heap entry
        self._seq = itertools.count()
        self._running: tuple | None = None
        self.closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self._thread.start()

    def submit(
        self, view: LiveGeneView, level: int, tiles: Sequence[Tile], priority: int = 0
    ) -> None:
        """Queue blocks ``(level, tile)`` of ``view``, ``tiles`` most important first."""
        with self._cond:
            if self.closed:
                return
            seq = next(self._seq)
            for rank, tile in enumerate(tiles):
                ident = (id(view), int(level), (int(tile[0]), int(tile[1])))
                entry = (int(priority), -seq, rank, ident, view)
                self._entries[ident] = entry
                heapq.heappush(self._heap, entry)
            if len(self._heap) > 4 * len(self._entries) + 64:  # drop superseded entries
                self._heap = list(self._entries.values())
                heapq.heapify(self._heap)
            self._cond.notify_all()

    def cancel(self, view: LiveGeneView) -> None:
        """Drop the queued blocks of ``view`` (a block being computed still finishes)."""
        with self._cond:
            for ident in [k for k in self._entries if k[0] == id(view)]:
                del self._entries[ident]

    @property
    def pending(self) -> int:
        """Blocks queued or being computed."""
        with self._cond:
            return len(self._entries) + (self._running is not None)

    def pending_for(self, view: LiveGeneView) -> int:
        """Blocks of ``view`` queued or being computed."""
        key = id(view)
        with self._cond:
            running = self._running is not None and self._running[0] == key
            return sum(1 for k in self._entries if k[0] == key) + running

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``predicate()`` holds, checked after each block; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.closed or predicate(), timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.closed or (not self._entries and self._running is None), timeout
            )

    def close(self) -> None:
        """Drop queued blocks and join the thread (idempotent)."""
        with self._cond:
            self.closed = True
            self._heap.clear()
            self._entries.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> ViewWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pop(self) -> tuple | None:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._entries.get(entry[3]) is entry:
                del self._entries[entry[3]]
                return entry
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                entry = None if self.closed else self._pop()
                while entry is None and not self.closed:
                    self._cond.wait()
                    entry = self._pop()
                if self.closed:
                    return
                self._running = entry[3]
            _, _, _, (_, level, tile), view = entry
            try:
                view._compute(level, tile)
            except Exception as exc:  # reported by the view (the GUI shows it)
                log.exception("computing block %s of level %d failed", tile, level)
                view.error = exc
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
                    last = not any(k[0] == id(view) for k in self._entries)
            if last and view.on_update is not None:  # its queue is empty: wake the GUI
                try:
                    view.on_update()
                except Exception:  # the GUI is gone (it polls take_updated() anyway)
                    log.debug("on_update failed", exc_info=True)


class LiveGeneView:
    """Multiscale map of one gene for a GUI thread: a read never computes, it returns what is ready.

    :attr:`arrays` (finest first, levels as :func:`gene_pyramid`) are read-only numpy-like
    arrays (``shape``, ``dtype``, ``__getitem__``, ``__array__``) for napari
    (``multiscale=True``). A read returns the blocks computed so far, NaN where a tile is not
    predicted yet or its block is still being computed, and hands the missing blocks to
    ``worker`` (a :class:`ViewWorker`); once some are ready :meth:`take_updated` is True and
    the GUI reads again (refreshes the layer). :meth:`tiles_done` recomputes the blocks of
    newly predicted tiles that the latest read of a level showed. Values equal
    :func:`gene_view`'s (same modes, levels, background); the network never runs.

    Parameters
    ----------
    source : Predictor, PredictionStore or path of a store
        Where the embeddings are.
    gene : str or int
        Gene name (or ``"total"``) or output channel index.
    mode : {"normalised", "absolute"}
        As :func:`gene_view`.
    worker : ViewWorker
        Computes the blocks (shared by the views of one GUI).
    background : float
        Value of tiles skipped as off-tissue.
    min_px : int
        Coarsest level: longest side at most this many pixels (as :func:`gene_pyramid`).
    cache_bytes : int
        Byte limit of the computed blocks kept (LRU).
    on_update : callable, optional
        ``on_update()`` from the worker thread when blocks are ready and no other block of
        this view is queued: a GUI wakes up without polling (keep it short, e.g. emit a Qt
        signal).
    mask : TissueMask, optional
        Show only pixels whose centre is on this mask (NaN, transparent, elsewhere), e.g.
        :meth:`Predictor.display_mask`: a tile that touches tissue is predicted in full, but
        its values on glass mean nothing to a reader.
    """

    def __init__(
        self,
        source: Any,
        gene: str | int,
        mode: str = "normalised",
        *,
        worker: ViewWorker,
        background: float = np.nan,
        min_px: int = 256,
        cache_bytes: int = DEFAULT_LIVE_CACHE_BYTES,
        on_update: Callable[[], Any] | None = None,
        mask: TissueMask | None = None,
    ) -> None:
        store = _as_store(source)
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}"
            raise StmapInputError(msg)
        g = store.channel_index(gene)
        self.store, self.gene, self.mode, self.worker = store, gene, mode, worker
        self.rows = (g,) if mode == "absolute" else (g, len(store.output_names) - 1)
        self.background = float(background)
        self.levels = _pyramid_levels(store.spec, min_px)
        self._bounds = {k: _level_bounds(store.spec, k) for k in self.levels}
        self._cache = LRUCache(cache_bytes)
        self._lock = threading.Lock()
        self._shown: dict[int, set[Tile]] = {}
        self._updated = False
        self.error: BaseException | None = None
        self.closed = False
        self.on_update = on_update
        self.mask = mask
        self.arrays = [_LiveArray(self, k) for k in self.levels]

    # --- GUI side -----------------------------------------------------------------------
    def take_updated(self) -> bool:
        """Whether blocks were computed since the last call (then read again)."""
        with self._lock:
            updated, self._updated = self._updated, False
        return updated

    def tiles_done(self, tiles: Iterable[Tile]) -> int:
        """Tiles were (re)predicted: recompute their blocks that the latest reads showed.

        Returns the number of blocks queued (0: nothing on display changes).
        """
        tiles = {(int(i), int(j)) for i, j in tiles}
        n = 0
        with self._lock:
            shown = {k: v & tiles for k, v in self._shown.items()}
        for level, hits in shown.items():
            for tile in hits:
                self._cache.pop((level, *tile))
            if hits:
                self.worker.submit(self, level, sorted(hits))
                n += len(hits)
        return n

    def close(self) -> None:
        """Forget queued blocks and the cache (the layer is gone)."""
        self.closed = True
        self.worker.cancel(self)
        self._cache.clear()

    # --- blocking (worker threads) ------------------------------------------------------
    def level_data(self, index: int = -1, timeout: float | None = 600.0) -> np.ndarray:
        """Level ``levels[index]`` in full, its predicted blocks computed first.

        Blocks until the worker has computed them (not on a GUI thread; one thread computes
        each block once, the same blocks the display needs). NaN where not predicted.
        """
        level = self.levels[index]
        ys, xs = self._bounds[level]
        tiles = [(i, j) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]

        def missing() -> list[Tile]:
            return [
                t for t in tiles if (level, *t) not in self._cache and self.store.state(t) == DONE
            ]

        todo = missing()
        if todo and not self.closed:
            self.worker.submit(self, level, todo)
            self.worker.wait_for(lambda: self.closed or not missing(), timeout)
        return self._read(level, range(int(ys[-1])), range(int(xs[-1])), submit=False)

    # --- internals ----------------------------------------------------------------------
    def _compute(self, level: int, tile: Tile) -> None:
        key = (level, *tile)
        if self.closed or key in self._cache or self.store.state(tile) != DONE:
            return  # cached: computed meanwhile (e.g. by level_data), nothing new to show
        block = _view_block(self.store, self.rows, self.mode, level, self.background, *tile)
        if self.mask is not None:
            block = self._masked(block, level, tile)
        self._cache.put(key, block)
        with self._lock:
            self._updated = True

    def _masked(self, block: np.ndarray, level: int, tile: Tile) -> np.ndarray:
        """``block`` with NaN where the centre of a pixel is off :attr:`mask`."""
        ys, xs = self._bounds[level]
        grid = view_grid(self.store, level)
        mask, (py, px) = self.mask.mask, self.mask.px_yx
        rows = (
            grid.origin_yx[0] + (int(ys[tile[0]]) + np.arange(block.shape[0]) + 0.5) * grid.pixel_px
        )
        cols = (
            grid.origin_yx[1] + (int(xs[tile[1]]) + np.arange(block.shape[1]) + 0.5) * grid.pixel_px
        )
        r, c = np.floor(rows / py).astype(np.int64), np.floor(cols / px).astype(np.int64)
        ok_r, ok_c = (r >= 0) & (r < mask.shape[0]), (c >= 0) & (c < mask.shape[1])
        keep = mask[np.ix_(np.clip(r, 0, mask.shape[0] - 1), np.clip(c, 0, mask.shape[1] - 1))]
        keep &= ok_r[:, None] & ok_c[None, :]
        return np.where(keep, block, np.float32(np.nan)).astype(np.float32, copy=False)

    def _read(self, level: int, ry: range, rx: range, *, submit: bool = True) -> np.ndarray:
        """Rows ``ry`` × columns ``rx`` (step 1) of level ``level`` from the computed blocks."""
        out = np.full((len(ry), len(rx)), np.nan, dtype=np.float32)
        if not len(ry) or not len(rx):
            return out
        ys, xs = self._bounds[level]
        i0, i1 = (
            int(np.searchsorted(ys, ry.start, "right")) - 1,
            int(np.searchsorted(ys, ry.stop - 1, "right")),
        )
        j0, j1 = (
            int(np.searchsorted(xs, rx.start, "right")) - 1,
            int(np.searchsorted(xs, rx.stop - 1, "right")),
        )
        missing: list[Tile] = []
        for i in range(i0, i1):
            a0, a1 = max(ry.start, int(ys[i])), min(ry.stop, int(ys[i + 1]))
            for j in range(j0, j1):
                state = self.store.state((i, j))
                if state == TODO:
                    continue
                b0, b1 = max(rx.start, int(xs[j])), min(rx.stop, int(xs[j + 1]))
                dst = (slice(a0 - ry.start, a1 - ry.start), slice(b0 - rx.start, b1 - rx.start))
                if state == SKIPPED:
                    out[dst] = self.background
                    continue
                block = self._cache.get((level, i, j))
                if block is None:
                    missing.append((i, j))
                else:
                    out[dst] = block[
                        a0 - int(ys[i]) : a1 - int(ys[i]), b0 - int(xs[j]) : b1 - int(xs[j])
                    ]
        if submit:
            with self._lock:
                self._shown[level] = {(i, j) for i in range(i0, i1) for j in range(j0, j1)}
            if missing and not self.closed:
                whole = len(ry) == int(ys[-1]) and len(rx) == int(xs[-1])
                thumb = whole and level == self.levels[-1] and len(self.levels) > 1
                cy, cx = (i0 + i1 - 1) / 2, (j0 + j1 - 1) / 2
                missing.sort(key=lambda t: (t[0] - cy) ** 2 + (t[1] - cx) ** 2)
                self.worker.submit(self, level, missing, priority=int(thumb))
        return out


def _level_bounds(spec: TileSpec, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Block edges (rows, columns) of a gene view's level: one block per tile, ceil-divided."""
    k = 2**level
    ys = [spec.output_slices((i, 0))[0] for i in range(spec.grid_shape[0])]
    xs = [spec.output_slices((0, j))[1] for j in range(spec.grid_shape[1])]
    return tuple(
        np.cumsum([0, *(-(-(s.stop - s.start) // k) for s in sl)]).astype(np.int64)
        for sl in (ys, xs)
    )


class _LiveArray:
    """One level of a :class:`LiveGeneView`: a read-only 2-D float32 array-like."""

    def __init__(self, view: LiveGeneView, level: int) -> None:
        self._view, self.level = view, level
        ys, xs = view._bounds[level]
        self.shape = (int(ys[-1]), int(xs[-1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<live view of {self._view.gene!r} level {self.level}, shape {self.shape}>"

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (2 - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (2 - len(key))
        if len(key) != 2 or not all(isinstance(k, (slice, int, np.integer)) for k in key):
            return np.asarray(self)[key]  # fancy indexing: read everything, then index
        spans, post = [], []
        for k, n in zip(key, self.shape, strict=True):
            r = range(n)[k]
            if isinstance(r, int):
                spans.append(range(r, r + 1))
                post.append(0)
            elif len(r) == 0:
                spans.append(range(0))
                post.append(slice(0, 0))
            else:
                lo = min(r[0], r[-1])
                spans.append(range(lo, max(r[0], r[-1]) + 1))
                stop = r.stop - lo
                post.append(slice(r.start - lo, stop if stop >= 0 else None, r.step))
        return self._view._read(self.level, *spans)[tuple(post)]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype, copy=False)


# ========================================================================= ensure_region
def ensure_region(
    source: Any,
    bbox_yx: Sequence[float],
    *,
    channels: Sequence[str | int] | None = None,
    background: float = np.nan,
    timeout: float | None = None,
    model: Any = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> tuple[np.ndarray, MapGrid]:
    """Predict whatever a region still needs (blocking), then return its dense map.

    Parameters
    ----------
    source : Predictor, PredictionStore or path of a store
        With a store, missing tiles are predicted by a temporary :class:`Predictor` opened from
        the store's metadata (slide path; model path, or ``model=``).
    bbox_yx : (y0, x0, y1, x1)
        Region in level-0 px.
    channels : sequence of str or int, optional
        Output channels (gene names, ``"total"``, indices); default all G + 1.
    background : float
        Value of off-tissue (skipped) tiles; NaN by default.
    timeout : float, optional
        Seconds to wait for the prediction; :class:`TimeoutError` after that.
    model, device, batch_size
        For the temporary predictor (store sources only).

    Returns
    -------
    map_chw : numpy.ndarray
        ``(C, h, w)`` float32 expected counts per output pixel, over the whole output pixels
        that overlap the box (``grid.crop``); memory is proportional to the region.
    grid : MapGrid
        Where ``map_chw`` lies (level-0 px).
    """
    if isinstance(source, Predictor):
        _predict_region(source, bbox_yx, timeout)
        store = source.store
    else:
        store = _as_store(source)
        tiles = store.spec.tiles_in_bbox(bbox_yx)
        if any(store.state(t) == TODO for t in tiles):
            with _predictor_for_store(store, model, device, batch_size) as pred:
                _predict_region(pred, bbox_yx, timeout)
            store.refresh()
    return region_map(store, bbox_yx, channels=channels, background=background)


def _predict_region(pred: Predictor, bbox_yx: Sequence[float], timeout: float | None) -> None:
    pred.request(bbox_yx)
    if not pred.wait_tiles(pred.spec.tiles_in_bbox(bbox_yx), timeout):
        msg = f"region {tuple(bbox_yx)} not predicted within {timeout} s"
        raise TimeoutError(msg)


def _predictor_for_store(
    store: PredictionStore, model: Any, device: str, batch_size: int
) -> Predictor:
    meta = store.meta
    model = model if model is not None else meta["model"].get("path")
    if model is None:
        msg = (
            f"{store.path} does not record its model file; pass model= (the model it was made with)"
        )
        raise StmapInputError(msg)
    slide = open_slide(meta["slide"]["path"], mpp=meta["slide"]["mpp"])
    return Predictor(slide, model, store.path, device=device, batch_size=batch_size)


def region_map(
    source: Any,
    bbox_yx: Sequence[float],
    *,
    channels: Sequence[str | int] | None = None,
    background: float = np.nan,
) -> tuple[np.ndarray, MapGrid]:
    """Dense map ``(C, h, w)`` float32 of a region from the store as it is (NaN where not done).

    See :func:`ensure_region` (which predicts missing tiles first).
    """
    store = _as_store(source)
    names = store.output_names if channels is None else channels
    rows = tuple(store.channel_index(c) for c in names)
    grid = store.grid.crop(tuple(float(v) for v in bbox_yx))
    rs, cs = store.grid.crop_slices(tuple(float(v) for v in bbox_yx))
    out = np.full((len(rows), rs.stop - rs.start, cs.stop - cs.start), np.nan, dtype=np.float32)
    for tile in store.spec.tiles_in_bbox(bbox_yx):
        r, c = store.spec.output_slices(tile)
        ys, ye, xs, xe = (
            max(r.start, rs.start),
            min(r.stop, rs.stop),
            max(c.start, cs.start),
            min(c.stop, cs.stop),
        )
        if ye <= ys or xe <= xs:
            continue
        dst = (
            slice(None),
            slice(ys - rs.start, ye - rs.start),
            slice(xs - cs.start, xe - cs.start),
        )
        vals = _channel_tile(store, rows, tile, cached=False)
        if vals is not None:
            out[dst] = vals[:, ys - r.start : ye - r.start, xs - c.start : xe - c.start]
        elif store.state(tile) == SKIPPED:
            out[dst] = background
    return out, grid


# ====================================================================== whole-slide graph
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
    from napari_stmap.core.model import load_model

    def load() -> Any:
        model = load_model(path)
        _MODEL_LOADS[0] += 1
        if sha is not None and model_hash(model) != sha:
            msg = (
                f"{path} changed while predicting (its tensors differ from the run's model); rerun"
            )
            raise StmapInputError(msg)
        return _ready_model(model, _torch_device(device))

    key = path if path.startswith("<memory:") else str(Path(path).resolve())
    return _lru_get(_MODELS, (key, sha, str(device)), load, _MAX_MODELS)


def _cached_slide(job: _Job, spec: TileSpec) -> SlideReader:
    def make() -> tuple[Any, SlideReader]:
        slide = open_slide(job.slide_path, mpp=job.slide_mpp)
        return slide, SlideReader(slide, spec, job.image_cache_bytes)

    key = (job.slide_path, job.slide_mpp, job.store_id)
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
    pipe = _Pipeline(
        model,
        reader,
        store,
        batch_size=job.batch_size,
        device=device,
        precision=job.precision,
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
    slide = _as_slide(slide)
    spec = _plan_for_store(slide, model, store_path, opts["tile_px"], opts["halo_px"])
    recorded = None if str(model_path).startswith("<memory:") else model_path
    store = open_store(
        store_path, model, slide, spec, "a", dtype=opts["dtype"], model_path=recorded
    )
    box = (0.0, 0.0, *map(float, slide.shape_yx)) if opts["region"] is None else opts["region"]
    tiles = [t for t in spec.tiles_in_bbox(box) if store.state(t) == TODO]
    on = _tissue_grid(slide, spec, opts["tissue"])
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
    )
    return store, job, _blocks(tiles, opts["tiles_per_task"])


def predict_slide(
    slide: Slide | str | Path,
    model_path: str | Path,
    store_path: str | Path,
    *,
    scheduler: Any = None,
    batch_size: int = 8,
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
    batch_size : int
        Tiles per forward pass.
    device : str
        Where the network runs on each worker.
    region : (y0, x0, y1, x1), optional
        Only tiles overlapping this level-0 px box (the store still spans the slide).
    progress : callable, optional
        ``progress(done_tiles, total_tiles)`` as blocks of tiles finish.
    **options
        ``tile_px``, ``halo_px`` (as :class:`Predictor`), ``tissue`` (True/False/TissueMask),
        ``tiles_per_task`` (16), ``num_workers`` (threads of the threaded scheduler, 1: each task already overlaps reading, inference and writing, and more would multiply activation memory),
        ``precision`` ("fp32"), ``dtype`` ("float16"), ``readers`` (1),
        ``image_cache_bytes``.

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
    "precision": "fp32",
    "dtype": "float16",
    "readers": 1,
    "image_cache_bytes": DEFAULT_IMAGE_CACHE_BYTES,
    "region": None,
}


def predict_cohort(
    pairs: Sequence[tuple[Any, str | Path]],
    model_path: str | Path,
    *,
    scheduler: Any = None,
    batch_size: int = 8,
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
        _torch_device(device)
    model, path, sha = _driver_model(model_path, local)
    prepared = [_prepare_slide(s, model, path, sha, out, opts) for s, out in pairs]
    tasks = _tasks(prepared)
    total = sum(len(b) for _, _, blocks in prepared for b in blocks)
    log.info("predicting %d tiles of %d slide(s) in %d tasks", total, len(pairs), len(tasks))
    if tasks:
        _run_graph(tasks, scheduler, int(opts["num_workers"]), total, progress)
    for store, _, _ in prepared:
        store.refresh()
    return [store for store, _, _ in prepared]


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
        model = _ready_model(model_path, _torch_device("cpu"))
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
        from napari_stmap.core.model import load_model

        model = load_model(path)
        _MODEL_LOADS[0] += 1
        sha = model_hash(model)
        _SHA_BY_FILE[(str(path), stat.st_size, stat.st_mtime_ns)] = sha
        _lru_get(
            _MODELS,
            (str(path), sha, "cpu"),
            lambda: _ready_model(model, _torch_device("cpu")),
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
