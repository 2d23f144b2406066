"""The gene box of the Genes dock: type a gene (completion over the model's genes), add or switch."""

from __future__ import annotations

from qtpy.QtCore import QStringListModel, Qt, Signal
from qtpy.QtWidgets import QCompleter, QHBoxLayout, QLineEdit, QWidget

from ._qt import button


class GeneSearch(QWidget):
    """A gene name box with "Add heatmap" and "Show in selected".

    Signals ``add_requested(str)`` (also on Return) and ``switch_requested(str)`` carry the
    typed name, stripped; the dock matches it against the model's genes.
    """

    add_requested = Signal(str)
    switch_requested = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.search = QLineEdit()
        self.search.setPlaceholderText("gene, e.g. ERBB2")
        self.search.returnPressed.connect(self._on_add_clicked)
        self.completer = QCompleter([])
        self.completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.search.setCompleter(self.completer)
        self.add_btn = button("Add heatmap", self._on_add_clicked)
        tip = "Show this gene in the heatmap selected below instead of adding a layer"
        self.switch_btn = button("Show in selected", self._on_switch_clicked, tip)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for widget in (self.search, self.add_btn, self.switch_btn):
            lay.addWidget(widget)

    def set_genes(self, genes: list[str]) -> None:
        """Complete over ``genes`` (the model's)."""
        self.completer.setModel(QStringListModel(genes, self.completer))

    def _on_add_clicked(self) -> None:
        self.add_requested.emit(self.search.text().strip())

    def _on_switch_clicked(self) -> None:
        self.switch_requested.emit(self.search.text().strip())
