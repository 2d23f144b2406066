"""Dock "Genes": search a gene, add its heatmap, choose colours, scale and contrast.

A heatmap is the lazy multiscale view of one gene from the prediction store
(:func:`~napari_stmap.core.engine.gene_pyramid`): switching genes reads cached embeddings and
applies the model's pointwise head, it never reruns the network. NaN (not yet predicted) is
transparent. Layers are called ``stmap: GENE`` and are updated in place.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt
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

from ._plots import make_canvas, napari_cmap, style_axes
from ._session import PREFIX, get_session, notify_error, owned_layer

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


def gene_layer_data(pred, gene: str, mode: str, mpp: float) -> tuple[list, dict]:
    """Multiscale data and placement (µm) of a gene heatmap.

    ``scale`` is the output pixel in µm and ``translate`` the centre of output pixel (0, 0)
    in µm (from the store's :class:`~napari_stmap.core.geometry.MapGrid`), so each value sits
    over the slide area it describes.
    """
    from napari_stmap.core.engine import view_grid

    grid = view_grid(pred.store, 0)
    data = pred.gene_pyramid(gene, mode)
    place = {
        "scale": (grid.pixel_px * mpp,) * 2,
        "translate": tuple(v * mpp for v in grid.translate_yx),
    }
    return data, place


def contrast_from_data(layer) -> tuple[float, float] | None:
    """1st–99th percentile of what is predicted so far (coarsest level; worker-safe)."""
    arr = np.asarray(layer.data[-1] if layer.multiscale else layer.data, dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


class GenesWidget(QWidget):
    """Gene search, heatmap layers, colormap, opacity, scale, contrast and colour bar."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.mode = "normalised"
        self._contrast_workers: dict[str, object] = {}
        self._build()
        self.session.changed.connect(self._on_session_changed)
        self.session.tiles_done.connect(self._on_tiles_done)
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
        row.addWidget(self.search)
        row.addWidget(self.add_btn)
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
        self.canvas, self.figure = make_canvas(1.1)
        lay.addWidget(self.canvas)
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

    def add_gene(self, gene: str) -> None:
        """Add (or select) the heatmap of ``gene``; predicts nothing by itself."""
        genes = self.session.model_genes
        if not genes:
            notify_error("open a model in the 'Slide & data' dock first", "genes")
            return
        match = {g.lower(): g for g in genes}.get(gene.lower())
        if match is None:
            close = [g for g in genes if gene.lower() in g.lower()][:5]
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else "; type to see the model's genes"
            )
            notify_error(f"{gene!r} is not one of the model's {len(genes)} genes{hint}", "genes")
            return
        self.session.with_predictor(lambda pred: self._add_layer(pred, match))

    def _add_layer(self, pred, gene: str) -> None:
        name = gene_layer_name(gene)
        data, place = gene_layer_data(pred, gene, self.mode, self.session.mpp)
        layer = owned_layer(self.viewer, name)
        if layer is not None:  # update in place, never duplicate
            layer.data = data
            layer.metadata["stmap"]["mode"] = self.mode
        else:
            layer = self.viewer.add_image(
                data,
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
        if name in self._contrast_workers:
            return

        def done(limits) -> None:
            target = owned_layer(self.viewer, name)
            if limits is not None and target is not None:
                target.contrast_limits_range = limits
                target.contrast_limits = limits
                target.metadata["stmap"]["auto_contrast"] = True
                self._draw_colorbar()

        self._contrast_workers[name] = self.session.run(
            contrast_from_data,
            layer,
            on_done=done,
            on_finally=lambda: self._contrast_workers.pop(name, None),
            what="contrast",
        )

    def _on_tiles_done(self, tiles) -> None:
        for layer in self.gene_layers():
            layer.refresh()
            if not layer.metadata["stmap"].get("auto_contrast"):
                self.auto_contrast(layer)

    def _on_session_changed(self, what: str) -> None:
        if what == "model":
            from qtpy.QtCore import QStringListModel

            self.completer.setModel(QStringListModel(self.session.model_genes, self.completer))
        if what == "predictor" and self.session.predictor is not None:
            for layer in self.gene_layers():  # the store object changed: rebuild the views
                self._add_layer(self.session.predictor, layer.metadata["stmap"]["gene"])

    def _draw_colorbar(self) -> None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        self.figure.clear()
        layer = self.current_layer()
        if layer is None:
            self.canvas.draw_idle()
            return
        ax = self.figure.add_subplot(111)
        lo, hi = layer.contrast_limits
        sm = ScalarMappable(norm=Normalize(lo, hi), cmap=napari_cmap(layer.colormap))
        bar = self.figure.colorbar(sm, cax=ax, orientation="horizontal")
        mode = layer.metadata["stmap"]["mode"]
        gene = layer.metadata["stmap"]["gene"]
        if mode == "normalised":
            unit = f"{gene}: log1p(10⁴ · {gene} / total) per pixel"
        else:
            px = float(layer.scale[-1])
            unit = f"{gene}: expected counts per {px:.3g}×{px:.3g} µm pixel"
        bar.set_label(unit, fontsize=8)
        style_axes(ax)
        self.canvas.draw_idle()
