"""The Regions dock's layers: drawn regions, opened GeoJSON, the spot grid, and their regions.

Shapes and points hold level-0 px (the layers' ``scale`` is µm/px). Every Shapes layer whose
``metadata["stmap"]["kind"]`` is ``"regions"`` counts (``stmap: regions``, drawn in the dock,
and GeoJSON opened through the reader); the spot grid is the Points layer ``stmap: spot grid``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_stmap.core.geometry import Footprint, Region
from napari_stmap.core.regions import (
    make_names_unique,
    regions_from_shapes,
    shape_footprint,
    spot_regions,
)

from ._viewer import PREFIX, owned_layer, stmap_kind

REGIONS_LAYER = f"{PREFIX}regions"
GRID_LAYER = f"{PREFIX}spot grid"


def regions_layer(viewer, mpp: float, units: Sequence[str], *, create: bool = True):
    """The ``stmap: regions`` Shapes layer, created on demand (None if absent and not created).

    ``mpp``: µm per level-0 px of the slide (the layer's scale); ``units``: world units.
    """
    layer = owned_layer(viewer, REGIONS_LAYER)
    if layer is None and create:
        layer = viewer.add_shapes(
            name=REGIONS_LAYER,
            scale=(mpp, mpp),
            edge_color="#00e5ff",
            face_color="transparent",
            edge_width=3 / max(mpp, 1e-9) * 0.5,
            units=units,
            metadata={"stmap": {"kind": "regions", "units": "px"}},
        )
    return layer


def regions_layers(viewer) -> list:
    """Shapes layers of regions (data level-0 px): drawn in the dock and opened GeoJSON."""
    return [ly for ly in viewer.layers if stmap_kind(ly) == "regions" and hasattr(ly, "shape_type")]


def selected_footprint(viewer) -> Footprint | None:
    """Footprint (level-0 px) of the selected shape (else the last) of the active regions layer.

    The active layer counts when it is a regions layer, else ``stmap: regions``; None without
    shapes, or for a line or a path.
    """
    active = viewer.layers.selection.active
    if active is not None and any(active is ly for ly in regions_layers(viewer)):
        layer = active
    else:
        layer = owned_layer(viewer, REGIONS_LAYER)
    if layer is None or not layer.nshapes:
        return None
    idx = sorted(layer.selected_data) or [layer.nshapes - 1]
    return shape_footprint(layer.shape_type[idx[0]], layer.data[idx[0]])


def show_spot_grid(
    viewer, centers_yx: np.ndarray, size_px: float, footprint: str, mpp: float, units
) -> None:
    """Replace ``stmap: spot grid`` by spots (``"disk"`` or ``"square"``) at ``centers_yx``.

    ``centers_yx`` (n, 2) and ``size_px`` (diameter or side) in level-0 px.
    """
    meta = {"stmap": {"kind": "spot grid", "size_px": size_px, "footprint": footprint}}
    grid = owned_layer(viewer, GRID_LAYER)
    if grid is not None:
        viewer.layers.remove(grid)
    viewer.add_points(
        centers_yx,
        name=GRID_LAYER,
        size=size_px,
        symbol="disc" if footprint == "disk" else "square",
        scale=(mpp, mpp),
        face_color="transparent",
        border_color="#ffd54f",
        border_width=0.08,
        units=units,
        metadata=meta,
    )


def layer_regions(viewer) -> list[Region]:
    """Regions (level-0 px) of every regions layer, in layer order, then the spot grid.

    Names are made unique.
    """
    out = []
    for layer in regions_layers(viewer):
        out += regions_from_shapes(layer.shape_type, layer.data, layer.features)
    grid = owned_layer(viewer, GRID_LAYER)
    if grid is not None and len(grid.data):
        meta = grid.metadata["stmap"]
        out += spot_regions(grid.data, meta["size_px"], meta["footprint"])
    return make_names_unique(out)
