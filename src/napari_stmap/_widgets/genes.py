"""Dock "Genes": search a gene, add its heatmap, choose colours, scale and contrast.

The heatmap layers (``stmap: GENE``, updated in place) and the live views behind them are
:class:`~._heatmaps.Heatmaps`'s; switching genes never reruns the network and the Qt thread
computes nothing. Layers whose blocks arrived are refreshed at most every
:attr:`GenesWidget.REFRESH_MS` (:class:`~._live_refresh.LiveRefresh`; a 50 ms timer catches up
on deferred refreshes); finished tiles only cause work for the layers showing them. "Show in
selected" switches a layer to another gene.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFormLayout, QSlider, QVBoxLayout, QWidget

from napari_stmap.core.display import (
    COLORMAPS,
    MODES,
    colorbar_label,
    gene_layer_name,
    is_gene_layer,
    match_gene,
)

from ._gene_search import GeneSearch
from ._heatmaps import Heatmaps
from ._live_refresh import LiveRefresh
from ._notify import notify_error
from ._plots import ColorBar, colormap_rgba
from ._qt import NameList, button, combo, refill
from ._session import get_session
from ._viewer import owned_layer


class GenesWidget(QWidget):
    """Gene search, heatmap layers, colormap, opacity, scale, contrast and colour bar."""

    #: Shortest interval between two refreshes of one layer (ms).
    REFRESH_MS = 200
    #: How often finished blocks are looked for (ms).
    POLL_MS = 50

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.mode = "normalised"
        self._build()
        self.heatmaps = Heatmaps(
            self.viewer, self.session, self._style, self._wake, self.REFRESH_MS
        )
        self._contrast_workers = self.heatmaps.contrast_workers  # layer name -> worker
        self.views = self.heatmaps.views  # layer name -> LiveGeneView
        self._stale = self.heatmaps.pacer.stale  # layer -> since when it has blocks not shown
        self._last_refresh = self.heatmaps.pacer.last
        self.live = LiveRefresh(self, self.heatmaps, self.POLL_MS, self.auto_contrast)
        self.session.changed.connect(self._on_session_changed)
        self.session.bins_changed.connect(self._on_bins_changed)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.events.inserted.connect(self._on_layers_inserted)
        self._on_session_changed("model")
        self._sync_list()

    @property
    def refreshes(self) -> int:
        """Layer refreshes so far (tests, benchmarks)."""
        return self.heatmaps.refreshes

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        self.gene_search = GeneSearch()
        self.gene_search.add_requested.connect(self.add_gene)
        self.gene_search.switch_requested.connect(self.switch_gene)
        self.search = self.gene_search.search
        lay.addWidget(self.gene_search)
        self.layer_list = NameList()
        self.layer_list.setMaximumHeight(110)
        self.layer_list.currentTextChanged.connect(self._on_list_current_changed)
        lay.addWidget(self.layer_list)
        self.remove_btn = button("Remove heatmap", self._on_remove_clicked)
        lay.addWidget(self.remove_btn)
        form = QFormLayout()
        self.mode_combo = combo(self._on_mode_activated)
        refill(self.mode_combo, list(MODES.values()), list(MODES))
        form.addRow("values", self.mode_combo)
        self.cmap_combo = combo(self._on_cmap_activated, None, COLORMAPS)
        form.addRow("colormap", self.cmap_combo)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(70)
        self.opacity.valueChanged.connect(self._on_opacity_changed)
        form.addRow("opacity", self.opacity)
        lay.addLayout(form)
        self.contrast_btn = button("Contrast from data so far", self._on_contrast_clicked)
        lay.addWidget(self.contrast_btn)
        self.colorbar = ColorBar()
        lay.addWidget(self.colorbar)
        lay.addStretch(1)

    def _style(self) -> tuple[str, float]:
        return self.cmap_combo.currentText(), self.opacity.value() / 100

    # --- helpers ---------------------------------------------------------------------------
    def gene_layers(self) -> list:
        """The heatmap layers of this viewer, in layer order."""
        return self.heatmaps.layers()

    def current_layer(self):
        """The heatmap selected in the list (or the last one)."""
        name = self.layer_list.current_name()
        layer = owned_layer(self.viewer, name) if name is not None else None
        layers = self.gene_layers()
        return layer if layer is not None else (layers[-1] if layers else None)

    def _sync_list(self) -> None:
        self.layer_list.set_names([layer.name for layer in self.gene_layers()])
        self._draw_colorbar()

    def _shown(self, layer) -> None:
        """``layer`` was added or updated: list it, select it, set its contrast."""
        self._sync_list()
        self.layer_list.select(layer.name)
        self.auto_contrast(layer)

    # --- adding / removing -----------------------------------------------------------------
    def match_gene(self, gene: str) -> str | None:
        """The model's spelling of ``gene`` (any case), else None (with a notification)."""
        match, problem = match_gene(gene, self.session.model_genes)
        if problem is not None:
            notify_error(problem, "genes")
        return match

    def add_gene(self, gene: str) -> None:
        """Add (or select) the heatmap of ``gene``; predicts nothing by itself."""
        match = self.match_gene(gene)
        if match is not None:
            self.session.with_source(
                lambda source, _model: self._shown(self.heatmaps.show(source, match, self.mode)),
                load_model=False,
            )

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
        self.session.with_source(
            lambda source, _model: self._shown(
                self.heatmaps.switch(source, name, match, self.mode)
            ),
            load_model=False,
        )

    def _redraw_all(self) -> None:
        """Rebuild every heatmap for the current mode and prediction (no network run)."""
        self.heatmaps.redraw(self.session.current_source(), self.mode, self._shown)

    def _on_bins_changed(self) -> None:
        """A new bin prediction: update the raster heatmaps in place (no network run)."""
        self._redraw_all()

    def _on_remove_clicked(self) -> None:
        layer = self.current_layer()
        if layer is not None:
            self.viewer.layers.remove(layer)

    def _on_layer_removed(self, event=None) -> None:
        self.heatmaps.drop_missing()
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
        self._redraw_all()

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
        self.heatmaps.auto_contrast(layer, self._draw_colorbar)

    def visible_tiles(self, tiles) -> list:
        """The ``tiles`` that lie (partly) in the view."""
        return self.heatmaps.visible_tiles(tiles)

    def _wake(self) -> None:
        """From the view worker's thread: blocks are ready (see :class:`~._live_refresh.LiveRefresh`)."""
        self.live.wake()

    def _on_session_changed(self, what: str) -> None:
        if what == "model":
            self.gene_search.set_genes(self.session.model_genes)
        if what == "predictor" and self.session.predictor is not None:
            self._redraw_all()  # the store object changed: rebuild the views

    def _draw_colorbar(self) -> None:
        layer = self.current_layer()
        if layer is None:
            self.colorbar.clear_bar()
            return
        meta = layer.metadata["stmap"]
        label = colorbar_label(meta["gene"], meta["mode"], float(layer.scale[-1]))
        self.colorbar.set_bar(colormap_rgba(layer.colormap), layer.contrast_limits, label)
