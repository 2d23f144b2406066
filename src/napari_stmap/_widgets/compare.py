"""Dock "Compare": measured vs predicted at chosen bin sizes.

Per-gene PCC table, scatter plot and ``stmap: measured GENE`` / ``stmap: residual GENE``
layers; the numbers are :mod:`napari_stmap.core.compare`'s (``stmap evaluate``'s metrics on the
viewer's predictions: the store's for a dense model, a prediction at the measured units'
centres for a bin model). The comparison runs in a worker.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QLabel,
    QListWidget,
    QListWidgetItem,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_stmap.core.compare import (
    COMPARE_TIMEOUT_S,
    CompareResult,
    pcc_table,
    residual_limits,
    run_compare,
    scale_choices,
    summary_html,
    unit_spots,
    unit_values,
)

from .._layers import spots_layer
from ._notify import notify_error
from ._plots import clear_plot, draw_scatter, make_canvas
from ._qt import button, combo, row, status_label
from ._session import get_session
from ._tables import NumberItem, selected_row
from ._viewer import PREFIX, replace_layer

logger = logging.getLogger(__name__)


class CompareWidget(QWidget):
    """Per-gene PCC at chosen bin sizes, scatter plot, measured and residual layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.data: CompareResult | None = None
        self._worker = None
        self._build()
        self.session.changed.connect(self._on_session_changed)
        self._on_session_changed("spots")

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Bin sizes (µm): native, sums of bins, Visium-like disks"))
        self.scales = QListWidget()
        self.scales.setMaximumHeight(90)
        lay.addWidget(self.scales)
        self.run_btn = button("Compare measured vs predicted", self._on_run_clicked)
        lay.addWidget(self.run_btn)
        self.summary = status_label("Load measured data and a model in 'Slide & data'.", rich=True)
        lay.addWidget(self.summary)
        self.table = QTableWidget()
        self.table.setSortingEnabled(True)
        self.table.setMinimumHeight(150)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        lay.addWidget(self.table)
        self.scale_combo = combo(lambda _i: self._on_table_selection_changed())
        self.layers_btn = button("Show measured + residual layers", self._on_layers_clicked)
        lay.addLayout(row("scatter at", self.scale_combo, self.layers_btn))
        self.canvas, self.figure = make_canvas(2.6)
        lay.addWidget(self.canvas)

    # --- inputs ----------------------------------------------------------------------------
    def _on_session_changed(self, what: str) -> None:
        if what != "spots":
            return
        self.scales.clear()
        spots = self.session.spots
        if spots is None:
            return
        for size, checked in scale_choices(spots, self.session.spots_path):
            item = QListWidgetItem(f"{size:g}")
            item.setData(Qt.ItemDataRole.UserRole, size)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
            self.scales.addItem(item)

    def set_scales(self, sizes) -> None:
        """Tick exactly the bin sizes ``sizes`` (µm)."""
        wanted = {float(s) for s in sizes}
        for k in range(self.scales.count()):
            item = self.scales.item(k)
            on = float(item.data(Qt.ItemDataRole.UserRole)) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def chosen_scales(self) -> list[float]:
        """Ticked bin sizes (µm)."""
        return [
            float(self.scales.item(k).data(Qt.ItemDataRole.UserRole))
            for k in range(self.scales.count())
            if self.scales.item(k).checkState() == Qt.CheckState.Checked
        ]

    # --- run -------------------------------------------------------------------------------
    def _on_run_clicked(self) -> None:
        self.run()

    def run(self):
        """Evaluate in a worker (predicting what is needed); returns the worker or None."""
        s = self.session
        if s.spots_path is None or s.model_path is None or s.slide is None:
            notify_error(
                "load a slide, measured data and a model in 'Slide & data' first", "compare"
            )
            return None
        scales = self.chosen_scales()
        if not scales:
            notify_error("tick at least one bin size", "compare")
            return None
        self.run_btn.setEnabled(False)
        self.summary.setText("predicting the measured units and comparing…")

        def start(source, model) -> None:
            self._worker = s.run(
                run_compare,
                source,
                model,
                s.model_path,
                s.slide,
                s.spots_path,
                scales,
                on_done=self._on_compare_done,
                on_finally=self._on_worker_finished,
                what="compare",
                progress={"total": 0, "desc": "stmap: compare"},
            )

        s.with_source(start, on_fail=self._on_worker_finished, timeout=COMPARE_TIMEOUT_S)
        return self._worker

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)

    def _on_compare_done(self, data: CompareResult) -> None:
        self.data = data
        keys, genes, pcc = pcc_table(data.result)
        self.summary.setText(summary_html(data.result))
        self.table.setSortingEnabled(False)
        self.table.clear()
        self.table.setColumnCount(1 + len(keys))
        self.table.setHorizontalHeaderLabels(["gene", *[f"PCC {k} µm" for k in keys]])
        self.table.setRowCount(len(genes))
        for i, g in enumerate(genes):
            self.table.setItem(i, 0, QTableWidgetItem(g))
            for j in range(len(keys)):
                self.table.setItem(i, 1 + j, NumberItem(pcc[i, j]))
        self.table.setSortingEnabled(True)
        if keys:
            self.table.sortItems(len(keys), Qt.SortOrder.DescendingOrder)
        self.scale_combo.clear()
        self.scale_combo.addItems(keys)
        if genes:
            self.table.selectRow(0)

    def per_gene(self, key: str) -> dict[str, float | None]:
        """PCC per gene at scale ``key`` as shown in the table."""
        return {} if self.data is None else dict(self.data.result["genes"][key])

    # --- plots and layers ------------------------------------------------------------------
    def selected_gene(self) -> str | None:
        """Gene of the selected table row."""
        row = selected_row(self.table)
        item = self.table.item(row, 0) if row is not None else None
        return item.text() if item is not None else None

    def _on_table_selection_changed(self) -> None:
        gene, key = self.selected_gene(), self.scale_combo.currentText()
        if self.data is None or gene is None or key not in self.data.units:
            clear_plot(self.canvas, self.figure)
            return
        meas, pred = unit_values(self.data, key, gene)
        r = self.data.result["genes"][key].get(gene)
        draw_scatter(
            self.canvas,
            self.figure,
            meas,
            pred,
            title=f"{gene} at {key} µm: r = {'nan' if r is None else f'{r:.3f}'}",
            xlabel="measured log1p(10⁴·g/total)",
            ylabel="predicted",
        )

    def _on_layers_clicked(self) -> None:
        self.show_layers()

    def show_layers(self, gene: str | None = None, key: str | None = None) -> None:
        """Add/update ``stmap: measured GENE`` and ``stmap: residual GENE`` (normalised)."""
        gene = gene or self.selected_gene()
        key = key or self.scale_combo.currentText()
        if self.data is None or gene is None or key not in self.data.units:
            notify_error("run a comparison and select a gene first", "compare")
            return
        meas, pred = unit_values(self.data, key, gene)
        spots = unit_spots(self.data, key, self.session.mpp)
        for what, values, cmap, limits in (
            ("measured", meas, "magma", None),
            ("residual", pred - meas, "PiYG", residual_limits(meas, pred)),
        ):
            name = f"{PREFIX}{what} {gene}"
            data, kwargs, kind = spots_layer(
                spots, values=values.astype(np.float32), label=f"{what} {gene}", name=name
            )
            kwargs["name"] = name
            kwargs["metadata"]["stmap"].update({"kind": what, "gene": gene, "scale": key})
            prefix = "" if kind == "image" else "face_"  # an image, or points coloured by value
            kwargs[f"{prefix}colormap"] = cmap
            if limits is not None:
                kwargs[f"{prefix}contrast_limits"] = limits
            replace_layer(self.viewer, kind, data, kwargs)
