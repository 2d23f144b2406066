"""The state shared by the docks of one viewer: slide, measured spots, model, predictor.

A :class:`Session` is created lazily by :func:`get_session` the first time a dock of a viewer
asks for it and torn down when the viewer's window closes: workers are quit, the predictor's
threads are joined. Long work runs in napari ``thread_worker``s (:meth:`Session.run`); the
predictor runs in its own threads (leaving a CPU core to the GUI) and reports finished tiles on
a queue that a 100 ms QTimer polls on the Qt thread (:attr:`Session.tiles_done`). Heatmaps are
computed off the Qt thread by the session's :class:`~napari_stmap.core.predict.ViewWorker`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal

from napari_stmap.core.display import stmap_meta
from napari_stmap.core.predict import ViewWorker, shutdown_io_pool

from .._layers import align_shapes_to_slide
from ._lifetime import HOOK_GUARD, CloseWatcher, DockWatcher, unfreeze_startup_objects
from ._notify import notify_error
from ._predictions import PredictionsMixin
from ._viewer import ANNOTATION_KINDS, keep_annotations_on_top, stmap_kind

logger = logging.getLogger(__name__)

_SESSIONS: dict[int, Session] = {}


def viewer_key(viewer) -> int:
    """A key that is the same for a viewer and every proxy of it napari hands to plugins.

    napari gives each plugin dock its own ``PublicOnlyProxy`` of the viewer, so ``id()``
    differs from dock to dock; the proxy forwards ``hash()``, and a napari viewer's hash is
    its identity (``ViewerModel.__hash__``).
    """
    return hash(viewer)


def get_session(viewer, widget=None) -> Session:
    """The session of ``viewer`` (created on first use, shared by all docks).

    ``widget``: the dock asking; the session watches the main window it is docked in (found
    through Qt's parent chain of the dock, not through napari's private window) and closes
    when that window closes.
    """
    key = viewer_key(viewer)
    session = _SESSIONS.get(key)
    if session is None or session.closed:
        session = Session(viewer)
        _SESSIONS[key] = session
    if widget is not None:
        session.attach(widget)
    return session


class Session(PredictionsMixin, QObject):
    """Slide, measured data, model and predictor of one viewer.

    Signals
    -------
    changed(str)
        ``"slide"``, ``"spots"``, ``"model"``, ``"predictor"`` or ``"device"`` changed.
    tiles_done(list)
        Tiles ``(i, j)`` stored since the last poll (Qt thread, at most every 100 ms).
    busy(bool)
        Whether a prediction is running (tiles queued or in flight).
    bins_changed()
        A bin model's prediction (:attr:`bins`) was replaced or extended.

    Bin models (``input_kind == "bins"``, MagNet) have no predictor and no store: the model is
    loaded in a worker (:meth:`with_bin_model`) and the docks keep its latest prediction, a
    :class:`~napari_stmap.core.predict.BinPrediction`, in :attr:`bins`. The docks ask for
    either through one :class:`~napari_stmap.core.predict.PredictionSource`
    (:meth:`with_source`); loading lives in :class:`~._predictions.PredictionsMixin`.
    """

    changed = Signal(str)
    tiles_done = Signal(object)
    busy = Signal(bool)
    bins_changed = Signal()

    POLL_MS = 100

    def __init__(self, viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.slide = None
        self.slide_layer_name: str | None = None
        self.spots = None
        self.spots_path: Path | None = None
        self.model_path: Path | None = None
        self.model_meta: dict[str, Any] = {}
        self.device = "cpu"
        self.predictor = None
        self.store_root: Path | None = None
        self.closed = False
        self.goal: list[tuple[int, int]] = []
        self.bin_model = None
        self.bins = None  # BinPrediction of a bin model
        self._bin_model_key = None
        self._bin_model_waiting: list[tuple[Callable[[Any], None], Callable[[], None] | None]] = []
        self._busy = False
        self._workers: set = set()
        self._predictor_worker = None
        self._after_predictor: list[tuple[Callable[[Any], None], Callable[[], None] | None]] = []
        self._view_worker = None
        self.done_queue: queue.Queue = queue.Queue()
        self._timer = QTimer(self)
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self._on_timer_tick)
        self._timer.start()
        self._windows: set[int] = set()  # ids of the main windows watched (usually one)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)

    # --- lifetime --------------------------------------------------------------------------
    def attach(self, widget) -> None:
        """Watch the main window ``widget`` (a dock) sits in, now or once it is docked."""
        DockWatcher(self, widget)  # a child of the widget: lives and dies with it

    def watch_window(self, window) -> None:
        """Close the session when ``window`` (a top-level Qt window holding a dock) closes."""
        if self.closed or window is None or window.parent() is not None:
            return
        if not hasattr(window, "addDockWidget") or id(window) in self._windows:
            return  # not docked yet (the dock is its own window), or already watched
        self._windows.add(id(window))  # ids only: no reference that keeps a closed window
        watcher = CloseWatcher(self, window)
        window.installEventFilter(watcher)
        window.destroyed.connect(self.close)

    # --- description ---------------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """µm per level-0 px of the slide (1 without a slide)."""
        return float(self.slide.mpp) if self.slide is not None else 1.0

    @property
    def units(self) -> tuple[str, str]:
        """World units of the slide's layers: µm, or px when µm/px is unknown."""
        known = self.slide is not None and self.slide.mpp_source != "fallback"
        return ("um", "um") if known else ("pixel", "pixel")

    @property
    def is_bins(self) -> bool:
        """Whether the model is a bin model (MagNet: values at bin centres, no dense map)."""
        return self.model_meta.get("input_kind") == "bins"

    @property
    def model_genes(self) -> list[str]:
        """Genes the model predicts (empty without a model)."""
        return list(self.model_meta.get("genes", []))

    # --- inputs ----------------------------------------------------------------------------
    def set_slide(self, slide, layer_name: str | None = None) -> None:
        """Use ``slide`` (a :class:`~napari_stmap.core.io.slide.Slide`); drops the predictor."""
        self.slide, self.slide_layer_name = slide, layer_name
        self.drop_predictor()
        self.set_bins(None)
        for layer in list(self.viewer.layers):
            self._align_regions(layer)
        self.changed.emit("slide")

    def _align_regions(self, layer) -> None:
        """Put a regions layer in level-0 px (e.g. opened GeoJSON) on the slide's µm/px."""
        meta = stmap_meta(layer)
        if self.slide is None or meta.get("kind") != "regions" or meta.get("units") != "px":
            return
        if meta.get("mpp") != self.mpp:
            align_shapes_to_slide(layer, self.mpp, units=self.units)

    def set_spots(self, spots, path: str | Path | None) -> None:
        """Use measured ``spots`` read from ``path``."""
        self.spots = spots
        self.spots_path = None if path is None else Path(path)
        self.changed.emit("spots")

    def set_model(self, path: str | Path, meta: dict[str, Any]) -> None:
        """Use the model file ``path`` (metadata already read); drops the predictor."""
        self.model_path, self.model_meta = Path(path), dict(meta)
        self.drop_predictor()
        self.bin_model = None
        self.set_bins(None)
        self.changed.emit("model")

    def set_device(self, device: str) -> None:
        """Run the network on ``device`` from now on (the predictor is rebuilt lazily)."""
        if device != self.device:
            self.device = device
            self.drop_predictor()
            self.bin_model = None
            self.changed.emit("device")

    # --- layers ----------------------------------------------------------------------------
    def _on_layer_inserted(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self._align_regions(layer)
        if layer is not None and stmap_kind(layer) not in (None, *ANNOTATION_KINDS):
            # after the layer list has finished inserting (its Qt model listens too)
            QTimer.singleShot(0, self._raise_annotations)

    def _raise_annotations(self) -> None:
        if not self.closed:
            with contextlib.suppress(RuntimeError, ValueError):  # viewer closing
                keep_annotations_on_top(self.viewer)

    def view_worker(self):
        """The thread computing heatmap blocks (:class:`~napari_stmap.core.predict.ViewWorker`)."""
        if self._view_worker is None or self._view_worker.closed:
            self._view_worker = ViewWorker(name="stmap-views")
        return self._view_worker

    # --- workers ---------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_finally: Callable[[], None] | None = None,
        what: str = "",
        progress: dict | None = None,
    ):
        """Run ``fn(*args)`` in a napari thread worker; results and errors come back on Qt.

        Errors become napari notifications (``what`` names the task); ``on_finally`` always
        runs (re-enable buttons there), after ``on_done`` or the error.
        """
        from napari.qt.threading import create_worker

        worker = create_worker(fn, *args, _progress=progress or False, _ignore_errors=True)
        HOOK_GUARD.before_start(len(self._workers))
        self._workers.add(worker)
        state = {"error": None}

        def _on_returned(value: Any) -> None:
            if on_done is not None and not self.closed:
                try:
                    on_done(value)
                except Exception as exc:  # a failing callback must not leave the dock stuck
                    logger.exception("napari-stmap: %s failed", what or "callback")
                    notify_error(exc, what)

        def _on_errored(exc: BaseException) -> None:
            state["error"] = exc
            logger.debug("worker %s failed", what, exc_info=exc)
            if on_error is not None:
                on_error(exc)
            if not self.closed:
                notify_error(exc, what)

        def _on_finished() -> None:
            self._workers.discard(worker)
            HOOK_GUARD.after_finish(len(self._workers))
            if on_finally is not None:
                try:
                    on_finally()
                except Exception:  # pragma: no cover - widget already deleted
                    logger.debug("on_finally failed", exc_info=True)

        worker.returned.connect(_on_returned)
        worker.errored.connect(_on_errored)
        worker.finished.connect(_on_finished)
        worker.start()
        return worker

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.busy.emit(busy)

    def _on_timer_tick(self) -> None:
        tiles = []
        while True:
            try:
                tiles.append(self.done_queue.get_nowait())
            except queue.Empty:
                break
        if tiles:
            self.tiles_done.emit(tiles)
        pred = self.predictor
        if pred is not None:
            self._set_busy(pred.pending > 0)
            err = getattr(pred, "_error", None)
            if err is not None:
                try:
                    pred.wait(0)
                except BaseException as exc:
                    notify_error(exc, "prediction failed")

    # --- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the timer, quit workers, close the predictor (joins its threads); idempotent."""
        if self.closed:
            return
        with contextlib.suppress(RuntimeError):  # docks close their progress bars
            self._set_busy(False)
        self.closed = True
        with contextlib.suppress(RuntimeError):  # Qt object already deleted
            self._timer.stop()
        with contextlib.suppress(Exception):  # viewer already torn down
            self.viewer.layers.events.inserted.disconnect(self._on_layer_inserted)
        pred, self.predictor = self.predictor, None
        if pred is not None:
            pred.close()  # joins its threads; workers blocked on it return
        views, self._view_worker = self._view_worker, None
        if views is not None:
            views.close()  # joins its thread
        workers = list(self._workers)
        for worker in workers:
            with contextlib.suppress(RuntimeError):  # already deleted
                worker.quit()
        if workers:
            from napari.qt.threading import WorkerBase

            try:
                WorkerBase.await_workers(msecs=10_000)
            except RuntimeError:
                logger.warning("napari-stmap: a worker did not stop within 10 s")
        shutdown_io_pool()
        _SESSIONS.pop(viewer_key(self.viewer), None)
        unfreeze_startup_objects()
        logger.debug("napari-stmap session closed")
