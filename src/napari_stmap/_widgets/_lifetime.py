"""How a session lives and dies with its viewer: window watchers, GC freeze, warning hook.

- :class:`DockWatcher` follows a dock up its Qt parents to the main window it ends up in and
  :class:`CloseWatcher` closes the session when that window closes (no private napari access).
- :func:`freeze_startup_objects` keeps the garbage collector from walking napari, Qt and torch
  on the GUI thread; :func:`unfreeze_startup_objects` gives them back when a session closes.
- :data:`HOOK_GUARD` undoes superqt's thread-unsafe ``warnings.showwarning`` swap, which would
  otherwise keep a closed viewer alive.

The watchers only call ``session.watch_window(window)`` and ``session.close()``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings

from qtpy.QtCore import QEvent, QObject, QTimer

logger = logging.getLogger(__name__)

_GC_FROZEN = [False]


def freeze_startup_objects() -> None:
    """Exclude the objects alive now (napari, Qt, torch, the model) from garbage collection.

    Once per process, after the predictor is built. A full collection walks every tracked
    object while holding the GIL: with napari and torch loaded that is ~360,000 objects and took
    430 ms (up to 790 ms on a busy 2-core machine) on whichever thread triggered it, freezing
    the viewer. Frozen objects are still freed by reference counting; only reference cycles
    among them are never collected (they are modules, classes and functions for the most part).
    """
    if not _GC_FROZEN[0]:
        _GC_FROZEN[0] = True
        gc.collect(1)  # young garbage goes first; an old-generation pass would cost the above
        gc.freeze()
        logger.debug("napari-stmap: %d objects frozen out of the GC", gc.get_freeze_count())


def unfreeze_startup_objects() -> None:
    """Give the frozen objects back to the garbage collector (when a session closes).

    Otherwise a closed viewer that sits in a reference cycle frozen by
    :func:`freeze_startup_objects` would never be freed.
    """
    if _GC_FROZEN[0]:
        _GC_FROZEN[0] = False
        gc.unfreeze()


_SUPERQT_SHOWWARNING = "WorkerBase.run.<locals>.<lambda>"


class WarningHookGuard:
    """Undo superqt's thread-unsafe ``warnings.showwarning`` swap once our workers are done.

    Each superqt worker sets ``warnings.showwarning`` to a lambda holding the worker inside
    ``warnings.catch_warnings()``; two workers that overlap restore each other's hooks in the
    wrong order, so the module ``warnings`` keeps the last lambda, and through it the worker,
    its callbacks, the session and the closed viewer (a leak measured by napari's own
    ``make_napari_viewer`` check). When the last of our workers has finished, a hook still
    pointing at a worker is replaced by the one that was there before our first worker.
    """

    def __init__(self) -> None:
        self._saved = None

    def before_start(self, running: int) -> None:
        """A worker is about to start while ``running`` of ours run."""
        hook = warnings.showwarning
        if running == 0 and getattr(hook, "__qualname__", "") != _SUPERQT_SHOWWARNING:
            self._saved = hook

    def after_finish(self, running: int) -> None:
        """A worker finished; ``running`` of ours still run."""
        hook = warnings.showwarning
        stale = getattr(hook, "__qualname__", "") == _SUPERQT_SHOWWARNING
        if running == 0 and stale and self._saved is not None:
            warnings.showwarning = self._saved


#: The guard all sessions share (the hook is process-wide).
HOOK_GUARD = WarningHookGuard()


class DockWatcher(QObject):
    """Event filter on a dock and its Qt ancestors: finds the main window it ends up in.

    napari wraps a plugin widget in a ``QDockWidget`` and then docks that in its main window,
    so the widget's own parent changes before it reaches the window: every ancestor is
    watched for parent changes until the top is a main window, which the session watches.
    A child of the widget: it lives and dies with it.
    """

    def __init__(self, session, widget) -> None:
        super().__init__(widget)
        self._session = session
        self._follow()

    def _follow(self) -> None:
        # no Python references to the ancestors: napari keeps finished workers (and so, via
        # their closures, the docks) alive as long as its window object lives
        widget = self.parent()
        node = widget
        while node is not None:
            node.installEventFilter(self)  # installing twice keeps one filter
            node = node.parentWidget()
        self._session.watch_window(widget.window())

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt API)
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):
            with contextlib.suppress(RuntimeError):  # widget deleted meanwhile
                self._follow()
        return False


class CloseWatcher(QObject):
    """Event filter on the main window: tears the session down when the window closes."""

    def __init__(self, session, window) -> None:
        super().__init__(window)
        self._session = session

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            if event.spontaneous():  # the user may still cancel: check once it is handled
                QTimer.singleShot(0, self._on_window_maybe_closed)
            else:
                self._session.close()
        return False

    def _on_window_maybe_closed(self) -> None:
        try:
            window = self.parent()
            visible = window is not None and window.isVisible()
        except RuntimeError:  # already deleted
            visible = False
        if not visible:
            self._session.close()
