"""The priority queue of tiles an interactive :class:`~.predictor.Predictor` feeds its pipeline.

Tiles are ``(i, j)`` of the store's :class:`~napari_stmap.core.tiling.TileSpec`; distances are
level-0 px from a request's centre.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Sequence

from ..store import TODO, PredictionStore
from .pipeline import _EMPTY
from .reader import Tile

__all__ = ["TileScheduler"]


class TileScheduler:
    """Priority queue of tiles for a :class:`~.predictor.Predictor` (thread-safe; a pipeline feed).

    Order: higher ``priority`` first, then the latest request, then distance of the tile's
    centre to the request's centre. :meth:`cancel` empties the queue and bumps a generation so
    tiles already prefetched are dropped before inference.

    Parameters
    ----------
    store : PredictionStore
        Tiles already done or skipped there are not queued.
    on_finished : callable
        ``on_finished(tile, ok)`` once per tile taken, after its write (``ok``) or its drop.
    """

    def __init__(self, store: PredictionStore, on_finished: Callable[[Tile, bool], None]) -> None:
        self.store = store
        self._on_finished = on_finished
        self._cond = threading.Condition()
        self._heap: list[tuple] = []
        self._keys: dict[Tile, tuple] = {}
        self._inflight: dict[Tile, int] = {}
        self._urgent: list[Callable[[], object]] = []
        self._urgent_running = 0
        self._seq = itertools.count()
        self.generation = 0
        self.paused = False
        self.closed = False

    def push(self, tiles: Sequence[Tile], dists: Sequence[float], priority: float) -> int:
        """Queue ``tiles`` (not done, not in flight) with their distances; returns how many."""
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

    def push_urgent(self, job: Callable[[], object]) -> None:
        """Queue ``job()`` for the compute thread, before any further tile."""
        with self._cond:
            self._urgent.append(job)
            self._cond.notify_all()

    def urgent(self) -> Callable[[], None] | None:
        """The next urgent job wrapped to count as pending until it ends; None when there is
        none (or paused, closed)."""
        with self._cond:
            if self.paused or self.closed or not self._urgent:
                return None
            job = self._urgent.pop(0)
            self._urgent_running += 1

        def run() -> None:
            try:
                job()
            finally:
                with self._cond:
                    self._urgent_running -= 1
                    self._cond.notify_all()

        return run

    def next(self, block: bool, halt: threading.Event) -> tuple[Tile, int] | None | object:
        """The next tile and its generation; ``_EMPTY`` when none now and not ``block``."""
        with self._cond:
            while True:
                if self.closed or halt.is_set():
                    return None
                if not self.paused and not self._urgent and not self._urgent_running:
                    item = self._pop()  # none while urgent jobs run: they get the cores
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
        """Whether a prefetched tile is still wanted (not cancelled since it was taken)."""
        return tag == self.generation and not self.closed

    def finished(self, tile: Tile, tag: int, ok: bool) -> None:
        """A tile taken was written (``ok``) or dropped."""
        self._on_finished(tile, ok)  # before the tile stops counting as pending
        with self._cond:
            if self._inflight.get(tile) == tag:
                del self._inflight[tile]
            self._cond.notify_all()

    def cancel(self) -> int:
        """Drop every queued tile (prefetched ones too); returns how many were queued."""
        with self._cond:
            n = len(self._keys)
            self._heap.clear()
            self._keys.clear()
            self._urgent.clear()
            self.generation += 1
            self._cond.notify_all()
        return n

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) handing out tiles."""
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def close(self) -> None:
        """Hand out nothing more (the pipeline stops)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Tiles queued or in flight, and urgent jobs queued or running."""
        with self._cond:
            return len(self._keys) + len(self._inflight) + len(self._urgent) + self._urgent_running

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` holds (checked on every change); False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)
