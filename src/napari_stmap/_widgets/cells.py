"""Dock "Cells": per-cell predicted expression, shown and exported.

Cells come from the built-in nucleus segmentation (a simple baseline), a label image (Cellpose,
StarDist, InstanSeg TIFF), QuPath GeoJSON or a Labels layer of the viewer, for the view or the
whole slide, optionally grown by some µm into the cytoplasm. Shown as one Labels layer (outlined
when zoomed in: ``_cell_outlines``) and a gene as an Image of per-cell values looked up from the
labels chunk by chunk (:func:`~napari_stmap.core.cells.view.value_pyramid`): switching genes
swaps a lookup table. Work runs in a worker; export writes ``cells.h5ad`` + ``cells.geojson``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from qtpy.QtWidgets import QDoubleSpinBox, QLineEdit, QVBoxLayout, QWidget

from napari_stmap.core.cells import write_cells
from napari_stmap.core.cells.view import (
    cell_values,
    compute_dock_cells,
    layer_placement,
    value_pyramid,
)
from napari_stmap.core.regions import REGION_TIMEOUT_S

from ._cell_outlines import OutlineSwitch
from ._dialogs import ask_open_path, ask_save_path
from ._notify import notify_error, notify_info
from ._qt import button, combo, refill, row, status_label
from ._session import get_session
from ._viewer import PREFIX, owned_layer, replace_layer, viewport_bbox_px

SOURCES = {
    "segment": "built-in nuclei (baseline)",
    "labels": "label image (TIFF, zarr)",
    "geojson": "GeoJSON (QuPath)",
    "layer": "Labels layer",
}
CELLS_LAYER = f"{PREFIX}cells"
BASELINE_NOTE = "The built-in segmentation is a simple baseline: for real work load a Cellpose / StarDist / InstanSeg label image or QuPath cells (GeoJSON)."


class CellsWidget(QWidget):
    """Find cells, sum the prediction over each, colour them by a gene, export."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.cells = None  # DockCells of the last run
        self._worker = None
        self._work = tempfile.TemporaryDirectory(prefix="stmap-cells-")
        self._build()
        self.outlines = OutlineSwitch(napari_viewer, CELLS_LAYER, CELLS_LAYER + " ")
        self.session.changed.connect(self._on_session_changed)
        self._on_session_changed("model")

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        self.source = combo(self._on_source_changed, items=list(SOURCES.values()))
        lay.addLayout(row("cells from", self.source))
        self.path = QLineEdit()
        self.path.setPlaceholderText("label image or GeoJSON file")
        self.browse = button("…", self._on_browse_clicked)
        self.layer_box = combo(lambda _i: None, "Labels layer with the cells")
        lay.addLayout(row(self.path, self.browse, self.layer_box))
        self.expand = QDoubleSpinBox()
        self.expand.setRange(0.0, 50.0)
        self.expand.setSuffix(" µm")
        self.expand.setToolTip("grow each nucleus into a cell by this distance (no overlaps)")
        self.extent = combo(lambda _i: None, items=["current view", "whole slide"])
        lay.addLayout(row("expand", self.expand, "over", self.extent))
        self.run_btn = button("Find cells + expression", self._on_run_clicked)
        lay.addWidget(self.run_btn)
        self.gene = combo(self._on_gene_changed, "colour the cells by this gene")
        self.mode = combo(self._on_gene_changed, items=["normalised", "counts"])
        lay.addLayout(row("colour by", self.gene, self.mode))
        self.export_btn = button("Export cells (.h5ad + .geojson)…", self._on_export_clicked)
        lay.addWidget(self.export_btn)
        self.status = status_label(BASELINE_NOTE)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self._on_source_changed(0)

    # --- inputs ----------------------------------------------------------------------------
    def source_key(self) -> str:
        return list(SOURCES)[self.source.currentIndex()]

    def _on_source_changed(self, _index: int) -> None:
        key = self.source_key()
        self.path.setVisible(key in ("labels", "geojson"))
        self.browse.setVisible(key in ("labels", "geojson"))
        self.layer_box.setVisible(key == "layer")
        if key == "layer":
            from napari.layers import Labels

            names = [ly.name for ly in self.viewer.layers if isinstance(ly, Labels)]
            refill(self.layer_box, [n for n in names if n != CELLS_LAYER])

    def _on_browse_clicked(self) -> None:
        filters = "GeoJSON (*.geojson *.json)" if self.source_key() == "geojson" else None
        path = ask_open_path(self, "Cells", filters or "Label images (*.tif *.tiff *.npy)")
        if path:
            self.path.setText(path)

    def _on_session_changed(self, what: str) -> None:
        if what in ("model", "predictor"):
            genes = self.session.model_genes if self.session.model_path else []
            refill(self.gene, [*genes, "total"] if genes else [])

    def set_source(self, key: str, *, path: str | Path = "", layer: str = "") -> None:
        """Choose the cells' source (``segment``, ``labels``, ``geojson``, ``layer``)."""
        self.source.setCurrentIndex(list(SOURCES).index(key))
        self._on_source_changed(self.source.currentIndex())
        self.path.setText(str(path))
        if layer:
            self.layer_box.setCurrentText(layer)

    # --- run -------------------------------------------------------------------------------
    def _on_run_clicked(self) -> None:
        self.run()

    def run(self):
        """Find and measure the cells in a worker; returns the worker or None."""
        s, key = self.session, self.source_key()
        if s.slide is None or s.model_path is None or s.is_bins:
            notify_error("open a slide and a dense model in 'Slide & data' first", "cells")
            return None
        if key in ("labels", "geojson") and not self.path.text().strip():
            notify_error(f"choose a {SOURCES[key]} file first", "cells")
            return None
        layer = self._layer_input() if key == "layer" else None
        if key == "layer" and layer is None:
            notify_error("choose a Labels layer with the cells", "cells")
            return None
        bbox = None
        if self.extent.currentIndex() == 0:
            bbox = viewport_bbox_px(self.viewer, s.mpp, s.slide.shape_yx)
            if bbox is None:
                notify_error(
                    "the view does not show the slide; pan to it or use 'whole slide'", "cells"
                )
                return None
        self.run_btn.setEnabled(False)
        self.status.setText("finding cells and summing the prediction…")
        options = {
            "how": key,
            "path": self.path.text().strip() or None,
            "layer": layer,
            "expand_um": float(self.expand.value()),
            "bbox_yx": bbox,
            "work_dir": self._work.name,
        }

        def start(pred) -> None:
            from napari_stmap.core.predict import StoreSource

            source = StoreSource(pred, timeout=REGION_TIMEOUT_S, background=0.0)
            self._worker = s.run(
                lambda: compute_dock_cells(s.slide, source, **options),
                on_done=self._on_cells_done,
                on_finally=self._on_worker_finished,
                what="cells",
                progress={"total": 0, "desc": "stmap: cells"},
            )

        s.with_predictor(start, on_fail=self._on_worker_finished)
        return self._worker

    def _layer_input(self):
        name = self.layer_box.currentText()
        layer = owned_layer(self.viewer, name) if name else None
        if layer is None:
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        return data, tuple(layer.scale[-2:]), name

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)

    def _on_cells_done(self, cells) -> None:
        self.cells = cells
        place = layer_placement(cells.origin, cells.factor, self.session.mpp)
        levels = cells.levels if len(cells.levels) > 1 else cells.levels[0]
        kwargs = {"name": CELLS_LAYER, "opacity": 0.8, "units": self.session.units, **place}
        kwargs["metadata"] = {"stmap": {"kind": "cells", "source": cells.kind}}
        replace_layer(self.viewer, "labels", levels, kwargs)
        self.outlines.update()  # outlines when zoomed in
        n = cells.table.n
        self.status.setText(f"{n:,} cells ({cells.kind}), coloured by the chosen gene")
        if n == 0:
            notify_info("no cells found here; pan to tissue or choose another source")
        self._on_gene_changed()

    # --- colour and export -----------------------------------------------------------------
    def _on_gene_changed(self, _index: int | None = None) -> None:
        gene = self.gene.currentText()
        if self.cells is None or not gene or self.cells.table.n == 0:
            return
        self.show_gene(gene, self.mode.currentText())

    def show_gene(self, gene: str, mode: str = "normalised"):
        """Show ``stmap: cells GENE``: each cell's value as an image (returns the layer)."""
        c = self.cells
        values = cell_values(c.table, c.table.output_names, gene, mode)
        pyramid = value_pyramid(c.levels, c.table.ids, values)
        finite = values[values == values]
        limits = (float(finite.min()), float(finite.max()) or 1.0) if finite.size else (0.0, 1.0)
        kwargs = {
            "name": f"{PREFIX}cells {gene}",
            "colormap": "magma",
            "contrast_limits": limits if limits[1] > limits[0] else (limits[0], limits[0] + 1),
            "multiscale": len(pyramid) > 1,
            "metadata": {"stmap": {"kind": "cell values", "gene": gene, "mode": mode}},
            "units": self.session.units,
            **layer_placement(c.origin, c.factor, self.session.mpp),
        }
        for name in [ly.name for ly in self.viewer.layers if ly.name.startswith(CELLS_LAYER + " ")]:
            self.viewer.layers.remove(name)
        data = pyramid if len(pyramid) > 1 else pyramid[0]
        layer = replace_layer(self.viewer, "image", data, kwargs)
        cells_layer = owned_layer(self.viewer, CELLS_LAYER)
        if cells_layer is not None:  # the outlines above the values
            self.viewer.layers.move(self.viewer.layers.index(cells_layer), len(self.viewer.layers))
        self.outlines.update()
        return layer

    def _on_export_clicked(self) -> None:
        path, overwrite = ask_save_path(self, "Export cells", "cells.h5ad", "AnnData (*.h5ad)")
        if path:
            self.export(path, overwrite=overwrite)

    def export(self, path: str | Path, *, overwrite: bool = False):
        """Write ``cells.h5ad`` + ``cells.geojson``; returns their paths (None on refusal)."""
        if self.cells is None or self.cells.table.n == 0:
            notify_error("find cells first", "export")
            return None
        s = self.session
        prov = {"store": str(s.predictor.store.path) if s.predictor else "", "slide": s.slide.path}
        prov.update(mpp=s.mpp, source=self.cells.kind, expand_um=float(self.expand.value()))
        genes = self.cells.table.output_names[:-1]
        try:
            return write_cells(
                self.cells.table, path, genes, mpp=s.mpp, provenance=prov, overwrite=overwrite
            )
        except Exception as exc:  # shown to the user, the dock stays usable
            notify_error(exc, "export")
            return None
