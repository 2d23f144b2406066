"""npe2 writer: a Shapes layer as GeoJSON that QuPath imports (``[x, y]``, level-0 px).

The layer's data become level-0 px (y, x) first: the plugin's regions layers (``metadata
["stmap"]`` with ``"units": "px"`` or ``"kind": "regions"``) already hold level-0 px; any other
Shapes layer is taken to be drawn in the world (µm on a slide opened through napari-stmap), so
its world coordinates (``data · scale + translate``) are divided by the µm/px of the slide
opened last (:func:`~napari_stmap._layers.slide_mpp_hint`). Parts of one ``feature`` go back
into one feature (a ``MultiPolygon`` when there are several), holes into their polygon, and
``name``, ``classification`` and the edge colour (the class colour) into QuPath's properties
(:func:`~napari_stmap.core.regions.annotations_from_shapes`,
:func:`~napari_stmap.core.io.regions.write_geojson`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write_shapes(path: str, data: list, meta: dict[str, Any]) -> list[str]:
    """Write one Shapes layer (napari's ``data`` and ``meta``) to ``path`` as GeoJSON.

    Returns the paths written (``[path]``). The file is replaced when it exists (napari's save
    dialog asks first).
    """
    from ._layers import REGION_RGB
    from .core.io.regions import write_geojson
    from .core.regions import annotations_from_shapes

    vertices_yx = level0_vertices(data, meta)
    properties = meta.get("features")
    if properties is None:
        properties = meta.get("properties")
    annotations = annotations_from_shapes(
        list(meta.get("shape_type") or ["polygon"] * len(data)),
        vertices_yx,
        properties,
        colors=_edge_colors(meta, len(data)),
    )
    for ann in annotations:
        if not ann.classification and ann.color == REGION_RGB:
            ann.color = None  # the colour the reader gives objects without one
    return [str(write_geojson(path, annotations))]


def level0_vertices(data: list, meta: dict[str, Any]) -> list[np.ndarray]:
    """Vertices (n, 2) of each shape in level-0 px (y, x) of the slide.

    The plugin's regions layers hold level-0 px: ``data + translate / scale`` (a translate in
    the world moves them); other layers are in the world (µm): ``(data · scale + translate) /
    mpp`` with the µm/px of the slide opened last. Raises ValueError for rotate/shear/affine.
    """
    _check_transform(meta)
    stmap = (meta.get("metadata") or {}).get("stmap") or {}
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), dtype=float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), dtype=float)[-2:]
    shapes = [np.asarray(v, dtype=float)[:, -2:] for v in data]
    if stmap.get("units") == "px" or stmap.get("kind") == "regions":
        return [v + translate / scale for v in shapes]
    from ._layers import slide_mpp_hint

    mpp, _ = slide_mpp_hint()
    return [(v * scale + translate) / mpp for v in shapes]


def _check_transform(meta: dict[str, Any]) -> None:
    """Refuse a layer whose rotate, shear or affine move the shapes (scale, translate only)."""
    moved = [
        key
        for key in ("rotate", "affine")
        if meta.get(key) is not None
        and not np.allclose(np.asarray(meta[key], float), np.eye(len(meta[key])))
    ]
    if meta.get("shear") is not None and np.any(np.asarray(meta["shear"], float) != 0):
        moved.append("shear")
    if moved:
        msg = (
            f"layer {meta.get('name')!r} has a {'/'.join(moved)} transform that GeoJSON export "
            "cannot apply: reset it to the identity, or draw the shapes in a layer without one"
        )
        raise ValueError(msg)


def _edge_colors(meta: dict[str, Any], n: int) -> np.ndarray | None:
    colors = meta.get("edge_color")
    if colors is None:
        return None
    arr = np.asarray(colors, dtype=float)
    return arr.reshape(n, -1) if arr.size and arr.ndim == 2 and len(arr) == n else None
