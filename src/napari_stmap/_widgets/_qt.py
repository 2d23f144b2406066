"""Small Qt building blocks the docks share: buttons, rows, labels, timers, a list of names."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QWidget,
)


def button(text: str, slot: Callable, tip: str | None = None) -> QPushButton:
    """A push button that calls ``slot`` when clicked (``tip``: its tooltip)."""
    btn = QPushButton(text)
    btn.clicked.connect(slot)
    if tip:
        btn.setToolTip(tip)
    return btn


def combo(slot: Callable[[int], None], tip: str | None = None, items=()) -> QComboBox:
    """A combo box of ``items`` that calls ``slot(index)`` when the user picks one."""
    box = QComboBox()
    box.addItems(list(items))
    box.activated.connect(slot)
    if tip:
        box.setToolTip(tip)
    return box


def refill(box: QComboBox, texts: list[str], data: list | None = None) -> None:
    """Replace the items of ``box`` (``data``: one per text), keeping the current text if listed.

    No ``activated`` signal is emitted (that is the user's choice only).
    """
    current = box.currentText()
    box.blockSignals(True)
    box.clear()
    for k, text in enumerate(texts):
        box.addItem(text, None if data is None else data[k])
    if current in texts:
        box.setCurrentText(current)
    box.blockSignals(False)


def group(title: str) -> tuple[QGroupBox, QFormLayout]:
    """A titled group box and the form layout inside it."""
    box = QGroupBox(title)
    return box, QFormLayout(box)


def row(*items: QWidget | str) -> QHBoxLayout:
    """A horizontal row of widgets; a string becomes a label."""
    lay = QHBoxLayout()
    for item in items:
        lay.addWidget(QLabel(item) if isinstance(item, str) else item)
    return lay


def status_label(text: str = "", *, rich: bool = False) -> QLabel:
    """A word-wrapped label for status text (``rich``: it shows HTML)."""
    label = QLabel(text)
    label.setWordWrap(True)
    if rich:
        label.setTextFormat(Qt.TextFormat.RichText)
    return label


def debounce(parent: QWidget, ms: int, slot: Callable) -> QTimer:
    """A single-shot timer of ``ms`` that calls ``slot``; each ``start()`` restarts it."""
    timer = QTimer(parent)
    timer.setSingleShot(True)
    timer.setInterval(ms)
    timer.timeout.connect(slot)
    return timer


class NameList(QListWidget):
    """A list of names that keeps the current one when refilled (else selects the last)."""

    def set_names(self, names: list[str]) -> None:
        """Show ``names`` without emitting selection signals."""
        current = self.current_name()
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if names:
            self.setCurrentRow(names.index(current) if current in names else len(names) - 1)
        self.blockSignals(False)

    def current_name(self) -> str | None:
        """The current name (None when the list is empty)."""
        item = self.currentItem()
        return item.text() if item is not None else None

    def select(self, name: str) -> None:
        """Make ``name`` current (emits the usual signals), if listed."""
        items = self.findItems(name, Qt.MatchFlag.MatchExactly)
        if items:
            self.setCurrentItem(items[0])
