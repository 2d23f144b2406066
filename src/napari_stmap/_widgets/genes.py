"""Dock "Genes": search a gene, add its heatmap, choose colours, scale and contrast.

A heatmap is a :class:`~napari_stmap.core.engine.LiveGeneView` of one gene from the prediction
store: switching genes reads cached embeddings and applies the model's pointwise head, it never
reruns the network. The Qt thread never computes either: napari reads the blocks computed so
far (NaN, transparent, where a tile is not predicted or its block not computed yet), the
session's view worker computes the blocks a read missed and wakes the dock, which refreshes the
layer, at most every :attr:`GenesWidget.REFRESH_MS` (a 50 ms timer catches up on deferred
refreshes). Finished tiles only cause work for the layers showing them. Layers are called
``stmap: GENE`` and updated in place; "Show in selected" switches a layer to another gene.

With a bin model (MagNet) a heatmap is an image of one pixel per bin
(:meth:`~napari_stmap.core.bins.BinPrediction.gene_raster` of the session's latest bin
prediction; NaN, transparent, where no bin was predicted), placed in µm like the dense maps
(``scale`` = bin side, ``translate`` = centre of the first bin). Switching genes or values
recomputes the raster from the stored counts; a new prediction updates the layers in place.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QCompleter,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from ._plots import ColorBar, colormap_rgba
from ._session import PREFIX, get_session, notify_error, owned_layer, viewport_bbox_px

logger = logging.getLogger(__name__)

MODES = {
    "normalised": "normalised  log1p(1e4·gene/total)",
    "absolute": "absolute (expected counts)",
}
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "red", "green", "blue", "gray")


def gene_layer_name(gene: str) -> str:
    """Name of the heatmap layer of ``gene``."""
    return f"{PREFIX}{gene}"


def is_gene_layer(layer) -> bool:
    """Whether ``layer`` is a heatmap made by this dock."""
    return (layer.metadata.get("stmap") or {}).get("kind") == "gene"


def gene_layer_view(session, pred, gene: str, mode: str, on_update=None):
    """A live multiscale view of ``gene`` and its placement (µm) for an image layer.

    ``scale`` is the output pixel in µm and ``translate`` the centre of output pixel (0, 0)
    in µm (from the store's :class:`~napari_stmap.core.geometry.MapGrid`), so each value sits
    over the slide area it describes.
    """
    from napari_stmap.core.predict import LiveGeneView, view_grid

    grid = view_grid(pred.store, 0)
    view = LiveGeneView(
        pred,
        gene,
        mode,
        worker=session.view_worker(),
        on_update=on_update,
        mask=pred.display_mask(),  # computed when the predictor was built (worker)
    )
    mpp = session.mpp
    place = {
        "scale": (grid.pixel_px * mpp,) * 2,
        "translate": tuple(v * mpp for v in grid.translate_yx),
    }
    return view, place


def bins_layer_data(session, gene: str, mode: str) -> tuple[np.ndarray, dict]:
    """Raster (H, W) of ``gene`` from the session's bin prediction and its placement (µm).

    Without a prediction yet: one NaN pixel of the model's bin size at the origin.
    """
    from napari_stmap.core.predict import model_bin_um

    mpp, pred = session.mpp, session.bins
    if pred is None:
        b = model_bin_um(session.model_meta)
        return np.full((1, 1), np.nan, np.float32), {"scale": (b, b), "translate": (b / 2,) * 2}
    raster, grid = pred.gene_raster(gene, mode)
    place = {
        "scale": (grid.pixel_px * mpp,) * 2,
        "translate": tuple(v * mpp for v in grid.translate_yx),
    }
    return raster, place


def is_bins_layer(layer) -> bool:
    """Whether ``layer`` is a heatmap of a bin model (a plain raster, not a live view)."""
    return bool((layer.metadata.get("stmap") or {}).get("bins"))


def raster_contrast(data) -> tuple[float, float] | None:
    """1st–99.5th percentile of the finite values of a raster."""
    arr = np.asarray(data)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def refresh_live_layer(layer, arrays) -> None:
    """Read ``layer`` (a live heatmap over the pyramid ``arrays``) again, coarsest level included.

    napari (0.9) keeps the coarsest level of a 2-D multiscale layer, read once per data object,
    for the thumbnail and for the view when zoomed out that far. Setting the data again (the
    same lazy arrays; public API) drops that copy, so both show the blocks computed since.
    """
    layer.data = arrays


def contrast_from_view(view) -> tuple[float, float] | None:
    """1st–99.5th percentile of what is predicted so far (coarsest level; worker thread)."""
    arr = view.level_data(-1)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


class GenesWidget(QWidget):
    """Gene search, heatmap layers, colormap, opacity, scale, contrast and colour bar."""

    #: Emitted from the view worker's thread when a view's blocks are ready (queued to Qt).
    blocks_ready = Signal()

    #: Shortest interval between two refreshes of one layer (ms).
    REFRESH_MS = 200
    #: How often finished blocks are looked for (ms).
    POLL_MS = 50

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.mode = "normalised"
        self._contrast_workers: dict[str, object] = {}
        self.views: dict[str, object] = {}  # layer name -> LiveGeneView
        self._stale: dict[str, float] = {}  # layer -> since when it has blocks not shown
        self._last_refresh: dict[str, float] = {}
        self.refreshes = 0  # layer refreshes so far (tests, benchmarks)
        self._build()
        self._timer = QTimer(self)
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self._on_refresh_timer)
        self._timer.start()
        self.blocks_ready.connect(self._on_refresh_timer)  # no polling delay when idle
        self.session.changed.connect(self._on_session_changed)
        self.session.tiles_done.connect(self._on_tiles_done)
        self.session.busy.connect(self._on_session_busy)
        self.session.bins_changed.connect(self._on_bins_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.events.inserted.connect(self._on_layers_inserted)
        self._on_session_changed("model")
        self._sync_list()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.search = QLineEdit()
        self.search.setPlaceholderText("gene, e.g. ERBB2")
        self.search.returnPressed.connect(self._on_add_clicked)
        self.completer = QCompleter([])
        self.completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.search.setCompleter(self.completer)
        self.add_btn = QPushButton("Add heatmap")
        self.add_btn.clicked.connect(self._on_add_clicked)
        self.switch_btn = QPushButton("Show in selected")
        self.switch_btn.setToolTip(
            "Show this gene in the heatmap selected below instead of adding a layer"
        )
        self.switch_btn.clicked.connect(self._on_switch_clicked)
        row.addWidget(self.search)
        row.addWidget(self.add_btn)
        row.addWidget(self.switch_btn)
        lay.addLayout(row)
        self.layer_list = QListWidget()
        self.layer_list.setMaximumHeight(110)
        self.layer_list.currentTextChanged.connect(self._on_list_current_changed)
        lay.addWidget(self.layer_list)
        self.remove_btn = QPushButton("Remove heatmap")
        self.remove_btn.clicked.connect(self._on_remove_clicked)
        lay.addWidget(self.remove_btn)
        form = QFormLayout()
        self.mode_combo = QComboBox()
        for key, text in MODES.items():
            self.mode_combo.addItem(text, key)
        self.mode_combo.activated.connect(self._on_mode_activated)
        form.addRow("values", self.mode_combo)
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.cmap_combo.activated.connect(self._on_cmap_activated)
        form.addRow("colormap", self.cmap_combo)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(70)
        self.opacity.valueChanged.connect(self._on_opacity_changed)
        form.addRow("opacity", self.opacity)
        lay.addLayout(form)
        self.contrast_btn = QPushButton("Contrast from data so far")
        self.contrast_btn.clicked.connect(self._on_contrast_clicked)
        lay.addWidget(self.contrast_btn)
        self.colorbar = ColorBar()
        lay.addWidget(self.colorbar)
        lay.addStretch(1)

    # --- helpers ---------------------------------------------------------------------------
    def gene_layers(self) -> list:
        """The heatmap layers of this viewer, in layer order."""
        return [layer for layer in self.viewer.layers if is_gene_layer(layer)]

    def current_layer(self):
        """The heatmap selected in the list (or the last one)."""
        item = self.layer_list.currentItem()
        layer = owned_layer(self.viewer, item.text()) if item is not None else None
        layers = self.gene_layers()
        return layer if layer is not None else (layers[-1] if layers else None)

    def _sync_list(self) -> None:
        names = [layer.name for layer in self.gene_layers()]
        current = self.layer_list.currentItem().text() if self.layer_list.currentItem() else None
        self.layer_list.blockSignals(True)
        self.layer_list.clear()
        self.layer_list.addItems(names)
        if names:
            self.layer_list.setCurrentRow(
                names.index(current) if current in names else len(names) - 1
            )
        self.layer_list.blockSignals(False)
        self._draw_colorbar()

    # --- adding / removing -----------------------------------------------------------------
    def _on_add_clicked(self) -> None:
        self.add_gene(self.search.text().strip())

    def _on_switch_clicked(self) -> None:
        self.switch_gene(self.search.text().strip())

    def match_gene(self, gene: str) -> str | None:
        """The model's spelling of ``gene`` (any case), else None (with a notification)."""
        genes = self.session.model_genes
        if not genes:
            notify_error("open a model in the 'Slide & data' dock first", "genes")
            return None
        match = {g.lower(): g for g in genes}.get(gene.lower())
        if match is None:
            close = [g for g in genes if gene.lower() in g.lower()][:5]
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else "; type to see the model's genes"
            )
            notify_error(f"{gene!r} is not one of the model's {len(genes)} genes{hint}", "genes")
        return match

    def add_gene(self, gene: str) -> None:
        """Add (or select) the heatmap of ``gene``; predicts nothing by itself."""
        match = self.match_gene(gene)
        if match is not None and self.session.is_bins:
            self._add_bins_layer(match)
        elif match is not None:
            self.session.with_predictor(lambda pred: self._add_layer(pred, match))

    def switch_gene(self, gene: str) -> None:
        """Show ``gene`` in the selected heatmap layer (renamed, updated in place).

        Cheaper than :meth:`add_gene` (napari builds no new layer, controls or visual); with no
        heatmap yet, or when ``gene`` already has one, it adds or selects that one instead.
        """
        match = self.match_gene(gene)
        if match is None:
            return
        layer = self.current_layer()
        if layer is None or owned_layer(self.viewer, gene_layer_name(match)) is not None:
            self.add_gene(match)
            return
        name = layer.name
        if self.session.is_bins:
            self._add_bins_layer(match, replace=name)
            return
        self.session.with_predictor(lambda pred: self._switch_layer(pred, name, match))

    def _add_bins_layer(self, gene: str, replace: str | None = None) -> None:
        """Add or update the raster heatmap of ``gene`` (bin model); ``replace``: reuse a layer."""
        name = gene_layer_name(gene)
        data, place = bins_layer_data(self.session, gene, self.mode)
        layer = owned_layer(self.viewer, replace or name)
        if layer is not None and not is_bins_layer(layer):  # a dense model's live view
            self.viewer.layers.remove(layer)
            layer = None
        if layer is not None:
            layer.metadata["stmap"].update(gene=gene, mode=self.mode, auto_contrast=False)
            layer.name = name
            layer.data = data
            layer.scale, layer.translate = place["scale"], place["translate"]
        else:
            layer = self.viewer.add_image(
                data,
                name=name,
                colormap=self.cmap_combo.currentText(),
                opacity=self.opacity.value() / 100,
                blending="translucent",
                contrast_limits=(0.0, 1.0),
                units=self.session.units,
                metadata={"stmap": {"kind": "gene", "gene": gene, "mode": self.mode, "bins": True}},
                **place,
            )
        self._sync_list()
        items = self.layer_list.findItems(name, Qt.MatchFlag.MatchExactly)
        if items:
            self.layer_list.setCurrentItem(items[0])
        self.auto_contrast(layer)

    def _on_bins_changed(self) -> None:
        """A new bin prediction: update the raster heatmaps in place (no network run)."""
        if not self.session.is_bins:
            return
        for layer in self.gene_layers():
            if is_bins_layer(layer):
                self._add_bins_layer(layer.metadata["stmap"]["gene"], replace=layer.name)

    def _switch_layer(self, pred, name: str, gene: str) -> None:
        layer, new = owned_layer(self.viewer, name), gene_layer_name(gene)
        if layer is None or owned_layer(self.viewer, new) is not None:
            self._add_layer(pred, gene)
            return
        view, _ = gene_layer_view(self.session, pred, gene, self.mode, self._wake)
        old = self.views.pop(name, None)
        if old is not None:
            old.close()
        self._stale.pop(name, None)
        self._last_refresh.pop(name, None)
        self.views[new] = view
        layer.metadata["stmap"].update(gene=gene, mode=self.mode, auto_contrast=False)
        layer.name = new
        layer.data = view.arrays
        self._sync_list()
        items = self.layer_list.findItems(new, Qt.MatchFlag.MatchExactly)
        if items:
            self.layer_list.setCurrentItem(items[0])
        self.auto_contrast(layer)

    def _add_layer(self, pred, gene: str) -> None:
        name = gene_layer_name(gene)
        view, place = gene_layer_view(self.session, pred, gene, self.mode, self._wake)
        old = self.views.pop(name, None)
        if old is not None:
            old.close()
        self.views[name] = view
        layer = owned_layer(self.viewer, name)
        if layer is not None and is_bins_layer(layer):  # a bin model's raster: rebuild
            self.viewer.layers.remove(layer)
            layer = None
        if layer is not None:  # update in place, never duplicate
            layer.metadata["stmap"]["mode"] = self.mode
            layer.data = view.arrays
        else:
            layer = self.viewer.add_image(
                view.arrays,
                name=name,
                multiscale=True,
                colormap=self.cmap_combo.currentText(),
                opacity=self.opacity.value() / 100,
                blending="translucent",
                contrast_limits=(0.0, 1.0),
                cache=False,
                units=self.session.units,
                metadata={"stmap": {"kind": "gene", "gene": gene, "mode": self.mode}},
                **place,
            )
        self._sync_list()
        items = self.layer_list.findItems(name, Qt.MatchFlag.MatchExactly)
        if items:
            self.layer_list.setCurrentItem(items[0])
        self.auto_contrast(layer)

    def _on_remove_clicked(self) -> None:
        layer = self.current_layer()
        if layer is not None:
            self.viewer.layers.remove(layer)

    def _on_layer_removed(self, event=None) -> None:
        present = {layer.name for layer in self.gene_layers()}
        for name in [n for n in self.views if n not in present]:
            self.views.pop(name).close()
            self._stale.pop(name, None)
        self._sync_list()

    def _on_layers_inserted(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and is_gene_layer(layer):
            self._sync_list()

    # --- display ---------------------------------------------------------------------------
    def _on_mode_activated(self, index: int) -> None:
        self.set_mode(self.mode_combo.itemData(index))

    def set_mode(self, mode: str) -> None:
        """Show every heatmap as ``"normalised"`` or ``"absolute"`` values (no network run)."""
        self.mode = mode
        self.mode_combo.setCurrentIndex(list(MODES).index(mode))
        if self.session.is_bins:
            for layer in self.gene_layers():
                if is_bins_layer(layer):
                    self._add_bins_layer(layer.metadata["stmap"]["gene"], replace=layer.name)
            return
        pred = self.session.predictor
        if pred is None:
            return
        for layer in self.gene_layers():
            self._add_layer(pred, layer.metadata["stmap"]["gene"])

    def _on_cmap_activated(self, index: int) -> None:
        layer = self.current_layer()
        if layer is not None:
            layer.colormap = self.cmap_combo.itemText(index)
            self._draw_colorbar()

    def _on_opacity_changed(self, value: int) -> None:
        layer = self.current_layer()
        if layer is not None:
            layer.opacity = value / 100

    def _on_list_current_changed(self, name: str) -> None:
        layer = owned_layer(self.viewer, name)
        if layer is None:
            return
        self.cmap_combo.setCurrentText(layer.colormap.name)
        self.opacity.blockSignals(True)
        self.opacity.setValue(round(layer.opacity * 100))
        self.opacity.blockSignals(False)
        self.viewer.layers.selection.active = layer
        self._draw_colorbar()

    def _on_contrast_clicked(self) -> None:
        for layer in self.gene_layers():
            self.auto_contrast(layer)

    def auto_contrast(self, layer) -> None:
        """Set ``layer``'s contrast limits from the values predicted so far (worker)."""
        name = layer.name
        if is_bins_layer(layer):  # a small in-memory raster: no worker needed
            limits = raster_contrast(layer.data)
            if limits is not None:
                layer.contrast_limits_range = limits
                layer.contrast_limits = limits
                layer.metadata["stmap"]["auto_contrast"] = True
            self._draw_colorbar()
            return
        view = self.views.get(name)
        if name in self._contrast_workers or view is None:
            return

        def done(limits) -> None:
            target = owned_layer(self.viewer, name)
            if limits is not None and target is not None and self.views.get(name) is view:
                target.contrast_limits_range = limits
                target.contrast_limits = limits
                target.metadata["stmap"]["auto_contrast"] = True
                self._draw_colorbar()

        self._contrast_workers[name] = self.session.run(
            contrast_from_view,
            view,
            on_done=done,
            on_finally=lambda: self._contrast_workers.pop(name, None),
            what="contrast",
        )

    def visible_tiles(self, tiles) -> list:
        """The ``tiles`` that lie (partly) in the view."""
        s, pred = self.session, self.session.predictor
        if pred is None or s.slide is None:
            return []
        box = viewport_bbox_px(self.viewer, s.mpp, s.slide.shape_yx)
        shown = set(pred.spec.tiles_in_bbox(box)) if box is not None else set()
        return [t for t in map(tuple, tiles) if t in shown]

    def _on_tiles_done(self, tiles) -> None:
        """Tiles were predicted: recompute their blocks in the layers that show them (worker).

        Tiles out of view cost nothing now; thumbnails catch up when prediction stops.
        """
        hits = self.visible_tiles(tiles)
        for layer in self.gene_layers():
            view = self.views.get(layer.name)
            if view is not None and hits and layer.visible:
                view.tiles_done(hits)
            if not layer.metadata["stmap"].get("auto_contrast"):
                self.auto_contrast(layer)

    def _on_session_busy(self, busy: bool) -> None:
        if not busy:  # prediction stopped: show what finished out of view (thumbnails)
            now = time.monotonic()
            for name in self.views:
                self._stale.setdefault(name, now)

    def _wake(self) -> None:
        """From the view worker's thread: blocks are ready (refresh without waiting a tick)."""
        with contextlib.suppress(RuntimeError):  # the dock is already deleted
            self.blocks_ready.emit()

    def _on_refresh_timer(self) -> None:
        """Refresh the layers whose blocks arrived, coalesced.

        A layer is refreshed once the worker has finished its queued blocks (or after
        ``REFRESH_MS`` of waiting for them), and at most once every ``REFRESH_MS``.
        """
        if self.session.closed:
            self._timer.stop()
            return
        now = time.monotonic()
        for name, view in list(self.views.items()):
            if view.error is not None:
                exc, view.error = view.error, None
                notify_error(exc, f"drawing {name}")
            if view.take_updated():
                self._stale.setdefault(name, now)
            since = self._stale.get(name)
            if since is None:
                continue
            waited = (now - since) * 1e3 >= self.REFRESH_MS
            if not waited and view.worker.pending_for(view):
                continue
            if (now - self._last_refresh.get(name, -1e9)) * 1e3 < self.REFRESH_MS:
                continue
            del self._stale[name]
            layer = owned_layer(self.viewer, name)
            if layer is not None:
                self._last_refresh[name] = now
                self.refreshes += 1
                refresh_live_layer(layer, view.arrays)

    def _on_session_changed(self, what: str) -> None:
        if what == "model":
            from qtpy.QtCore import QStringListModel

            self.completer.setModel(QStringListModel(self.session.model_genes, self.completer))
        if what == "predictor" and self.session.predictor is not None:
            for layer in self.gene_layers():  # the store object changed: rebuild the views
                self._add_layer(self.session.predictor, layer.metadata["stmap"]["gene"])

    def _draw_colorbar(self) -> None:
        layer = self.current_layer()
        if layer is None:
            self.colorbar.clear_bar()
            return
        mode = layer.metadata["stmap"]["mode"]
        gene = layer.metadata["stmap"]["gene"]
        if mode == "normalised":
            unit = f"{gene}: log1p(10⁴ · {gene} / total) per pixel"
        else:
            px = float(layer.scale[-1])
            unit = f"{gene}: expected counts per {px:.3g}×{px:.3g} µm pixel"
        self.colorbar.set_bar(colormap_rgba(layer.colormap), layer.contrast_limits, unit)
