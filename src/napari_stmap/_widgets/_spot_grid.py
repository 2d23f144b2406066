"""The spot-grid controls of the Regions dock: spots of a size and pitch (µm) in a region.

The region is the selected shape of the active regions layer (else the last shape of
``stmap: regions``), else the part of the slide in view; the spots
(:func:`~napari_stmap.core.geometry.spot_grid`, level-0 px) replace the ``stmap: spot grid``
layer, whose spots become regions of the table.
"""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QVBoxLayout, QWidget

from napari_stmap.core.geometry import spot_grid

from ._notify import notify_error, notify_info
from ._qt import button, row
from ._region_layers import selected_footprint, show_spot_grid
from ._viewer import viewport_bbox_px


class SpotGridControls(QWidget):
    """Footprint, size and pitch of spots, and the button that lays them out.

    ``on_made()`` is called after a grid was made.
    """

    def __init__(self, viewer, session, on_made: Callable[[], None]) -> None:
        super().__init__()
        self.viewer, self.session, self._on_made = viewer, session, on_made
        self.grid_shape = QComboBox()
        self.grid_shape.addItems(["disk", "square"])
        self.grid_size = QDoubleSpinBox(
            decimals=1, minimum=1.0, maximum=5000.0, value=55.0, suffix=" µm"
        )
        self.grid_pitch = QDoubleSpinBox(
            decimals=1, minimum=1.0, maximum=10000.0, value=100.0, suffix=" µm"
        )
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        form.addRow("spots", row(self.grid_shape, self.grid_size, "pitch", self.grid_pitch))
        lay.addLayout(form)
        self.grid_btn = button("Spot grid in selected region (or the view)", self.make)
        lay.addWidget(self.grid_btn)

    def _region(self):
        """Footprint or level-0 px box the spots go in (None, with a notification, if none)."""
        s = self.session
        if s.slide is None:
            notify_error("load a slide in the 'Slide & data' dock first", "spot grid")
            return None
        region = selected_footprint(self.viewer)
        if region is None:
            region = viewport_bbox_px(self.viewer, s.mpp, s.slide.shape_yx)
        if region is None:
            notify_error("draw a region or show part of the slide first", "spot grid")
        return region

    def make(self) -> int:
        """Spots of the chosen size/pitch inside the selected region (else the view)."""
        region = self._region()
        if region is None:
            return 0
        s = self.session
        mpp = s.mpp
        size, pitch = self.grid_size.value() / mpp, self.grid_pitch.value() / mpp
        kind = self.grid_shape.currentText()
        try:
            centers, _ = spot_grid(region, size_px=size, pitch_px=pitch, footprint=kind)
        except Exception as exc:
            notify_error(exc, "spot grid")
            return 0
        if len(centers) == 0:
            notify_error(
                "no spot of that size fits in the region; draw a larger one or use smaller spots",
                "spot grid",
            )
            return 0
        show_spot_grid(self.viewer, centers, size, kind, mpp, s.units)
        notify_info(f"{len(centers)} {kind} spots of {self.grid_size.value():g} µm")
        self._on_made()
        return len(centers)
