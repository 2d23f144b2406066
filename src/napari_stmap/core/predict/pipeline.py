"""The one tiled inference path: read windows → run the network in batches → write tile outputs.

:func:`embed_windows` runs the network on a batch of tile windows (core + halo, model px) and
keeps each core's output; :class:`_Pipeline` overlaps the three steps (reader threads prefetch
windows, the calling thread runs the network, a writer thread stores each tile). Every dense
prediction goes through it: the interactive
:class:`~napari_stmap.core.predict.predictor.Predictor`, whole-slide dask tasks
(:mod:`~napari_stmap.core.predict.cohort`) and the in-memory
:func:`~napari_stmap.core.predict.dense.predict_map`. Tiles are ``(i, j)`` of a
:class:`~napari_stmap.core.tiling.TileSpec`; outputs are (C, h, w) in output px.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..tiling import TileSpec
from .device import autocast, dihedral_embed
from .reader import SlideReader, Tile

__all__ = ["embed_windows", "input_tensor", "shutdown_io_pool"]


def embed_windows(
    model: Any,
    images: np.ndarray,
    spec: TileSpec,
    device: Any,
    precision: str = "fp32",
    *,
    tta: bool = False,
    head: bool = False,
) -> np.ndarray:
    """Run the network on a batch of windows and keep each core's output.

    Parameters
    ----------
    model : StmapModel
        A dense model on ``device``, in eval mode.
    images : numpy.ndarray
        ``(B, W, W, 3)`` uint8 RGB windows at model px (``W = spec.window_px``).
    spec : TileSpec
        The plan the windows were read with (halo, stride, tile size).
    device : torch.device
        Where the network runs.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype on GPUs.
    tta : bool
        Average the embedding over the 8 turns and flips of each window
        (:func:`~napari_stmap.core.predict.device.dihedral_embed`).
    head : bool
        Apply the model's pointwise head: expected counts instead of embeddings.

    Returns
    -------
    numpy.ndarray
        ``(B, D, T/s, T/s)`` float32 embeddings of the cores (``T = spec.tile_px``), or
        ``(B, G + 1, T/s, T/s)`` expected counts with ``head=True``.
    """
    import torch

    hs, to = spec.halo_px // spec.stride, spec.out_tile_px
    with torch.inference_mode(), autocast(device, precision):
        x = input_tensor(images, device)
        e = dihedral_embed(model, x) if tta else model.embed(x)
        e = e[:, :, hs : hs + to, hs : hs + to]
        if head:
            e = model.head(e)
        return e.float().cpu().numpy()


def input_tensor(images: np.ndarray, device: Any) -> Any:
    """``(B, W, W, 3)`` uint8 RGB windows -> ``(B, 3, W, W)`` float32 in [0, 1] on ``device``
    (channels_last): the network's input, as :func:`embed_windows` and the memory dry run of
    :mod:`~napari_stmap.core.predict.budget` make it."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images))
    if device.type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div(255.0)
    return x.contiguous(memory_format=torch.channels_last)


# ================================================================================ threads
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
    """Feeds a fixed list of tiles to a :class:`_Pipeline` (whole-slide tasks, in-memory maps).

    ``progress(done, total)``, if given, is called (from the writer thread) after each tile
    written; if it raises, no further tile is fed and :meth:`raise_error` re-raises it.
    """

    def __init__(
        self, tiles: Iterable[Tile], progress: Callable[[int, int], Any] | None = None
    ) -> None:
        self._tiles = list(tiles)
        self._iter = iter(self._tiles)
        self._lock = threading.Lock()
        self._progress = progress
        self._error: BaseException | None = None
        self.written = 0

    def next(self, block: bool, halt: threading.Event) -> tuple[Tile, int] | None:
        with self._lock:
            tile = None if self._error is not None else next(self._iter, None)
        return None if tile is None else (tile, 0)

    def keep(self, tile: Tile, tag: int) -> bool:
        return self._error is None

    def finished(self, tile: Tile, tag: int, ok: bool) -> None:
        self.written += int(ok)
        if ok and self._progress is not None and self._error is None:
            try:
                self._progress(self.written, len(self._tiles))
            except BaseException as exc:  # raised on the caller's thread, after the run
                self._error = exc

    def raise_error(self) -> None:
        """Re-raise what ``progress`` raised, if anything."""
        if self._error is not None:
            raise self._error


class _Pipeline:
    """Read → infer → write, overlapped: reader threads prefetch windows, the calling thread
    runs the network in batches, a writer thread stores each tile's output.

    A *feed* supplies tiles: ``next(block, halt)`` returns ``(tile, tag)``, ``_EMPTY`` (nothing
    right now; only when ``block`` is False) or None (finished); ``keep(tile, tag)`` says whether
    a prefetched tile is still wanted; ``finished(tile, tag, ok)`` is called once per tile
    taken, after its write (``ok``) or when it is dropped; an optional ``urgent()`` returns a
    callable the compute thread runs before its next batch (or None). A *sink* (``store``) has
    ``write_tile(tile, output)``: a :class:`~napari_stmap.core.store.PredictionStore`
    (embeddings: chunk, then done flag) or an in-memory map (``head=True``: expected counts).
    """

    def __init__(
        self,
        model: Any,
        reader: SlideReader,
        store: Any,
        *,
        batch_size: int,
        device: Any,
        precision: str = "fp32",
        readers: int = 1,
        tta: bool = False,
        head: bool = False,
    ) -> None:
        self.model, self.reader, self.store = model, reader, store
        self.batch_size = max(1, int(batch_size))
        self.device, self.precision = device, precision
        self.readers = max(1, int(readers))
        self._forward = {"tta": True} if tta else {}
        if head:
            self._forward["head"] = True
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
        urgent = getattr(feed, "urgent", None)  # jobs that go before the next batch
        try:
            while ended < self.readers and not stop.is_set() and self._write_error is None:
                job = urgent() if urgent is not None else None
                if job is not None:
                    job()
                    continue
                try:
                    item = q_in.get(timeout=0.05 if urgent is not None else 0.1)
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
                out = embed_windows(
                    self.model,
                    images,
                    self.reader.spec,
                    self.device,
                    self.precision,
                    **self._forward,
                )
            except BaseException:
                for tile, tag, _ in kept:
                    feed.finished(tile, tag, False)
                raise
            q_out.put([(tile, tag, e) for (tile, tag, _), e in zip(kept, out, strict=True)])
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
