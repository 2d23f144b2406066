"""napari-stmap: spatial gene expression predicted from H&E slides, in napari and on the CLI.

Importing the package is light: no torch, dask or napari is imported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
