"""File dialogs of the docks."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QMessageBox, QWidget


def ask_open_path(parent: QWidget, title: str, filters: str | None = None) -> str:
    """A file to open (``filters``: Qt name filters), or a folder when ``filters`` is None.

    Empty when the user cancels.
    """
    if filters is None:
        return QFileDialog.getExistingDirectory(parent, title)
    path, _ = QFileDialog.getOpenFileName(parent, title, "", filters)
    return path


def ask_save_path(parent: QWidget, title: str, default: str, filters: str) -> tuple[str, bool]:
    """Ask where to save: ``(path, overwrite)``; ``path`` is empty when the user cancels.

    An existing file is replaced only after the user says yes (then ``overwrite`` is True).
    """
    path, _ = QFileDialog.getSaveFileName(
        parent, title, default, filters, options=QFileDialog.Option.DontConfirmOverwrite
    )
    if not path or not Path(path).exists():
        return path, False
    answer = QMessageBox.question(parent, "Replace file?", f"{path} exists. Replace it?")
    if answer != QMessageBox.StandardButton.Yes:
        return "", False
    return path, True
