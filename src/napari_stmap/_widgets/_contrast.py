"""The Regions dock's "Compare two regions" section: what differs between region A and B?

A and B are regions of the regions layers (drawn or opened GeoJSON, names as the Regions table
shows them); B may be the rest of the tissue. The units are spot-grid squares or Visium-like
spots of a chosen size, or the cells of a ``cells.h5ad``
(:func:`~napari_stmap.core.contrast.contrast_on_slide`, run in the session's worker over its
prediction source). The result is a ranked table (sortable, searchable) and a volcano plot;
clicking a gene in either adds its heatmap through the Genes dock. Units of one slide are not
independent samples: the q-values rank genes, they do not prove a difference.
"""

from __future__ import annotations

import functools
from pathlib import Path

from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QGroupBox,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from napari_stmap.core.contrast import ContrastResult, contrast_on_slide
from napari_stmap.core.regions import REGION_TIMEOUT_S

from ._contrast_view import ContrastTable, RegionCombo, draw_volcano, drawn_regions
from ._dialogs import ask_open_path, ask_save_path
from ._notify import notify_error, notify_info
from ._plots import make_canvas
from ._qt import button, combo, refill, row, status_label

PLUGIN = "napari-stmap"
#: The B choice that stands for the rest of the tissue.
REST_LABEL = "rest of tissue"
#: Unit choices: label -> grid kind (None: cells from a file).
UNITS = {"squares": "square", "Visium-like spots": "visium", "cells (.h5ad)": None}
NOT_INDEPENDENT = (
    "Units of one slide are not independent samples: q-values rank genes, they do not prove "
    "a difference between tissues."
)


class ContrastSection(QGroupBox):
    """Choose A and B, the units, compare; ranked table, volcano plot, CSV export.

    A checkable group: its contents show once the user ticks "Compare two regions".
    """

    def __init__(self, viewer, session) -> None:
        super().__init__("Compare two regions")
        self.viewer, self.session = viewer, session
        self.result: ContrastResult | None = None
        self.cells_path: Path | None = None
        self._worker = None
        self._build()
        self.viewer.layers.events.inserted.connect(self.refresh_regions)
        self.viewer.layers.events.removed.connect(self.refresh_regions)
        self.session.changed.connect(self._on_session_changed)
        self.refresh_regions()

    def _build(self) -> None:
        self.setCheckable(True)  # unfold to compare: the Regions dock stays short otherwise
        self.setChecked(False)
        self.body = QWidget()
        self.body.setVisible(False)
        self.toggled.connect(self.body.setVisible)
        QVBoxLayout(self).addWidget(self.body)
        lay = QVBoxLayout(self.body)
        lay.setContentsMargins(0, 0, 0, 0)
        self.a_combo, self.b_combo = (RegionCombo(self.refresh_regions) for _ in range(2))
        lay.addLayout(row("A", self.a_combo, "vs B", self.b_combo))
        self.unit_combo = combo(self._on_unit_activated, "units compared", list(UNITS))
        self.unit_size = QDoubleSpinBox(
            decimals=1, minimum=2.0, maximum=2000.0, value=55.0, suffix=" µm"
        )
        self.unit_size.setToolTip("side of the squares, diameter of the spots")
        self.cells_btn = button("cells file…", self._on_cells_clicked, "a cells.h5ad (stmap cells)")
        self.cells_btn.setVisible(False)
        self.run_btn = button("Compare", self.run, NOT_INDEPENDENT)
        lay.addLayout(row(self.unit_combo, self.unit_size, self.cells_btn, self.run_btn))
        self.search = QLineEdit()
        self.search.setPlaceholderText("search genes")
        self.search.setClearButtonEnabled(True)
        self.table = ContrastTable()
        self.search.textChanged.connect(self.table.set_filter)
        self.table.clicked.connect(self._on_table_clicked)
        lay.addWidget(self.search)
        lay.addWidget(self.table)
        self.canvas, self.figure = make_canvas(2.6)
        self.canvas.setMinimumHeight(230)  # room for the axis labels under the points
        self.canvas.mpl_connect("pick_event", self._on_volcano_pick)
        lay.addWidget(self.canvas)
        self.export_btn = button("Export CSV…", self._on_export_clicked)
        lay.addWidget(self.export_btn)
        self.status = status_label(NOT_INDEPENDENT)
        lay.addWidget(self.status)

    # --- choices ---------------------------------------------------------------------------
    def refresh_regions(self, event=None) -> None:
        """List the regions of the regions layers in A and B (B also: the rest of the tissue)."""
        names = [r.name for r in drawn_regions(self.viewer)]
        refill(self.a_combo, names)
        refill(self.b_combo, [*names, REST_LABEL])
        if self.b_combo.currentText() == self.a_combo.currentText() and len(names) > 1:
            self.b_combo.setCurrentIndex(1 if self.a_combo.currentIndex() == 0 else 0)

    def _on_unit_activated(self, index: int) -> None:
        cells = UNITS[self.unit_combo.currentText()] is None
        self.unit_size.setVisible(not cells)
        self.cells_btn.setVisible(cells)
        if cells and self.cells_path is None:
            self._on_cells_clicked()

    def _on_cells_clicked(self) -> None:
        path = ask_open_path(self, "Cells to compare (stmap cells)", "AnnData (*.h5ad)")
        if path:
            self.set_cells(path)

    def set_cells(self, path: str | Path) -> None:
        """Use the cells of ``path`` (a cells.h5ad) as the units."""
        self.cells_path = Path(path)
        self.cells_btn.setText(self.cells_path.name)
        self.unit_combo.setCurrentText(next(k for k, v in UNITS.items() if v is None))
        self._on_unit_activated(self.unit_combo.currentIndex())

    def _on_session_changed(self, what: str) -> None:
        if what in ("slide", "model"):
            self.show_result(None)

    # --- computation -----------------------------------------------------------------------
    def _chosen(self):
        """``(A, B or None)`` chosen, or None after a notification."""
        regions = {r.name: r for r in drawn_regions(self.viewer)}
        a, b_name = regions.get(self.a_combo.currentText()), self.b_combo.currentText()
        b = None if b_name == REST_LABEL else regions.get(b_name)
        if a is None or (b is None and b_name != REST_LABEL):
            notify_error("draw or open two regions (or one and 'rest of tissue') first", "compare")
            return None
        if b is a:
            notify_error(f"A and B are both {a.name!r}: choose another B", "compare")
            return None
        return a, b

    def run(self):
        """Compare the chosen regions in a worker (the button is re-enabled when it ends)."""
        s = self.session
        if self._worker is not None or s.closed:
            return self._worker
        if s.slide is None or s.model_path is None:
            notify_error("load a slide and a model in the 'Slide & data' dock first", "compare")
            return None
        chosen, kind = self._chosen(), UNITS[self.unit_combo.currentText()]
        if chosen is None or (kind is None and self.cells_path is None):
            return None
        missing = s.values_missing()
        if missing is not None and kind is not None:
            notify_info(missing)
            return None
        fn = functools.partial(
            contrast_on_slide,
            kind=kind or "square",
            size_um=self.unit_size.value(),
            cells=None if kind is not None else self.cells_path,
        )
        self.run_btn.setEnabled(False)
        self.status.setText("comparing…")
        s.with_source(
            lambda source, _model: self._start(fn, source, s.slide, *chosen),
            on_fail=self._on_finished,
            timeout=REGION_TIMEOUT_S,
            load_model=False,
        )
        return self._worker

    def _start(self, fn, *args) -> None:
        self._worker = self.session.run(
            fn,
            *args,
            on_done=self.show_result,
            on_finally=self._on_finished,
            what="comparing regions",
        )

    def _on_finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)
        if self.result is None:
            self.status.setText(NOT_INDEPENDENT)

    # --- display ---------------------------------------------------------------------------
    def show_result(self, result: ContrastResult | None) -> None:
        """Show ``result`` in the table and the volcano plot (None: clear them)."""
        self.result = result
        self.table.show_result(result)
        self.points = draw_volcano(self.canvas, self.figure, result)
        if result is None:
            self.status.setText(NOT_INDEPENDENT)
            return
        notes = result.notes
        left = [f"{notes[k]} {w}" for k, w in (("off_tissue", "off tissue"),
                ("no_value", "without prediction"), ("shared", "in both")) if notes.get(k)]  # fmt: skip
        text = result.title() + (f" ({', '.join(left)} left out)" if left else "")
        self.status.setText(f"{text}. {NOT_INDEPENDENT}")

    def _on_table_clicked(self, index) -> None:
        self.show_gene(self.table.gene_at(index.row()))

    def _on_volcano_pick(self, event) -> None:
        if self.result is not None and event.artist is self.points and len(event.ind):
            self.show_gene(self.result.genes[int(event.ind[0])])

    def show_gene(self, gene: str) -> None:
        """Select ``gene`` in the table and add its heatmap through the Genes dock."""
        self.table.select_gene(gene)
        _dock, genes = self.viewer.window.add_plugin_dock_widget(PLUGIN, "Genes")
        genes.add_gene(gene)

    # --- export ----------------------------------------------------------------------------
    def _on_export_clicked(self) -> None:
        path, overwrite = ask_save_path(self, "Export comparison", "contrast.csv", "CSV (*.csv)")
        if path:
            self.export(path, overwrite=overwrite)

    def export(self, path: str | Path, *, overwrite: bool = False) -> Path | None:
        """Write the ranked table to ``path`` (.csv): every gene, ``stmap contrast``'s columns."""
        if self.result is None:
            notify_error("nothing to export: compare two regions first", "export")
            return None
        try:
            out = self.result.write_csv(path, overwrite=overwrite)
        except Exception as exc:
            notify_error(exc, "export")
            return None
        notify_info(f"wrote {out}")
        return out
