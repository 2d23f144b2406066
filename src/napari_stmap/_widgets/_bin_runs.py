"""Bin-model prediction for the Predict dock: the bins of the view or of the slide's tissue.

A bin model (MagNet, ``input_kind == "bins"``) has no predictor: the bins of a level-0 px box
on the model's lattice (or of the tissue of the whole slide) are predicted in a worker by
:func:`~napari_stmap.core.predict.predict_bin_region`, cancellable between chunks of bins, and
added to the session's :attr:`~._session.Session.bins`. A request made while a worker runs is
run when it finishes (a whole-slide request wins over a view).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from qtpy.QtCore import QObject, Signal

from napari_stmap.core.predict import PredictionCancelled, model_bin_um, predict_bin_region
from napari_stmap.core.tiling import tissue_mask


def predict_bins(model, slide, box, *, device: str, progress, cancelled):
    """The bins of ``box`` (level-0 px ``(y0, x0, y1, x1)``; None: the whole slide's tissue).

    Blocking (a worker): ``progress(done, total)`` counts chunks of bins and ``cancelled()``
    is asked between them. Returns a :class:`~napari_stmap.core.predict.BinPrediction`.
    """
    bin_um = model_bin_um(model)
    tissue = tissue_mask(slide, dilate_um=bin_um) if box is None else None
    return predict_bin_region(
        model,
        slide,
        box,
        bin_um=bin_um,
        tissue=tissue,
        device=device,
        progress=progress,
        cancelled=cancelled,
    )


class BinRuns(QObject):
    """Runs of :func:`predict_bins` for one dock: one worker at a time, cancellable.

    Signals: ``message(str)`` status text; ``running(bool)``; ``started()`` (chunks not counted
    yet); ``progressed(done, total)`` chunks, from the worker's thread; ``finished()``.
    """

    message = Signal(str)
    running = Signal(bool)
    started = Signal()
    progressed = Signal(int, int)
    finished = Signal()

    def __init__(self, session, view_box: Callable[[], Sequence[float] | None]) -> None:
        super().__init__()
        self.session, self._view_box = session, view_box
        self.worker = None  # worker predicting bins (True while the model loads)
        self._cancel = threading.Event()
        self._again: bool | None = None  # a request that came while a worker ran

    def start(self, whole: bool) -> None:
        """Predict the bins in view (or on the whole slide's tissue) in a worker."""
        if self.worker is not None:
            self._again = bool(whole or self._again)
            return
        box = None if whole else self._view_box()
        if box is None and not whole:
            self.message.emit("The view does not show the slide; pan to it.")
            return
        self._cancel.clear()
        self.worker = True  # placeholder until the model is loaded
        self.running.emit(True)
        self.message.emit("loading the bin model…")
        self.session.with_bin_model(lambda model: self._run(model, box), on_fail=self._on_end)

    def cancel(self) -> None:
        """Stop between chunks (bins already predicted are kept); drop a queued request."""
        self._cancel.set()
        self._again = None

    def _run(self, model, box) -> None:
        s = self.session
        slide, device, cancel = s.slide, s.device, self._cancel
        what = "whole slide" if box is None else "view"
        emit = self.progressed.emit

        def work():
            return predict_bins(
                model,
                slide,
                box,
                device=device,
                progress=lambda done, total: emit(done, total),
                cancelled=cancel.is_set,
            )

        def done(pred) -> None:
            if slide is not s.slide or not s.is_bins:
                return
            s.set_bins(pred, merge=True)
            self.message.emit(
                f"Done: {pred.n} bins of {pred.bin_um:.3g} µm ({what}); "
                f"{s.bins.n} bins predicted in all."
            )

        def failed(exc: BaseException) -> None:
            if isinstance(exc, PredictionCancelled):
                self.message.emit("Cancelled; bins already predicted are kept.")

        self.message.emit(f"predicting the bins of the {what}…")
        self.started.emit()
        self.worker = s.run(
            work,
            on_done=done,
            on_error=failed,
            on_finally=self._on_end,
            what="predicting bins",
            progress={"total": 0, "desc": "stmap: predicting bins"},
        )

    def _on_end(self) -> None:
        self.worker = None
        self.running.emit(False)
        self.finished.emit()
        again, self._again = self._again, None
        if again is not None and not self._cancel.is_set():
            self.start(again)
