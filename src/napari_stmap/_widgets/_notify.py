"""napari notifications of the docks: errors, warnings and information, prefixed ``napari-stmap:``.

Messages say what went wrong and what to do; napari shows them in the viewer (and tests
record them by replacing ``napari.utils.notifications.show_*``, looked up at each call).
"""

from __future__ import annotations


def notify_error(exc: BaseException | str, what: str = "") -> None:
    """Show an error as a napari notification (``what`` names the task that failed)."""
    from napari.utils.notifications import show_error

    text = str(exc) if isinstance(exc, BaseException) else exc
    if isinstance(exc, BaseException) and not text:
        text = type(exc).__name__
    show_error(f"napari-stmap: {what}{': ' if what else ''}{text}")


def notify_warning(text: str) -> None:
    """Show a warning as a napari notification."""
    from napari.utils.notifications import show_warning

    show_warning(f"napari-stmap: {text}")


def notify_info(text: str) -> None:
    """Show an information message as a napari notification."""
    from napari.utils.notifications import show_info

    show_info(f"napari-stmap: {text}")
