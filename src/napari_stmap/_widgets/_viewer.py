"""What the docks read from and do to the viewer: the plugin's own layers and the camera.

Layers the plugin owns are named ``stmap: …`` (:data:`PREFIX`) and found by name; the drawn
shapes and spot grids are kept above the plugin's other layers. The part of the slide in view
is read from the camera through napari's public API only (plugin docks get a proxy of the
viewer that hides private attributes).
"""

from __future__ import annotations

from collections.abc import Sequence

from napari_stmap.core.display import (
    ANNOTATION_KINDS,
    LAYER_PREFIX,
    stmap_kind,
    stmap_meta,
    view_box_px,
)

from .._layers import show_scale_bar, slide_layer

__all__ = [
    "ANNOTATION_KINDS",
    "PREFIX",
    "camera_of",
    "keep_annotations_on_top",
    "owned_layer",
    "replace_layer",
    "show_slide",
    "slide_layers",
    "stmap_kind",
    "viewport_bbox_px",
]

#: Prefix of every layer the plugin owns (updated in place, never duplicated).
PREFIX = LAYER_PREFIX


def owned_layer(viewer, name: str):
    """The layer called ``name`` in ``viewer``, or None."""
    return viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 (LayerList)


def replace_layer(viewer, kind: str, data, kwargs: dict, old_name: str | None = None):
    """Add a layer of ``kind`` (``"image"``, ``"points"``, …) from napari layer data.

    The layer called ``old_name`` (default ``kwargs["name"]``), if any, is removed first;
    returns the new layer.
    """
    old = owned_layer(viewer, old_name or kwargs["name"])
    if old is not None:
        viewer.layers.remove(old)
    return getattr(viewer, f"add_{kind}")(data, **kwargs)


def slide_layers(viewer) -> list:
    """Image layers of slides opened by the plugin (``metadata["stmap"]["kind"] == "slide"``)."""
    from napari.layers import Image

    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image) and stmap_meta(layer).get("kind") == "slide"
    ]


def show_slide(viewer, slide) -> str:
    """Name of the layer of ``slide``: the one showing its file already, else a new one.

    Either way the slide's µm/px becomes the hint GeoJSON layers follow (``slide_layer``).
    """
    data, kwargs, _ = slide_layer(slide)
    existing = [ly for ly in slide_layers(viewer) if stmap_meta(ly)["path"] == str(slide.path)]
    name = existing[0].name if existing else viewer.add_image(data, **kwargs).name
    show_scale_bar(viewer)
    return name


def keep_annotations_on_top(viewer) -> bool:
    """Move the shapes and spot-grid layers of the plugin to the top (keeping their order).

    Returns whether anything moved.
    """
    layers = viewer.layers
    idx = [k for k, layer in enumerate(layers) if stmap_kind(layer) in ANNOTATION_KINDS]
    n = len(layers)
    if not idx or idx == list(range(n - len(idx), n)):
        return False
    active = layers.selection.active
    layers.move_multiple(idx, n)
    if active is not None and active in layers:
        layers.selection.active = active
    return True


def camera_of(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def viewport_bbox_px(viewer, mpp: float, shape_yx: Sequence[int]) -> tuple[float, ...] | None:
    """The part of the slide in view, level-0 px ``(y0, x0, y1, x1)`` (world µm / ``mpp``).

    None when the view does not overlap the slide.
    """
    cam = camera_of(viewer)
    h, w = (float(v) for v in viewer.canvas.size)
    zoom = float(cam.zoom) or 1.0
    return view_box_px(cam.center[-2:], (h / zoom, w / zoom), mpp, shape_yx)
