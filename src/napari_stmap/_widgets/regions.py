"""Dock "Regions": drawn shapes and spot grids -> predicted expression table, bar chart, export.

Regions come from every regions Shapes layer (drawn here or opened GeoJSON, e.g. QuPath
annotations; shapes sharing a ``feature`` are one region, ``hole`` shapes subtract) and the
spot grid (:mod:`._region_layers`, :mod:`._spot_grid`). Their values follow the additive rule
(:func:`~napari_stmap.core.regions.compute_regions` over the session's prediction source: a
dense model's map, or a bin model's prediction, NaN where a region reaches bins not predicted
yet). The table is computed in a worker; export writes AnnData or CSV
(:mod:`napari_stmap.core.export`). Its last section compares two regions (:mod:`._contrast`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QComboBox, QTableWidget, QVBoxLayout, QWidget

from napari_stmap.core.export import write_regions
from napari_stmap.core.regions import (
    REGION_TIMEOUT_S,
    RegionTable,
    build_export,
    compute_regions,
)

from ._contrast import ContrastSection
from ._dialogs import ask_save_path
from ._notify import notify_error, notify_info
from ._plots import clear_plot, draw_top_bars, make_canvas
from ._qt import button, debounce, row, status_label
from ._region_layers import layer_regions, regions_layer, regions_layers
from ._session import get_session
from ._spot_grid import SpotGridControls
from ._tables import fill_table, selected_row
from ._viewer import ANNOTATION_KINDS, stmap_kind

logger = logging.getLogger(__name__)


class RegionsWidget(QWidget):
    """Drawn regions and spot grids: table of regions × genes, top-gene bars, export."""

    DEBOUNCE_MS = 500

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.table_data: RegionTable | None = None
        self._worker = None
        self._again = False
        self._build()
        self._debounce = debounce(self, self.DEBOUNCE_MS, self.recompute)
        self.viewer.layers.events.inserted.connect(self._on_layers_inserted)
        self.viewer.layers.events.removed.connect(self._on_layers_removed)
        for layer in self.viewer.layers:
            self._watch(layer)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        self.draw_btn = button(
            "Draw regions (rectangle / ellipse / polygon)", self._on_draw_clicked
        )
        lay.addWidget(self.draw_btn)
        self.spot_grid = SpotGridControls(self.viewer, self.session, self._on_shapes_changed)
        lay.addWidget(self.spot_grid)
        grid = self.spot_grid
        self.grid_shape, self.grid_size, self.grid_pitch = (
            grid.grid_shape,
            grid.grid_size,
            grid.grid_pitch,
        )
        self.values_combo = QComboBox()
        self.values_combo.addItems(["normalised", "counts"])
        self.values_combo.activated.connect(lambda _i: self._fill_table())
        self.update_btn = button("Update", self.recompute)
        lay.addLayout(row("table", self.values_combo, self.update_btn))
        self.table = QTableWidget()
        self.table.setMinimumHeight(140)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        lay.addWidget(self.table)
        self.canvas, self.figure = make_canvas(2.2)
        lay.addWidget(self.canvas)
        self.export_btn = button("Export .h5ad / .csv…", self._on_export_clicked)
        lay.addWidget(self.export_btn)
        self.status = status_label()
        lay.addWidget(self.status)
        self.contrast = ContrastSection(self.viewer, self.session)  # compare two regions
        lay.addWidget(self.contrast)

    # --- layers ----------------------------------------------------------------------------
    def regions_layer(self, create: bool = True):
        """The ``stmap: regions`` Shapes layer (data in level-0 px), created on demand."""
        s = self.session
        return regions_layer(self.viewer, s.mpp, s.units, create=create)

    def regions_layers(self) -> list:
        """Shapes layers of regions (data level-0 px): drawn here and opened GeoJSON."""
        return regions_layers(self.viewer)

    def _watch(self, layer) -> None:
        if stmap_kind(layer) in ANNOTATION_KINDS:
            layer.events.data.connect(self._on_shapes_changed)

    def _ready(self) -> bool:
        s = self.session
        return not s.closed and s.slide is not None and s.model_path is not None

    def _on_layers_inserted(self, event) -> None:
        self._watch(event.value)
        if stmap_kind(event.value) == "regions" and len(event.value.data) and self._ready():
            self._debounce.start()  # opened GeoJSON: its regions join the table

    def _on_layers_removed(self, event) -> None:
        if stmap_kind(event.value) in ANNOTATION_KINDS and self._ready():
            self._debounce.start()

    def _on_draw_clicked(self) -> None:
        if self.session.slide is None:
            notify_error("load a slide in the 'Slide & data' dock first", "regions")
            return
        layer = self.regions_layer()
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"

    def _on_shapes_changed(self, event=None) -> None:
        self._debounce.start()

    def make_spot_grid(self) -> int:
        """Spots of the chosen size/pitch inside the selected region (else the view)."""
        return self.spot_grid.make()

    # --- computation -----------------------------------------------------------------------
    def regions(self) -> list:
        """Regions (level-0 px) of every regions layer, in layer order, then the spot grid.

        Each is a :class:`~napari_stmap.core.geometry.Region`; names are made unique.
        """
        return layer_regions(self.viewer)

    def recompute(self):
        """Recompute the table in a worker (a second call while running queues one more)."""
        if self._worker is not None:
            self._again = True
            return None
        regions = self.regions()
        if not regions:
            self.table_data = None
            self._fill_table()
            return None
        missing = self.session.values_missing()
        if missing is not None:
            self.status.setText(missing)
            notify_info(missing)
            return None
        mpp = self.session.mpp
        self.update_btn.setEnabled(False)
        self.status.setText(f"computing {len(regions)} regions…")
        self.session.with_source(
            lambda source, _model: self._start(compute_regions, source, regions, mpp),
            on_fail=self._on_worker_finished,
            timeout=REGION_TIMEOUT_S,
            load_model=False,
        )
        return self._worker

    def _start(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the session's worker (the button is re-enabled when it ends)."""
        self._worker = self.session.run(
            fn,
            *args,
            on_done=self._on_regions_computed,
            on_finally=self._on_worker_finished,
            what="computing regions",
        )

    def _on_regions_computed(self, table: RegionTable) -> None:
        self.table_data = table
        text = f"{len(table.names)} regions × {len(table.genes)} genes"
        missing = int(np.isnan(table.total).sum())
        if missing:
            text += f"; {missing} reach bins not predicted yet (NaN): predict their area first"
        self.status.setText(text)
        self._fill_table()

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.update_btn.setEnabled(True)
        if self._again:
            self._again = False
            self._debounce.start()

    # --- display ---------------------------------------------------------------------------
    MAX_ROWS = 500

    def _fill_table(self) -> None:
        t = self.table_data
        if t is None:
            fill_table(self.table, [], [])
            self._draw_bars(None)
            return
        normalised = self.values_combo.currentText() == "normalised"
        values = t.normalised() if normalised else t.counts[:, :-1]
        n = min(len(t.names), self.MAX_ROWS)
        rows = [[t.area_um2[i], t.total[i], *values[i]] for i in range(n)]
        fill_table(self.table, ["area µm²", "total counts", *t.genes], rows, t.names[:n])
        if n:
            self.table.selectRow(0)

    def _on_table_selection_changed(self) -> None:
        self._draw_bars(selected_row(self.table))

    def _draw_bars(self, row: int | None, top: int = 10) -> None:
        t = self.table_data
        if t is None or row is None or row >= len(t.names):
            clear_plot(self.canvas, self.figure)
            return
        draw_top_bars(
            self.canvas,
            self.figure,
            t.genes,
            t.normalised()[row],
            title=f"top genes of {t.names[row]}",
            xlabel="log1p(10⁴ · gene / total)",
            top=top,
        )

    # --- export ----------------------------------------------------------------------------
    def _on_export_clicked(self) -> None:
        path, overwrite = ask_save_path(
            self, "Export regions", "regions.h5ad", "AnnData (*.h5ad);;CSV (*.csv)"
        )
        if path:
            self.export(path, overwrite=overwrite)

    def export(self, path: str | Path, *, overwrite: bool = False) -> Path | None:
        """Write the current table to ``.h5ad`` or ``.csv`` (core/export.py)."""
        if self.table_data is None:
            notify_error("nothing to export: draw regions or make a spot grid first", "export")
            return None
        try:
            adata = build_export(self.table_data, self.session.mpp, str(self.session.slide.path))
            out = write_regions(adata, path, overwrite=overwrite)
        except Exception as exc:
            notify_error(exc, "export")
            return None
        notify_info(f"wrote {out}")
        return out
