"""Interactive, prioritised tile prediction into a store, and ``ensure_region`` on top of it.

:meth:`Predictor.request` schedules the tiles covering a region, nearest to its centre first,
latest request first; reader threads prefetch windows, a worker thread (never the caller's)
runs the network in batches and a writer thread stores embeddings and reports finished tiles
(``on_tile_done`` callback and/or a :class:`queue.Queue`). :func:`ensure_region` predicts what a
region needs, blocking, and returns its dense map and
:class:`~napari_stmap.core.geometry.MapGrid`.

Units: boxes ``bbox_yx = (y0, x0, y1, x1)`` are level-0 px of the slide; tiles are ``(i, j)``
(row, column) in the tile grid of the store's :class:`~napari_stmap.core.tiling.TileSpec`;
maps are (C, H, W) in output px of the store's grid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StmapInputError
from ..geometry import MapGrid
from ..io.slide import Slide, open_slide
from ..store import TODO, PredictionStore, open_store, read_store_meta
from ..tiling import TileSpec, TissueMask, plan_tiles, tissue_mask, tissue_tiles
from .budget import BatchPlan, choose_batch
from .device import as_model, ready_model, resolve_precision, torch_device
from .pipeline import _Pipeline, embed_windows
from .preview import (
    DEFAULT_PREVIEW_TILES,
    plan_preview,
    preview_spec,
    preview_tile_px,
    run_preview,
)
from .reader import DEFAULT_IMAGE_CACHE_BYTES, SlideReader, Tile, as_slide
from .scheduler import TileScheduler
from .views import as_store, gene_pyramid, gene_view, region_map

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "DISPLAY_MASK_MARGIN_UM",
    "Predictor",
    "ensure_region",
    "plan_for_store",
    "stored_tiling",
    "tissue_grid",
]

log = logging.getLogger(__name__)

#: Margin around tissue kept in displayed heatmaps, µm (one mask pixel of the default mask).
DISPLAY_MASK_MARGIN_UM = 8.0


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
    batch_size : int, optional
        Tiles per forward pass (default: chosen for the device within ``max_memory_gb`` by
        :func:`~napari_stmap.core.predict.budget.choose_batch`: 1 on the CPU).
    tile_px, halo_px : int, optional
        Tile core side and halo in model px (default: the store's, else
        :func:`~napari_stmap.core.tiling.default_tile_px`, smaller if one window of it does
        not fit the budget, and the model's ``halo_px``).
    max_memory_gb : float, optional
        Memory budget of the prediction, GB (default: a fraction of the free memory; see
        :func:`~napari_stmap.core.predict.budget.choose_batch`). The choice is :attr:`plan`.
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
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast dtype; ``"auto"`` is resolved for the device and model by
        :func:`~napari_stmap.core.predict.device.resolve_precision` (the result is
        :attr:`precision`); fp32 runs without autocast.
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
    preview_tiles : int, optional
        Small tiles run first at the centre of a ``request(..., preview=True)`` (see
        :mod:`~napari_stmap.core.predict.preview`): a viewer's first pixels come in a fraction
        of a regular tile's time, then the regular tiles replace them. Default: 4 on the CPU,
        0 (off) on GPUs, where a regular tile takes a fraction of a second.

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
        batch_size: int | None = None,
        tile_px: int | None = None,
        halo_px: int | None = None,
        max_memory_gb: float | None = None,
        tissue: bool | TissueMask = True,
        on_tile_done: Callable[[Tile], Any] | None = None,
        done_queue: queue.Queue | None = None,
        precision: str = "auto",
        dtype: str = "float16",
        readers: int = 1,
        image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES,
        paused: bool = False,
        num_threads: int | None = None,
        preview_tiles: int | None = None,
    ) -> None:
        self.device = torch_device(device)
        self._num_threads = None if num_threads is None else max(1, int(num_threads))
        self.slide = as_slide(slide)
        model_path = None if hasattr(model, "embed") else Path(model)
        self.model = ready_model(as_model(model), self.device)
        self.precision = precision = resolve_precision(self.device, self.model, precision)
        tile_px, halo_px = stored_tiling(store_path, tile_px, halo_px)
        self.plan: BatchPlan = choose_batch(
            self.model,
            self.device,
            batch_size=batch_size,
            tile_px=tile_px,
            halo_px=halo_px,
            max_memory_gb=max_memory_gb,
            extra_bytes=image_cache_bytes,
            precision=precision,
        )
        log.info("%s", self.plan.describe())
        self.spec = plan_for_store(self.slide, self.model, store_path, self.plan.tile_px, halo_px)
        self.store = open_store(
            store_path, self.model, self.slide, self.spec, "a", dtype=dtype, model_path=model_path
        )
        self._tissue_mask = _tissue_mask_for(self.slide, self.spec, tissue)
        self._on_tissue = tissue_tiles(self._tissue_mask, self.spec)
        self._tissue_arg = tissue
        if preview_tiles is None:
            preview_tiles = DEFAULT_PREVIEW_TILES if self.device.type == "cpu" else 0
        self.preview_tiles = max(0, int(preview_tiles))
        self._preview: tuple[SlideReader, np.ndarray] | None = None  # made on first use
        self._display_mask: TissueMask | None | bool = False  # False: not computed yet
        self.reader = SlideReader(self.slide, self.spec, image_cache_bytes)
        self.on_tile_done, self.done_queue = on_tile_done, done_queue
        self._error: BaseException | None = None
        self._scheduler = TileScheduler(self.store, self._tile_finished)
        self._scheduler.set_paused(paused)
        self._stop = threading.Event()
        self._pipeline = _Pipeline(
            self.model,
            self.reader,
            self.store,
            batch_size=self.plan.batch_size,
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
    def request(
        self, bbox_yx: Sequence[float] | None = None, priority: float = 0, *, preview: bool = False
    ) -> int:
        """Schedule the tiles covering a level-0 px box (default: the whole slide).

        Tiles run nearest to the box's centre first; a later request (or a higher
        ``priority``) goes before earlier ones. Tiles done, queued or off tissue are not
        queued again (off-tissue ones are flagged skipped). Returns the number queued.
        ``preview``: first run up to :attr:`preview_tiles` small tiles at the on-tissue spot
        nearest the centre (memory only; ``done_queue`` receives their regular tile so a
        viewer redraws it; ``on_tile_done`` is only called for stored tiles).
        """
        box = (0.0, 0.0, *map(float, self.slide.shape_yx)) if bbox_yx is None else tuple(bbox_yx)
        if preview and self.preview_tiles:
            self._scheduler.push_urgent(lambda: self._run_preview(box))
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

    def warm_up(self) -> None:
        """Run the network once on a blank preview window (blocking; call it from a worker).

        The first forward pass of a model pays one-off costs (kernel selection, buffers) of
        about a pass again; a viewer calls this while it loads the model so that the first
        "predict what I see" does not. Nothing is stored. No-op without previews.
        """
        small = self._preview_reader()
        if small is None:
            return
        blank = np.full((1, small.spec.window_px, small.spec.window_px, 3), 255, np.uint8)
        with _threads(self.device, self._num_threads):
            embed_windows(self.model, blank, small.spec, self.device, self.precision)

    # --- threads ------------------------------------------------------------------------
    def _preview_reader(self) -> SlideReader | None:
        """The reader of preview tiles (made once), None when previews are off."""
        if not self.preview_tiles:
            return None
        if self._preview is None:
            k = preview_tile_px(self.spec)
            if k is None:
                self.preview_tiles = 0
                return None
            small = preview_spec(self.spec, k)
            reader = SlideReader(self.slide, small, cache_bytes=0)
            reader.cache = self.reader.cache  # decoded slide blocks are shared
            # on the display mask (tissue + 8 µm), not the planning one (+ one halo): a
            # preview on glass would be hidden
            self._preview = (reader, tissue_tiles(self.display_mask(), small))
        return self._preview[0]

    def _run_preview(self, box: tuple[float, ...]) -> None:
        """Compute thread: the small tiles of a request (errors are logged; the regular tiles
        report them)."""
        try:
            if self._preview_reader() is None:
                return
            reader, on_tissue = self._preview
            tiles = plan_preview(
                self.store, reader.spec, box, n=self.preview_tiles, on_tissue=on_tissue
            )
            with _threads(self.device, self._num_threads, all_cores=True):
                run_preview(
                    self.model,
                    reader,
                    self.store,
                    tiles,
                    device=self.device,
                    precision=self.precision,
                    on_tile=self.done_queue.put if self.done_queue is not None else None,
                    stop=lambda: self._stop.is_set() or self._scheduler.paused,
                )
        except Exception:
            log.exception("preview tiles failed")

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


@contextlib.contextmanager
def _threads(device: Any, num_threads: int | None, *, all_cores: bool = False) -> Iterator[None]:
    """torch's CPU threads on this thread meanwhile: ``num_threads`` (None: as they are), or
    every core (``all_cores``; previews are short and the readers wait for them, so the core a
    GUI keeps is free for that long)."""
    if device.type != "cpu" or num_threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    want = num_threads
    if all_cores:
        try:
            want = max(num_threads, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not on Linux
            want = max(num_threads, os.cpu_count() or 1)
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored_tiling(
    store_path: Any, tile_px: int | None, halo_px: int | None
) -> tuple[int | None, int | None]:
    """Tile core and halo (model px): as given, else an existing store's, else None."""
    meta = read_store_meta(store_path)
    if meta is not None:
        tile_px = tile_px or int(meta["spec"]["tile_px"])
        halo_px = int(meta["spec"]["halo_px"]) if halo_px is None else halo_px
    return tile_px, halo_px


def plan_for_store(
    slide: Slide,
    model: Any,
    store_path: Any,
    tile_px: int | None,
    halo_px: int | None,
    new_tile_px: int | None = None,
) -> TileSpec:
    """Whole-slide plan; unset tile size/halo come from an existing store, else a new store's
    tile is ``new_tile_px`` (default :func:`~napari_stmap.core.tiling.default_tile_px`)."""
    tile_px, halo_px = stored_tiling(store_path, tile_px, halo_px)
    return plan_tiles(slide, model, tile_px=tile_px or new_tile_px, halo_px=halo_px)


def tissue_grid(slide: Slide, spec: TileSpec, tissue: bool | TissueMask) -> np.ndarray:
    """Bool tile grid: which tiles touch tissue (mask dilated by one halo)."""
    return tissue_tiles(_tissue_mask_for(slide, spec, tissue), spec)


def _tissue_mask_for(slide: Slide, spec: TileSpec, tissue: bool | TissueMask) -> TissueMask | None:
    """The mask tiles are planned with (dilated by one halo); None: every tile."""
    if tissue is False or tissue is None:
        return None
    if isinstance(tissue, TissueMask):
        return tissue
    return tissue_mask(slide, dilate_um=spec.halo_px * spec.model_mpp)


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
    batch_size: int | None = None,
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
        For the temporary predictor (store sources only; ``batch_size`` None: chosen for the
        device, see :class:`Predictor`).

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
        store = as_store(source)
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
    store: PredictionStore, model: Any, device: str, batch_size: int | None
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
