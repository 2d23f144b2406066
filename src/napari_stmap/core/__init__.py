"""Pure-Python core of napari-stmap.

Nothing under ``core`` imports napari, Qt or magicgui (``tests/test_boundaries.py`` enforces
it). Coordinates are level-0 slide pixels in (y, x) order unless a name says otherwise;
physical sizes are in µm.
"""
