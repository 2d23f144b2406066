"""The Genes dock's clock: live heatmap layers are read again as their blocks arrive.

The session's view worker computes the blocks a read of a live view missed and calls
:meth:`LiveRefresh.wake` from its thread; a :attr:`~LiveRefresh.blocks_ready` signal (queued to
the Qt thread) and a poll timer both run :meth:`~._heatmaps.Heatmaps.refresh`, which reads the
layers whose blocks arrived, paced so that a layer is read at most every ``REFRESH_MS``.
Finished tiles recompute the blocks of the layers that show them; when prediction stops, every
live layer is read once more (thumbnails of what finished out of view).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from qtpy.QtCore import QObject, QTimer, Signal


class LiveRefresh(QObject):
    """Refresh of the live heatmaps of ``heatmaps`` (a child of ``parent``: dies with it).

    ``contrast(layer)`` is called for layers whose contrast was never set from data when
    tiles finish; ``poll_ms`` is the period of the timer that catches deferred refreshes.
    """

    #: Emitted from the view worker's thread when a view's blocks are ready (queued to Qt).
    blocks_ready = Signal()

    def __init__(self, parent, heatmaps, poll_ms: int, contrast: Callable[[object], None]):
        super().__init__(parent)
        self.heatmaps, self.session, self._contrast = heatmaps, heatmaps.session, contrast
        self.timer = QTimer(self)
        self.timer.setInterval(poll_ms)
        self.timer.timeout.connect(self.tick)
        self.timer.start()
        self.blocks_ready.connect(self.tick)  # no polling delay when idle
        self.session.tiles_done.connect(self._on_tiles_done)
        self.session.busy.connect(self._on_session_busy)

    def wake(self) -> None:
        """From the view worker's thread: blocks are ready (refresh without waiting a tick)."""
        with contextlib.suppress(RuntimeError):  # the dock is already deleted
            self.blocks_ready.emit()

    def tick(self) -> None:
        """Refresh the layers whose blocks arrived, coalesced; stop once the session closed."""
        if self.session.closed:
            self.timer.stop()
            return
        self.heatmaps.refresh()

    def _on_tiles_done(self, tiles) -> None:
        self.heatmaps.tiles_done(tiles, self._contrast)

    def _on_session_busy(self, busy: bool) -> None:
        if not busy:  # prediction stopped: show what finished out of view (thumbnails)
            self.heatmaps.mark_all()
