"""How a session gets its predictions: the predictor of a dense model, or a bin model and its bins.

:class:`PredictionsMixin` is the part of :class:`~._session.Session` that loads things in
workers and hands them to the docks on the Qt thread: the
:class:`~napari_stmap.core.predict.Predictor` (its store named by
:func:`~napari_stmap.core.store.store_path_for`; tiles requested, counted and cancelled here),
a bin model and its latest :class:`~napari_stmap.core.predict.BinPrediction`, and the
:class:`~napari_stmap.core.predict.PredictionSource` over either
(:meth:`~PredictionsMixin.with_source`), so the docks ask one interface whatever the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_stmap.core.model import load_model
from napari_stmap.core.predict import BinSource, Predictor, StoreSource
from napari_stmap.core.store import TODO, store_path_for

from .._sample_data import cache_dir
from ._lifetime import freeze_startup_objects
from ._notify import notify_error


def gui_threads() -> int:
    """Torch CPU threads for the network in the viewer: all cores but one (at least 1).

    torch's OpenMP threads spin at barriers, so with every core busy the Qt thread waits for
    the scheduler and the viewer stutters.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class PredictionsMixin:
    """Predictor, bin model, bins and prediction source of a :class:`~._session.Session`.

    Uses the session's state (``slide``, ``model_path``, ``model_meta``, ``device``,
    ``predictor``, ``bin_model``, ``bins``, ``goal``, …), its signals (``changed``,
    ``bins_changed``) and :meth:`~._session.Session.run`.
    """

    # --- bin models ------------------------------------------------------------------------
    def set_bins(self, prediction, *, merge: bool = False) -> None:
        """Keep ``prediction`` (a BinPrediction, or None); ``merge``: add it to the one kept."""
        if merge and prediction is not None and self.bins is not None:
            prediction = self.bins.merged(prediction)
        if prediction is None and self.bins is None:
            return
        self.bins = prediction
        self.bins_changed.emit()

    def with_bin_model(
        self, then: Callable[[Any], None], on_fail: Callable[[], None] | None = None
    ) -> None:
        """Call ``then(model)`` on the Qt thread with the bin model, loading it in a worker first."""
        key = (self.model_path, self.device)
        if self.bin_model is not None and self._bin_model_key == key:
            then(self.bin_model)
            return
        if not self._inputs_ready():
            if on_fail is not None:
                on_fail()
            return
        self._bin_model_waiting.append((then, on_fail))
        if len(self._bin_model_waiting) > 1:
            return  # already loading

        def load():
            import torch

            torch.set_num_threads(gui_threads())
            return load_model(key[0], device=key[1])

        def done(model) -> None:
            if (self.model_path, self.device) != key:
                failed(RuntimeError("the model or device changed while loading; try again"))
                return
            self.bin_model, self._bin_model_key = model, key
            waiting, self._bin_model_waiting = self._bin_model_waiting, []
            for fn, _ in waiting:
                fn(model)

        def failed(exc: BaseException) -> None:
            waiting, self._bin_model_waiting = self._bin_model_waiting, []
            for _, fail in waiting:
                if fail is not None:
                    fail()

        self.run(
            load,
            on_done=done,
            on_error=failed,
            what="loading the model",
            progress={"total": 0, "desc": "stmap: loading model"},
        )

    # --- prediction source -----------------------------------------------------------------
    def with_source(
        self,
        then: Callable[[Any, Any], None],
        on_fail: Callable[[], None] | None = None,
        *,
        timeout: float | None = None,
        load_model: bool = True,
    ) -> None:
        """Call ``then(source, model)`` on the Qt thread with this session's prediction.

        ``source`` is a :class:`~napari_stmap.core.predict.PredictionSource`: for a dense
        model a :class:`~napari_stmap.core.predict.StoreSource` over the predictor (built in a
        worker first; ``timeout``: seconds to wait for the tiles one block of regions needs),
        for a bin model a :class:`~napari_stmap.core.predict.BinSource` of the latest bin
        prediction (:attr:`bins`, the model loaded in a worker first). ``model`` is the
        loaded model. ``on_fail`` runs when either cannot be loaded. ``load_model=False``: a
        bin prediction is enough (sums and rasters need no model), so ``model`` may be None.
        """
        if self.is_bins:
            slide, device = self.slide, self.device

            def with_bins(model) -> None:
                then(BinSource(self.bins, model=model, slide=slide, device=device), model)

            if self.bins is not None and not load_model:
                with_bins(self.bin_model)
            else:
                self.with_bin_model(with_bins, on_fail)
            return
        self.with_predictor(
            lambda pred: then(StoreSource(pred, timeout=timeout), pred.model), on_fail
        )

    def current_source(self):
        """This session's prediction source as it is now (builds and loads nothing), or None.

        A :class:`~napari_stmap.core.predict.StoreSource` over the predictor once it is built
        (dense model); a :class:`~napari_stmap.core.predict.BinSource` of :attr:`bins` once
        there is a bin prediction or the bin model is loaded.
        """
        if self.is_bins:
            if self.bins is None and self.bin_model is None:
                return None
            return BinSource(self.bins, model=self.bin_model, slide=self.slide, device=self.device)
        return None if self.predictor is None else StoreSource(self.predictor)

    def values_missing(self) -> str | None:
        """Why there are no values to sum yet (a bin model before its first prediction), or None."""
        if self.is_bins and self.bins is None:
            return "a bin model gives regions from its bin prediction: press 'Predict view' first"
        return None

    # --- predictor -------------------------------------------------------------------------
    def store_path(self) -> Path:
        """Prediction store of this slide and model (reused across sessions).

        Named by :func:`~napari_stmap.core.store.store_path_for` (hashes the model file: not
        on the Qt thread) under :attr:`store_root`, else the cache's ``stores`` folder.
        """
        root = self.store_root or cache_dir() / "stores"
        root.mkdir(parents=True, exist_ok=True)
        return store_path_for(self.slide.path, self.model_path, root)

    def with_predictor(
        self, then: Callable[[Any], None], on_fail: Callable[[], None] | None = None
    ) -> None:
        """Call ``then(predictor)`` on the Qt thread, building the predictor in a worker first.

        ``on_fail`` runs when it cannot be built (the error is shown as a notification). When
        the slide, model or device change while it is being built, it is built again for them.
        """
        if self.predictor is not None:
            then(self.predictor)
            return
        if self.is_bins:
            notify_error(
                f"{self.model_path.name} is a bin model ({self.model_meta.get('arch')}); this needs "
                "a dense model such as pixnet",
                "predict",
            )
            if on_fail is not None:
                on_fail()
            return
        if not self._inputs_ready():
            if on_fail is not None:
                on_fail()
            return
        self._after_predictor.append((then, on_fail))
        self._build_predictor()

    def _inputs_ready(self) -> bool:
        missing = [
            n for n, v in (("a slide", self.slide), ("a model", self.model_path)) if v is None
        ]
        if missing:
            notify_error(
                f"load {' and '.join(missing)} in the 'Slide & data' dock first", "predict"
            )
        return not missing

    def _build_predictor(self) -> None:
        if self._predictor_worker is not None:
            return
        slide, model_path, device = self.slide, self.model_path, self.device

        def build():
            pred = Predictor(
                slide,
                model_path,
                self.store_path(),  # hashes the model file: not on the Qt thread
                device=device,
                done_queue=self.done_queue,
                num_threads=gui_threads(),
            )
            pred.display_mask()  # heatmaps hide glass; reads a thumbnail: not on the Qt thread
            pred.warm_up()  # the first "predict what I see" then shows pixels sooner
            return pred

        def done(pred) -> None:
            stale = slide is not self.slide or model_path != self.model_path
            if self.closed or stale or device != self.device:
                pred.close()  # the callbacks wait for the next build (see finish)
                return
            self.predictor = pred
            freeze_startup_objects()
            self.changed.emit("predictor")
            callbacks, self._after_predictor = self._after_predictor, []
            for then, _ in callbacks:
                then(pred)

        def failed(exc: BaseException) -> None:
            callbacks, self._after_predictor = self._after_predictor, []
            for _, fail in callbacks:
                if fail is not None:
                    fail()

        def finish() -> None:
            self._predictor_worker = None
            if self.closed or self.predictor is not None or not self._after_predictor:
                return
            if self._inputs_ready():  # inputs changed meanwhile: build for the new ones
                self._build_predictor()
            else:
                failed(RuntimeError("inputs gone"))

        self._predictor_worker = self.run(
            build,
            on_done=done,
            on_error=failed,
            on_finally=finish,
            what="loading the model",
            progress={"total": 0, "desc": "stmap: loading model"},
        )

    def request(
        self, bbox_yx: Sequence[float] | None, *, replace_goal: bool = True, preview: bool = False
    ) -> int:
        """Ask the predictor for a level-0 px box (None: whole slide); returns tiles queued.

        ``preview``: small tiles at the box's centre first (first pixels sooner on a CPU).
        """
        pred = self.predictor
        if pred is None:
            return 0
        box = (0.0, 0.0, *map(float, self.slide.shape_yx)) if bbox_yx is None else tuple(bbox_yx)
        n = pred.request(box, preview=preview)
        tiles = pred.spec.tiles_in_bbox(box)
        self.goal = tiles if replace_goal else sorted(set(self.goal) | set(tiles))
        self._set_busy(pred.pending > 0)
        return n

    def progress(self) -> tuple[int, int]:
        """(tiles settled, tiles wanted) of the latest request(s)."""
        pred = self.predictor
        if pred is None or not self.goal:
            return 0, 0
        done = sum(1 for t in self.goal if pred.store.state(t) != TODO)
        return done, len(self.goal)

    def cancel(self) -> None:
        """Drop queued tiles (the batch in flight is still written)."""
        if self.predictor is not None:
            self.predictor.cancel()

    def drop_predictor(self) -> None:
        """Close the predictor (its threads are joined); a new one is built on demand."""
        pred, self.predictor = self.predictor, None
        self.goal = []
        if pred is not None:
            pred.close()
            self.changed.emit("predictor")
        self._set_busy(False)
