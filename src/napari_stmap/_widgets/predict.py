"""Dock "Predict": device, predict what I see (follows the camera) or the whole slide.

The network runs in the :class:`~napari_stmap.core.predict.Predictor`'s threads; this dock only
schedules tiles (viewport first, centre out), shows tiles done / wanted (in the dock and as a
napari progress bar in the activity dock, whose Cancel button cancels too) and cancels. A bin
model (MagNet) has no predictor: its bins are predicted in a worker (:mod:`._bin_runs`).
"""

from __future__ import annotations

import logging

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QProgressBar,
    QVBoxLayout,
    QWidget,
)

from napari_stmap.core.predict import available_devices

from ._bin_runs import BinRuns
from ._notify import notify_error
from ._qt import button, combo, debounce, row, status_label
from ._session import get_session
from ._viewer import camera_of, viewport_bbox_px

logger = logging.getLogger(__name__)


def tile_progress(total: int, on_cancel):
    """A napari progress bar of tiles with a Cancel button that calls ``on_cancel()``."""
    from napari.utils import cancelable_progress

    class _TileProgress(cancelable_progress):
        def cancel(self) -> None:
            super().cancel()
            on_cancel()

    return _TileProgress(total=max(int(total), 1), desc="stmap: predicting tiles")


class PredictWidget(QWidget):
    """Device, viewport / whole-slide prediction, progress and cancel."""

    DEBOUNCE_MS = 300

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.pbar = None  # napari progress bar while tiles are pending
        self.bin_runs = BinRuns(self.session, self._view_box)
        self._build()
        self._debounce = debounce(self, self.DEBOUNCE_MS, self._on_debounce_timeout)
        camera = camera_of(self.viewer)
        camera.events.center.connect(self._on_camera_changed)
        camera.events.zoom.connect(self._on_camera_changed)
        self.session.tiles_done.connect(self._on_tiles_done)
        self.session.busy.connect(self._on_session_busy)
        self.session.changed.connect(self._on_session_changed)
        runs = self.bin_runs
        runs.message.connect(self.status.setText)
        runs.running.connect(self._set_running)
        runs.started.connect(self._on_bins_started)
        runs.progressed.connect(self._on_bins_progress)
        runs.finished.connect(self._on_bins_finished)
        QTimer.singleShot(0, self._fill_devices)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        form = QFormLayout()
        tip = "Where the network runs (CUDA / Apple MPS are detected)"
        self.device_combo = combo(self._on_device_combo_activated, tip, ["cpu"])
        form.addRow("device", self.device_combo)
        lay.addLayout(form)
        self.follow_check = QCheckBox("Predict what I see (follow the view)")
        self.follow_check.setToolTip(
            "Tiles in view are predicted first, centre out, as you pan and zoom"
        )
        self.follow_check.toggled.connect(self._on_follow_toggled)
        lay.addWidget(self.follow_check)
        self.view_btn = button("Predict view", self._on_view_clicked)
        self.slide_btn = button("Predict whole slide", self._on_slide_clicked)
        lay.addLayout(row(self.view_btn, self.slide_btn))
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m tiles")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.cancel_btn = button("Cancel", self._on_cancel_clicked)
        self.cancel_btn.setEnabled(False)
        lay.addWidget(self.cancel_btn)
        self.status = status_label("Load a slide and a model in 'Slide & data'.")
        lay.addWidget(self.status)
        lay.addStretch(1)

    def _fill_devices(self) -> None:
        try:
            devices = available_devices()
        except Exception:  # torch missing or broken: the CPU is still offered
            logger.debug("device detection failed", exc_info=True)
            return
        self.device_combo.clear()
        self.device_combo.addItems(devices)
        self.device_combo.setCurrentText(self.session.device)

    # --- actions ---------------------------------------------------------------------------
    def _on_device_combo_activated(self, index: int) -> None:
        self.session.set_device(self.device_combo.itemText(index))

    def _on_follow_toggled(self, on: bool) -> None:
        if on:
            self.predict_view()

    def _on_camera_changed(self, event=None) -> None:
        if self.follow_check.isChecked():
            self._debounce.start()

    def _on_debounce_timeout(self) -> None:
        self.predict_view()

    def _on_view_clicked(self) -> None:
        self.predict_view()

    def _on_slide_clicked(self) -> None:
        self.predict_slide()

    def predict_view(self) -> None:
        """Predict the tiles in view (viewport first; level-0 px = world µm / mpp)."""
        self._start(whole=False)

    def predict_slide(self) -> None:
        """Predict every tile of the slide on tissue (the view's tiles go first)."""
        self._start(whole=True)

    def _start(self, whole: bool) -> None:
        s = self.session
        if s.slide is None or s.model_path is None:
            notify_error("load a slide and a model in the 'Slide & data' dock first", "predict")
            return
        if s.is_bins:
            self.bin_runs.start(whole)
            return
        self._set_running(True)

        def go(pred) -> None:
            box = self._view_box()
            if box is None and not whole:
                self.status.setText("The view does not show the slide; pan to it.")
                self._set_running(pred.pending > 0)
                return
            n = s.request(box, preview=True) if box is not None else 0
            if whole:
                n += s.request(None, replace_goal=True)
            self.status.setText(f"{n} tiles queued ({'whole slide' if whole else 'view'}).")
            self._update_progress()
            self._set_running(pred.pending > 0)

        s.with_predictor(go, on_fail=lambda: self._set_running(False))

    def _view_box(self):
        """The part of the slide in view, level-0 px (None when the view misses the slide)."""
        s = self.session
        return viewport_bbox_px(self.viewer, s.mpp, s.slide.shape_yx)

    # --- bin models ------------------------------------------------------------------------
    @property
    def bins_worker(self):
        """The worker predicting a bin model's bins (None when none runs)."""
        return self.bin_runs.worker

    def _on_bins_started(self) -> None:
        self.progress.setFormat("%v / %m chunks")
        self.progress.setRange(0, 0)

    def _on_bins_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def _on_bins_finished(self) -> None:
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    # --- cancel ----------------------------------------------------------------------------
    def _on_cancel_clicked(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Drop the queued tiles (tiles already done are kept) and stop following the view."""
        self.bin_runs.cancel()
        self.session.cancel()
        self.follow_check.setChecked(False)
        self.status.setText("Cancelled; tiles already done are kept.")

    # --- feedback --------------------------------------------------------------------------
    def _on_tiles_done(self, tiles) -> None:
        self._update_progress()

    def _update_progress(self) -> None:
        done, total = self.session.progress()
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        if self.pbar is not None:
            if self.pbar.total != max(total, 1):
                self.pbar.total = max(total, 1)
            if done != self.pbar.n:
                self.pbar.update(done - self.pbar.n)

    def _on_session_busy(self, busy: bool) -> None:
        self._set_running(busy)
        if busy and self.pbar is None:
            self.pbar = tile_progress(self.session.progress()[1], self._on_pbar_cancelled)
        self._update_progress()
        if not busy:
            self._close_pbar()
        if not busy and self.session.goal:
            done, total = self.session.progress()
            if done < total:
                self.status.setText(f"Stopped at {done} / {total} tiles; tiles done are kept.")
            else:
                self.status.setText(f"Done: {done} / {total} tiles (off-tissue tiles are skipped).")

    def _on_pbar_cancelled(self) -> None:
        QTimer.singleShot(0, self.cancel)  # from napari's activity dock (Qt thread)

    def _close_pbar(self) -> None:
        pbar, self.pbar = self.pbar, None
        if pbar is not None:
            pbar.close()

    def _on_session_changed(self, what: str) -> None:
        if what in ("slide", "model", "device"):
            self.progress.setFormat("%v / %m chunks" if self.session.is_bins else "%v / %m tiles")
            self._update_progress()
            s = self.session
            if s.slide is not None and s.model_path is not None:
                self.status.setText("Ready: press 'Predict view' or tick 'Predict what I see'.")

    def _set_running(self, running: bool) -> None:
        self.cancel_btn.setEnabled(running)
        self.device_combo.setEnabled(not running)
