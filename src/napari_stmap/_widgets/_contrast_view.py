"""Parts of the "Compare two regions" section: the regions to choose from, a ranked, sortable,
searchable table and a volcano plot.

The table and the plot show a :class:`~napari_stmap.core.contrast.ContrastResult`, one row /
point per gene.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QSortFilterProxyModel, Qt
from qtpy.QtGui import QStandardItem, QStandardItemModel
from qtpy.QtWidgets import QAbstractItemView, QComboBox, QHeaderView, QTableView

from napari_stmap.core.regions import make_names_unique, regions_from_shapes

from ._plots import style_axes
from ._region_layers import regions_layers

#: Columns of the table: (header, result attribute, format).
COLUMNS = (
    ("#", "rank", ""),
    ("gene", "gene", ""),
    ("log2 FC", "log2fc", ".2f"),
    ("q", "q", ".2g"),
    ("z", "z", ".2f"),
    ("mean A", "mean_a", ".3g"),
    ("mean B", "mean_b", ".3g"),
)
_SORT = Qt.ItemDataRole.UserRole + 1
#: q-value below which a gene is coloured in the volcano plot.
Q_LINE = 0.05


class ContrastTable(QTableView):
    """Genes in rank order; click a header to sort, :meth:`set_filter` to search genes."""

    def __init__(self) -> None:
        super().__init__()
        self.source_model = QStandardItemModel(0, len(COLUMNS))
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.source_model)
        self.proxy.setSortRole(_SORT)
        self.proxy.setFilterKeyColumn(1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.setModel(self.proxy)
        self.setSortingEnabled(True)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.verticalHeader().setVisible(False)
        self.setMinimumHeight(150)

    def show_result(self, result) -> None:
        """Fill with ``result``'s genes in rank order (None: empty); the rank order is kept."""
        model = self.source_model
        model.clear()
        model.setHorizontalHeaderLabels([c[0] for c in COLUMNS])
        if result is None:
            return
        for rank, g in enumerate(result.order()):
            model.appendRow([_item(result, g, attr, fmt, rank) for _, attr, fmt in COLUMNS])
        self.sortByColumn(0, Qt.SortOrder.AscendingOrder)  # by rank

    def set_filter(self, text: str) -> None:
        """Show the genes whose name contains ``text`` (any case)."""
        self.proxy.setFilterFixedString(text.strip())

    def gene_at(self, row: int) -> str:
        """Gene of the ``row``-th visible row."""
        return str(self.proxy.index(row, 1).data())

    def visible_genes(self) -> list[str]:
        """Genes of the visible rows, top to bottom."""
        return [self.gene_at(r) for r in range(self.proxy.rowCount())]

    def select_gene(self, gene: str) -> None:
        """Select and show the row of ``gene`` (if visible)."""
        for r in range(self.proxy.rowCount()):
            if self.gene_at(r) == gene:
                self.selectRow(r)
                self.scrollTo(self.proxy.index(r, 1))
                return


def _item(result, g: int, attr: str, fmt: str, rank: int) -> QStandardItem:
    if attr == "gene":
        item = QStandardItem(result.genes[g])
        item.setData(result.genes[g].lower(), _SORT)
        return item
    if attr == "rank":
        item = QStandardItem(str(rank + 1))
        item.setData(rank, _SORT)
        return item
    value = float(getattr(result, attr)[g])
    item = QStandardItem("nan" if not np.isfinite(value) else f"{value:{fmt}}")
    item.setData(value if np.isfinite(value) else -np.inf, _SORT)
    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item


def volcano_xy(result) -> tuple[np.ndarray, np.ndarray]:
    """``(log2 FC, −log10 q)`` per gene; q = 0 (underflow) is drawn at the top of the rest."""
    q = np.asarray(result.q, dtype=float)
    tiny = q[(q > 0) & np.isfinite(q)]
    floor = tiny.min() * 0.1 if tiny.size else 1e-300
    return np.asarray(result.log2fc, float), -np.log10(np.where(q > 0, q, floor))


def draw_volcano(canvas, figure, result, label: int = 3):
    """Volcano plot of ``result`` (pickable points, their gene index in order); redraw.

    Genes with ``q < 0.05`` are coloured (orange: higher in A, blue: higher in B), the
    ``label`` most extreme each way are named. Returns the scatter artist (None when empty).
    """
    figure.clear()
    if result is None:
        canvas.draw_idle()
        return None
    ax = figure.add_subplot(111)
    x, y = volcano_xy(result)
    sig = np.asarray(result.q) < Q_LINE
    colors = np.where(sig & (x > 0), "#ffa726", np.where(sig & (x < 0), "#4fc3f7", "#888888"))
    points = ax.scatter(x, y, s=10, c=list(colors), linewidths=0, picker=True, pickradius=4)
    ax.axhline(-np.log10(Q_LINE), color="#666666", lw=0.6, ls="--")
    ax.axvline(0, color="#666666", lw=0.6)
    order = result.order()
    for k, g in enumerate([*order[:label], *order[::-1][:label]]):
        if sig[g]:
            ax.annotate(result.genes[g], (x[g], y[g]), fontsize=6, color="#dddddd",
                        xytext=(3, -2 - 7 * (k % 3)), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"log2 FC ({result.name_a} / {result.name_b})", fontsize=8)
    ax.set_ylabel("−log10 q", fontsize=8)
    ax.set_title(result.title(), fontsize=8)
    style_axes(ax)
    canvas.draw_idle()
    return points


def drawn_regions(viewer) -> list:
    """Regions (level-0 px) of every regions layer, in layer order, names made unique."""
    out = []
    for layer in regions_layers(viewer):
        out += regions_from_shapes(layer.shape_type, layer.data, layer.features)
    return make_names_unique(out)


class RegionCombo(QComboBox):
    """A combo box of region names that refreshes them when it opens."""

    def __init__(self, refresh) -> None:
        super().__init__()
        self._refresh = refresh
        self.setMinimumContentsLength(8)

    def showPopup(self) -> None:  # noqa: N802 (Qt API)
        self._refresh()
        super().showPopup()
