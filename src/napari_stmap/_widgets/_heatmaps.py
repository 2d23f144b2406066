"""Heatmap layers of the Genes dock, from the session's prediction source.

The kind of :class:`~napari_stmap.core.predict.PredictionSource` decides how a gene is shown:

- a dense model's :class:`~napari_stmap.core.predict.StoreSource`: a live multiscale view
  (:class:`~napari_stmap.core.predict.LiveGeneView`) of the predictor's store. Switching genes
  reads cached embeddings and applies the model's pointwise head, it never reruns the network.
  napari reads the blocks computed so far (NaN, transparent, where a tile is not predicted or
  its block not computed yet); the session's view worker computes the blocks a read missed and
  calls ``on_update`` (from its thread), and :meth:`Heatmaps.refresh` reads the layers again,
  paced by a :class:`~napari_stmap.core.display.RefreshPacer`.
- a bin model's :class:`~napari_stmap.core.predict.BinSource`: its raster
  (:meth:`~napari_stmap.core.predict.BinSource.gene_raster`, one pixel per bin, NaN where no
  bin was predicted), recomputed from the stored counts when the prediction or mode changes.

Both are placed in µm by their grids (:func:`~napari_stmap.core.display.grid_placement`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from napari_stmap.core.display import (
    RefreshPacer,
    contrast_from_view,
    gene_layer_name,
    grid_placement,
    is_bins_layer,
    is_gene_layer,
    percentile_limits,
)
from napari_stmap.core.predict import LiveGeneView, StoreSource, view_grid

from ._notify import notify_error
from ._viewer import owned_layer, viewport_bbox_px


def refresh_live_layer(layer, arrays) -> None:
    """Read ``layer`` (a live heatmap over the pyramid ``arrays``) again, coarsest level included.

    napari (0.9) keeps the coarsest level of a 2-D multiscale layer, read once per data object,
    for the thumbnail and for the view when zoomed out that far. Setting the data again (the
    same lazy arrays; public API) drops that copy, so both show the blocks computed since.
    """
    layer.data = arrays


class Heatmaps:
    """The heatmap layers of one viewer and the live views behind them.

    ``style()`` gives ``(colormap, opacity)`` for new layers; ``on_update`` is called from the
    view worker's thread when blocks are ready. Layers are called ``stmap: GENE`` and updated
    in place; their ``metadata["stmap"]`` holds ``gene``, ``mode`` and ``auto_contrast``.
    """

    def __init__(
        self, viewer, session, style: Callable[[], tuple[str, float]], on_update, refresh_ms: int
    ) -> None:
        self.viewer, self.session = viewer, session
        self._style, self._on_update = style, on_update
        self.views: dict[str, LiveGeneView] = {}  # layer name -> live view
        self.pacer = RefreshPacer(refresh_ms / 1e3)
        self.refreshes = 0  # layer refreshes so far (tests, benchmarks)
        self.contrast_workers: dict[str, object] = {}  # layer name -> worker

    def layers(self) -> list:
        """The heatmap layers of the viewer, in layer order."""
        return [layer for layer in self.viewer.layers if is_gene_layer(layer)]

    def _add_image(self, data, name: str, meta: dict, place: dict, **kwargs):
        colormap, opacity = self._style()
        return self.viewer.add_image(
            data,
            name=name,
            colormap=colormap,
            opacity=opacity,
            blending="translucent",
            contrast_limits=(0.0, 1.0),
            units=self.session.units,
            metadata={"stmap": meta},
            **kwargs,
            **place,
        )

    # --- any source ----------------------------------------------------------------------
    def show(self, source, gene: str, mode: str):
        """Add (or update in place) the heatmap of ``gene`` from ``source``; returns the layer."""
        if isinstance(source, StoreSource):
            return self.show_live(self.session.predictor, gene, mode)
        return self.show_raster(source, gene, mode)

    def switch(self, source, name: str, gene: str, mode: str):
        """Show ``gene`` in the heatmap ``name`` (renamed, updated in place); returns the layer."""
        if isinstance(source, StoreSource):
            return self.switch_live(self.session.predictor, name, gene, mode)
        return self.show_raster(source, gene, mode, replace=name)

    def redraw(self, source, mode: str, shown: Callable[[object], None]) -> None:
        """Rebuild every heatmap for ``mode`` from ``source`` (no network run; None: nothing).

        A live source rebuilds every heatmap, a raster source its own (raster) heatmaps;
        ``shown(layer)`` is called after each layer is updated.
        """
        if source is None:
            return
        live = isinstance(source, StoreSource)
        for layer in self.layers():
            gene = layer.metadata["stmap"]["gene"]
            if live:
                shown(self.show_live(self.session.predictor, gene, mode))
            elif is_bins_layer(layer):
                shown(self.show_raster(source, gene, mode, replace=layer.name))

    # --- rasters (bin models) --------------------------------------------------------------
    def show_raster(self, source, gene: str, mode: str, replace: str | None = None):
        """Add or update the raster heatmap of ``gene``; ``replace``: reuse that layer."""
        name = gene_layer_name(gene)
        data, grid = source.gene_raster(gene, mode=mode)
        place = grid_placement(grid, self.session.mpp)
        layer = owned_layer(self.viewer, replace or name)
        if layer is not None and not is_bins_layer(layer):  # a dense model's live view
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            meta = {"kind": "gene", "gene": gene, "mode": mode, "bins": True}
            return self._add_image(data, name, meta, place)
        layer.metadata["stmap"].update(gene=gene, mode=mode, auto_contrast=False)
        layer.name = name
        layer.data = data
        layer.scale, layer.translate = place["scale"], place["translate"]
        return layer

    # --- live views (dense models) --------------------------------------------------------
    def _live_view(self, pred, gene: str, mode: str):
        """A live multiscale view of ``gene`` and its placement (µm) for an image layer."""
        view = LiveGeneView(
            pred,
            gene,
            mode,
            worker=self.session.view_worker(),
            on_update=self._on_update,
            mask=pred.display_mask(),  # computed when the predictor was built (worker)
        )
        return view, grid_placement(view_grid(pred.store, 0), self.session.mpp)

    def show_live(self, pred, gene: str, mode: str):
        """Add the live heatmap of ``gene`` (or give its layer a new view, in place)."""
        name = gene_layer_name(gene)
        view, place = self._live_view(pred, gene, mode)
        old = self.views.pop(name, None)
        if old is not None:
            old.close()
        self.views[name] = view
        layer = owned_layer(self.viewer, name)
        if layer is not None and is_bins_layer(layer):  # a bin model's raster: rebuild
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            meta = {"kind": "gene", "gene": gene, "mode": mode}
            return self._add_image(view.arrays, name, meta, place, multiscale=True, cache=False)
        layer.metadata["stmap"]["mode"] = mode
        layer.data = view.arrays
        return layer

    def switch_live(self, pred, name: str, gene: str, mode: str):
        """Show ``gene`` in the live heatmap ``name`` (renamed; no new layer); returns the layer."""
        layer, new = owned_layer(self.viewer, name), gene_layer_name(gene)
        if layer is None or owned_layer(self.viewer, new) is not None:
            return self.show_live(pred, gene, mode)
        view, _ = self._live_view(pred, gene, mode)
        old = self.views.pop(name, None)
        if old is not None:
            old.close()
        self.pacer.forget(name, last=True)
        self.views[new] = view
        layer.metadata["stmap"].update(gene=gene, mode=mode, auto_contrast=False)
        layer.name = new
        layer.data = view.arrays
        return layer

    def drop_missing(self) -> None:
        """Close the views of heatmap layers no longer in the viewer."""
        present = {layer.name for layer in self.layers()}
        for name in [n for n in self.views if n not in present]:
            self.views.pop(name).close()
            self.pacer.forget(name)

    # --- contrast --------------------------------------------------------------------------
    def auto_contrast(self, layer, then: Callable[[], None]) -> None:
        """Set ``layer``'s contrast limits from the values predicted so far; then ``then()``.

        A bin model's raster is small and in memory: here and now. A live view's coarsest
        level is computed in a worker (one per layer at a time).
        """
        name = layer.name
        if is_bins_layer(layer):
            limits = percentile_limits(layer.data)
            if limits is not None:
                _set_limits(layer, limits)
            then()
            return
        view = self.views.get(name)
        if name in self.contrast_workers or view is None:
            return

        def done(limits) -> None:
            target = owned_layer(self.viewer, name)
            if limits is not None and target is not None and self.views.get(name) is view:
                _set_limits(target, limits)
                then()

        self.contrast_workers[name] = self.session.run(
            contrast_from_view,
            view,
            on_done=done,
            on_finally=lambda: self.contrast_workers.pop(name, None),
            what="contrast",
        )

    # --- refresh ---------------------------------------------------------------------------
    def visible_tiles(self, tiles) -> list:
        """The ``tiles`` (i, j) of the predictor that lie (partly) in the view."""
        s, pred = self.session, self.session.predictor
        if pred is None or s.slide is None:
            return []
        box = viewport_bbox_px(self.viewer, s.mpp, s.slide.shape_yx)
        shown = set(pred.spec.tiles_in_bbox(box)) if box is not None else set()
        return [t for t in map(tuple, tiles) if t in shown]

    def tiles_done(self, tiles, contrast: Callable[[object], None]) -> None:
        """Tiles were predicted: recompute their blocks in the layers that show them (worker).

        Tiles out of view cost nothing now; thumbnails catch up when prediction stops. Layers
        whose contrast was never set from data get ``contrast(layer)``.
        """
        hits = self.visible_tiles(tiles)
        for layer in self.layers():
            view = self.views.get(layer.name)
            if view is not None and hits and layer.visible:
                view.tiles_done(hits)
            if not layer.metadata["stmap"].get("auto_contrast"):
                contrast(layer)

    def mark_all(self) -> None:
        """Read every live layer again soon (e.g. thumbnails once prediction stops)."""
        now = time.monotonic()
        for name in self.views:
            self.pacer.mark(name, now)

    def refresh(self) -> None:
        """Read again the live layers whose blocks arrived, coalesced (see the pacer)."""
        now = time.monotonic()
        for name, view in list(self.views.items()):
            if view.error is not None:
                exc, view.error = view.error, None
                notify_error(exc, f"drawing {name}")
            if view.take_updated():
                self.pacer.mark(name, now)
            if not self.pacer.due(name, now, functools.partial(view.worker.pending_for, view)):
                continue
            layer = owned_layer(self.viewer, name)
            if layer is not None:
                self.pacer.refreshed(name, now)
                self.refreshes += 1
                refresh_live_layer(layer, view.arrays)


def _set_limits(layer, limits: tuple[float, float]) -> None:
    layer.contrast_limits_range = limits
    layer.contrast_limits = limits
    layer.metadata["stmap"]["auto_contrast"] = True
