"""Tables of the docks: a cell that sorts by number and the selected row of a table."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QTableWidget, QTableWidgetItem


class NumberItem(QTableWidgetItem):
    """A table cell that shows a number (``fmt``) and sorts by it, NaN last."""

    def __init__(self, value: float, fmt: str = ".3f") -> None:
        super().__init__("nan" if not np.isfinite(value) else f"{value:{fmt}}")
        self.value = float(value) if np.isfinite(value) else -np.inf

    def __lt__(self, other) -> bool:
        return self.value < getattr(other, "value", -np.inf)


def selected_row(table: QTableWidget) -> int | None:
    """Index of the first selected row of ``table`` (None when no row is selected)."""
    model = table.selectionModel()
    rows = model.selectedRows() if model else []
    return rows[0].row() if rows else None


def fill_table(
    table: QTableWidget,
    headers: list[str],
    rows,
    row_labels: list[str] | None = None,
    fmt: str = ".4g",
) -> None:
    """Replace the contents of ``table``: column ``headers``, one row of numbers per ``rows``."""
    table.clear()
    table.setColumnCount(len(headers))
    table.setRowCount(len(rows))
    table.setHorizontalHeaderLabels(headers)
    if row_labels is not None:
        table.setVerticalHeaderLabels(row_labels)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            table.setItem(i, j, QTableWidgetItem(f"{v:{fmt}}"))
