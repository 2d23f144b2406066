"""Dock "Slide & data": pick the slide, the measured spots/bins and the model file.

Shows what was found (size, µm/px, bins, genes, model genes and their overlap with the measured
genes) and warns, as napari notifications, when something does not fit (µm/px unknown, bins
outside the slide, no shared genes). Files are read in workers; nothing blocks the Qt thread.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_stmap.core.display import (
    bin_size_choices,
    gene_overlap_warning,
    inputs_summary,
    model_kind_warning,
    opened_spots,
    read_spots_checked,
    stmap_meta,
    unknown_mpp_warning,
)
from napari_stmap.core.io.slide import open_slide
from napari_stmap.core.model import read_model_metadata

from .._layers import spots_layer
from ._dialogs import ask_open_path
from ._notify import notify_error, notify_warning
from ._qt import button, combo, group, refill, row, status_label
from ._session import get_session
from ._viewer import PREFIX, owned_layer, replace_layer, show_slide, slide_layers

MEASURED_LAYER = f"{PREFIX}measured total counts"


def _read_slide(path: str):
    return open_slide(path)


class SlideDataWidget(QWidget):
    """Pick a slide, measured data and a model; show what was found."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self._adding_slide_layer = False
        self._reading_spots = False
        self._build()
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.session.changed.connect(self._on_session_changed)
        self._on_layers_changed()
        self._on_session_changed("")

    # --- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        box, form = group("H&&E slide")  # "&&": a single & would be a Qt mnemonic
        tip = "Image layers opened with napari-stmap (File > Open)"
        self.slide_combo = combo(self._on_slide_combo_activated, tip)
        self.open_slide_btn = button("Open slide…", self._on_open_slide_clicked)
        form.addRow("layer", self.slide_combo)
        form.addRow(self.open_slide_btn)
        lay.addWidget(box)
        box, form = group("Measured spots / bins (optional)")
        self.open_outs_btn = button("Space Ranger / SpatialData…", self._on_open_outs_clicked)
        self.open_h5ad_btn = button(".h5ad…", self._on_open_h5ad_clicked)
        form.addRow(row(self.open_outs_btn, self.open_h5ad_btn))
        tip = "Visium HD: which bin size to read (µm)"
        self.bin_combo = combo(self._on_bin_combo_activated, tip)
        self.bin_combo.setEnabled(False)
        form.addRow("bin size", self.bin_combo)
        lay.addWidget(box)
        box, form = group("Model")
        self.open_model_btn = button("Open model (.safetensors)…", self._on_open_model_clicked)
        form.addRow(self.open_model_btn)
        lay.addWidget(box)
        self.info = status_label(rich=True)
        lay.addWidget(self.info)
        lay.addStretch(1)
        self._buttons = [
            self.open_slide_btn,
            self.open_outs_btn,
            self.open_h5ad_btn,
            self.open_model_btn,
        ]

    def _set_enabled(self, on: bool) -> None:
        for b in self._buttons:
            b.setEnabled(on)

    # --- slide -----------------------------------------------------------------------------
    def _on_layers_changed(self, event=None) -> None:
        names = [layer.name for layer in slide_layers(self.viewer)]
        refill(self.slide_combo, names)
        if self.session.slide is None and names and not self._adding_slide_layer:
            self.use_slide_layer(names[0])  # a slide layer from napari's reader
        self._use_opened_spots()

    def _use_opened_spots(self) -> None:
        """Use measured bins that napari's reader opened (File > Open Folder), if none yet."""
        if self.session.spots is not None or self._reading_spots:
            return
        found = opened_spots(self.viewer.layers, skip=MEASURED_LAYER)
        if found is not None:
            self.load_spots(found[0], bin_um=found[1], show=False)

    def _on_slide_combo_activated(self, index: int) -> None:
        self.use_slide_layer(self.slide_combo.itemText(index))

    def use_slide_layer(self, name: str):
        """Use the slide behind the image layer ``name`` (opened in a worker)."""
        layer = owned_layer(self.viewer, name)
        meta = stmap_meta(layer)
        if not meta.get("path"):
            notify_error(
                f"layer {name!r} has no napari-stmap slide metadata; open the slide with 'Open slide…'"
            )
            return None
        return self._open_slide(meta["path"], layer_name=name)

    def _on_open_slide_clicked(self) -> None:
        filters = "Slides (*.svs *.tif *.tiff *.ome.tif *.jpg *.png)"
        path = ask_open_path(self, "Open H&E slide", filters)
        if path:
            self.load_slide(path)

    def load_slide(self, path: str | Path):
        """Open the slide file ``path`` and add it as a layer (worker); returns the worker."""
        return self._open_slide(str(path), layer_name=None)

    def _open_slide(self, path: str, layer_name: str | None):
        self._set_enabled(False)

        def done(slide) -> None:
            name = layer_name
            if name is None:
                self._adding_slide_layer = True  # this slide is set below: do not open it twice
                try:
                    name = show_slide(self.viewer, slide)
                finally:
                    self._adding_slide_layer = False
            warning = unknown_mpp_warning(slide, Path(path).name)
            if warning is not None:
                notify_warning(warning)
            self.session.set_slide(slide, name)

        return self.session.run(
            _read_slide,
            path,
            on_done=done,
            on_finally=lambda: self._set_enabled(True),
            what="opening the slide",
        )

    # --- measured data ---------------------------------------------------------------------
    def _on_open_outs_clicked(self) -> None:
        path = ask_open_path(self, "Space Ranger outs, binned_outputs or SpatialData .zarr folder")
        if path:
            self.load_spots(path)

    def _on_open_h5ad_clicked(self) -> None:
        path = ask_open_path(self, "Spatial AnnData", "AnnData (*.h5ad)")
        if path:
            self.load_spots(path)

    def _on_bin_combo_activated(self, index: int) -> None:
        if self.session.spots_path is not None:
            self.load_spots(self.session.spots_path, bin_um=float(self.bin_combo.itemData(index)))

    def load_spots(self, path: str | Path, bin_um: float | None = None, *, show: bool = True):
        """Read measured spots/bins (worker), show them as a layer; returns the worker.

        ``show=False``: the bins are on screen already (a layer from napari's reader).
        """
        path = str(path)
        try:
            sizes, bin_um = bin_size_choices(path, bin_um)
        except Exception as exc:
            notify_error(exc, "reading the measured data")
            return None
        refill(self.bin_combo, [f"{s:g} µm" for s in sizes], sizes)
        if bin_um is not None and sizes:
            self.bin_combo.setCurrentIndex(sizes.index(bin_um) if bin_um in sizes else 0)
        self.bin_combo.setEnabled(bool(sizes))
        self._set_enabled(False)
        self._reading_spots = True

        def done(result) -> None:
            spots, texts = result
            for text in texts:
                notify_warning(text)
            if show:
                self._show_spots(spots)
            self.session.set_spots(spots, path)
            self._check_overlap()

        return self.session.run(
            read_spots_checked,
            path,
            bin_um,
            self.session.slide,
            on_done=done,
            on_finally=self._on_spots_read,
            what="reading the measured data",
        )

    def _on_spots_read(self) -> None:
        self._reading_spots = False
        self._set_enabled(True)

    def _show_spots(self, spots) -> None:
        data, kwargs, kind = spots_layer(spots, name=MEASURED_LAYER)
        kwargs.update(name=MEASURED_LAYER, visible=False)  # one layer, replaced on reload
        replace_layer(self.viewer, kind, data, kwargs, old_name=MEASURED_LAYER)

    # --- model -----------------------------------------------------------------------------
    def _on_open_model_clicked(self) -> None:
        path = ask_open_path(self, "napari-stmap model", "Model (*.safetensors)")
        if path:
            self.load_model(path)

    def load_model(self, path: str | Path) -> bool:
        """Use the model file ``path`` (only its JSON header is read here)."""
        try:
            meta = read_model_metadata(path)
        except Exception as exc:
            notify_error(exc, "opening the model")
            return False
        warning = model_kind_warning(meta, Path(path).name)
        if warning is not None:
            notify_warning(warning)
        self.session.set_model(path, meta)
        self._check_overlap()
        return True

    def _check_overlap(self) -> None:
        s = self.session
        warning = None if s.spots is None else gene_overlap_warning(s.model_genes, s.spots.genes)
        if warning is not None:
            notify_warning(warning)

    # --- summary ---------------------------------------------------------------------------
    def _on_session_changed(self, what: str) -> None:
        s = self.session
        self.info.setText("<br>".join(inputs_summary(s.slide, s.spots, s.model_path, s.model_meta)))
