"""Live gene views for a GUI: reads never compute, a worker thread fills blocks in.

A :class:`LiveGeneView` is a multiscale map of one gene (levels as
:func:`~napari_stmap.core.predict.views.gene_pyramid`, axis order (y, x), output px of the
store's grid) whose reads return what is computed so far (NaN elsewhere) and hand the missing
blocks to a :class:`ViewWorker`; values equal :func:`~napari_stmap.core.predict.views.gene_view`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..store import DONE, SKIPPED, TODO, LRUCache
from ..tiling import TissueMask
from .reader import Tile
from .views import (
    _view_block,
    as_store,
    check_mode,
    level_bounds,
    pyramid_levels,
    view_grid,
    view_rows,
)

__all__ = ["DEFAULT_LIVE_CACHE_BYTES", "LiveGeneView", "ViewWorker"]

log = logging.getLogger(__name__)

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

    :attr:`arrays` (finest first, levels as :func:`~.views.gene_pyramid`) are read-only numpy-like
    arrays (``shape``, ``dtype``, ``__getitem__``, ``__array__``) for napari
    (``multiscale=True``). A read returns the blocks computed so far, NaN where a tile is not
    predicted yet or its block is still being computed, and hands the missing blocks to
    ``worker`` (a :class:`ViewWorker`); once some are ready :meth:`take_updated` is True and
    the GUI reads again (refreshes the layer). :meth:`tiles_done` recomputes the blocks of
    newly predicted tiles that the latest read of a level showed. A tile still to do that has
    previews (:mod:`~.preview`) shows them until it is predicted. Values equal
    :func:`~.views.gene_view`'s (same modes, levels, background); the network never runs.

    Parameters
    ----------
    source, gene, mode
        Where the embeddings are, which gene and which values: as :func:`~.views.gene_view`.
    worker : ViewWorker
        Computes the blocks (shared by the views of one GUI).
    background : float
        Value of tiles skipped as off-tissue.
    min_px : int
        Coarsest level: longest side at most this many pixels (as :func:`~.views.gene_pyramid`).
    cache_bytes : int
        Byte limit of the computed blocks kept (LRU).
    on_update : callable, optional
        ``on_update()`` from the worker thread when blocks are ready and no other block of
        this view is queued: a GUI wakes up without polling (keep it short, e.g. emit a Qt
        signal).
    mask : TissueMask, optional
        Show only pixels whose centre is on this mask (NaN, transparent, elsewhere), e.g.
        :meth:`~.predictor.Predictor.display_mask`: a tile that touches tissue is predicted in
        full, but its values on glass mean nothing to a reader.
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
        store = as_store(source)
        check_mode(mode)
        self.store, self.gene, self.mode, self.worker = store, gene, mode, worker
        self.rows = view_rows(store, gene, mode)
        self.background = float(background)
        self.levels = pyramid_levels(store.spec, min_px)
        self._bounds = {k: level_bounds(store.spec, k) for k in self.levels}
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
        if self.closed or key in self._cache or not self._shows(tile):
            return  # cached: computed meanwhile (e.g. by level_data), nothing new to show
        block = _view_block(
            self.store, self.rows, self.mode, level, self.background, *tile, preview=True
        )
        if self.mask is not None:
            block = self._masked(block, level, tile)
        self._cache.put(key, block)
        with self._lock:
            self._updated = True

    def _shows(self, tile: Tile) -> bool:
        """Whether ``tile`` has values to show: done, or previewed while still to do."""
        state = self.store.state(tile)
        return state == DONE or (state == TODO and self.store.has_preview(tile))

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
                if state == TODO and not self.store.has_preview((i, j)):
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
