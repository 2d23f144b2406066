"""Errors raised for bad user input.

Every error the user can cause (a missing file, a truncated TIFF, a folder that is not Space
Ranger output, mismatched coordinates) is raised as :class:`StmapInputError` with a one-line
message that names the file or value and says how to fix it. The CLI turns it into exit code 2
without a traceback; the viewer shows it as a napari notification.
"""

from __future__ import annotations

__all__ = ["StmapInputError", "StmapInputWarning"]


class StmapInputError(ValueError):
    """Bad user input: the message is one line naming the file/value and the fix."""


class StmapInputWarning(UserWarning):
    """Suspicious but usable input (e.g. unknown µm/px, spots outside the image)."""
