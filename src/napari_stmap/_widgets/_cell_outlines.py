"""Cell outlines only at zooms where they can be seen.

napari computes a Labels layer's contour on the Qt thread for every region it loads (about
60 ms per 1,024² label block), so with a whole slide of cells every zoom step froze the viewer
for up to a second (``benchmarks/bench_cells_viewer.py``). Zoomed out, a nucleus is a dot and
its outline cannot be seen anyway: there the cells layer is drawn filled, or hidden while a gene
image shows the cells' values; zoomed in (a nucleus of ~8 µm at least 16 screen px, so a 1 px
outline leaves most of it to the value, and the region napari loads is small) it shows outlines
over the values.
"""

from __future__ import annotations

from ._viewer import camera_of, owned_layer

#: Zoom (screen px per µm) from which cell outlines are drawn.
OUTLINE_ZOOM = 2.0


class OutlineSwitch:
    """Keeps the cells layer ``name`` outlined when zoomed in, light when zoomed out.

    ``values_prefix``: layers whose name starts with it show the cells' values (the filled
    labels would hide them). Call :meth:`update` after adding either layer.
    """

    def __init__(self, viewer, name: str, values_prefix: str, min_zoom: float = OUTLINE_ZOOM):
        self.viewer, self.name, self.values_prefix = viewer, name, values_prefix
        self.min_zoom = float(min_zoom)
        camera_of(viewer).events.zoom.connect(self.update)

    def update(self, event=None) -> None:
        """Set the cells layer's contour and visibility for the current zoom."""
        layer = owned_layer(self.viewer, self.name)
        if layer is None:
            return
        near = float(camera_of(self.viewer).zoom) >= self.min_zoom
        values = any(ly.name.startswith(self.values_prefix) for ly in self.viewer.layers)
        contour, visible = (1 if near else 0), (near or not values)
        if layer.contour != contour:
            layer.contour = contour
        if layer.visible != visible:
            layer.visible = visible
