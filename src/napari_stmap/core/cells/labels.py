"""Cell label images read lazily, window by window, whatever they come from.

A *label image* gives every pixel the id of the cell it belongs to (0: no cell). Here it may be
a segmentation written by another tool (Cellpose, StarDist, InstanSeg: a TIFF / OME-TIFF or a
zarr array), a napari Labels layer, the built-in segmentation
(:mod:`~napari_stmap.core.cells.segment`), or GeoJSON polygons drawn into pixels on demand
(QuPath detections, :class:`PolygonLabels`).

Frames: a label image may be at the slide's full resolution or at a whole-number downsample
``f`` of it. Label pixel ``(a, b)`` covers level-0 px ``[a·f, (a+1)·f) × [b·f, (b+1)·f)``,
axis order (y, x). :func:`label_factor` finds ``f`` from the two sizes and refuses anything
else. Windows are asked for in label px, ``(r0, c0, r1, c1)`` with ends exclusive; parts
outside the image read as 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StmapInputError

__all__ = [
    "MAX_FACTOR",
    "ArrayLabels",
    "LabelSource",
    "PolygonLabels",
    "label_factor",
    "labels_from_layer",
    "open_labels",
]

logger = logging.getLogger(__name__)

#: Largest downsample of a label image accepted (a label px then spans 64 level-0 px).
MAX_FACTOR = 64
LABEL_SUFFIXES = (".tif", ".tiff", ".zarr", ".npy")


class LabelSource:
    """A label image read in windows. Subclasses set the attributes and :meth:`_read`.

    Attributes
    ----------
    shape_hw : (int, int)
        Size in label px.
    factor : int
        Level-0 px per label px (1: full resolution).
    kind : str
        Where the cells come from: ``"labels"``, ``"segment"``, ``"geojson"``,
        ``"napari-labels"`` (recorded in the output's provenance).
    name : str
        File name or layer name, for messages and provenance.
    """

    shape_hw: tuple[int, int]
    factor: int
    kind: str
    name: str
    origin: tuple[int, int] = (0, 0)

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """Label-px window ``(r0, c0, r1, c1)`` the image covers (origin + shape)."""
        (oy, ox), (h, w) = self.origin, self.shape_hw
        return (oy, ox, oy + h, ox + w)

    def read(self, window: Sequence[int]) -> np.ndarray:
        """Labels of window ``(r0, c0, r1, c1)`` (label px, ends exclusive) as (h, w) int64.

        The window may extend beyond the image; those parts are 0.
        """
        r0, c0, r1, c1 = (int(v) for v in window)
        out = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), dtype=np.int64)
        e = self.extent
        ys, ye, xs, xe = max(r0, e[0]), min(r1, e[2]), max(c0, e[1]), min(c1, e[3])
        if ye > ys and xe > xs:
            oy, ox = self.origin
            block = self._read(ys - oy, xs - ox, ye - oy, xe - ox)
            out[ys - r0 : ye - r0, xs - c0 : xe - c0] = block
        return out

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def level0_bbox(self, window: Sequence[int]) -> tuple[float, float, float, float]:
        """Level-0 px box ``(y0, x0, y1, x1)`` of a label-px window."""
        f = self.factor
        return tuple(float(v * f) for v in window)  # type: ignore[return-value]

    def to_window(self, bbox_yx: Sequence[float]) -> tuple[int, int, int, int]:
        """Smallest label-px window holding a level-0 px box, clipped to the image."""
        f, (e0, e1, e2, e3) = self.factor, self.extent
        y0, x0, y1, x1 = (float(v) for v in bbox_yx)
        return (
            int(np.clip(math.floor(y0 / f), e0, e2)),
            int(np.clip(math.floor(x0 / f), e1, e3)),
            int(np.clip(math.ceil(y1 / f), e0, e2)),
            int(np.clip(math.ceil(x1 / f), e1, e3)),
        )

    def describe(self) -> str:
        h, w = self.shape_hw
        at = "full resolution" if self.factor == 1 else f"1/{self.factor} resolution"
        return f"{self.name}: {h} × {w} label px ({at})"


class ArrayLabels(LabelSource):
    """Labels in an array-like (numpy, zarr, dask, a TIFF's zarr view), read window by window.

    Parameters
    ----------
    array
        2-D (y, x) integer labels (extra leading axes of size 1 are dropped).
    factor
        Level-0 px per label px.
    kind, name
        See :class:`LabelSource`.
    origin
        Label px (y, x) of the array's pixel (0, 0) (a crop of the slide); default (0, 0).
    """

    def __init__(
        self,
        array: Any,
        factor: int,
        *,
        kind: str,
        name: str,
        origin: tuple[int, int] = (0, 0),
    ) -> None:
        arr = array
        while getattr(arr, "ndim", 2) > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if getattr(arr, "ndim", 0) != 2:
            msg = f"{name}: labels of shape {tuple(array.shape)} are not a 2-D (y, x) image; pass one plane"
            raise StmapInputError(msg)
        if not np.issubdtype(np.dtype(arr.dtype), np.integer):
            msg = f"{name}: labels of dtype {arr.dtype} are not integer ids; pass an integer label image"
            raise StmapInputError(msg)
        self.array = arr
        self.shape_hw = (int(arr.shape[0]), int(arr.shape[1]))
        self.factor, self.kind, self.name = int(factor), kind, name
        self.origin = (int(origin[0]), int(origin[1]))

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        block = self.array[r0:r1, c0:c1]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="threads")
        return np.asarray(block).astype(np.int64, copy=False)


def label_factor(labels_hw: Sequence[int], slide_hw: Sequence[int], *, name: str = "labels") -> int:
    """Level-0 px per label px of a label image, from its size and the slide's.

    Accepts the slide's size (factor 1) or a whole-number downsample ``f`` (2 ≤ f ≤
    :data:`MAX_FACTOR`) whose size is ``slide / f`` rounded either way, the same ``f`` along y
    and x. Anything else is refused naming both sizes and the sizes that would fit.
    """
    (h, w), (sh, sw) = (int(v) for v in labels_hw), (int(v) for v in slide_hw)
    if h > 0 and w > 0:
        for f in range(1, MAX_FACTOR + 1):
            fits_y = h in (math.floor(sh / f), math.ceil(sh / f))
            fits_x = w in (math.floor(sw / f), math.ceil(sw / f))
            if fits_y and fits_x:
                return f
    allowed = ", ".join(f"{math.ceil(sh / f)} × {math.ceil(sw / f)} (1/{f})" for f in (2, 4, 8))
    msg = (
        f"{name} is {h} × {w} px (y × x) but the slide is {sh} × {sw} px: a label image must "
        f"be the slide's size or a whole-number downsample of it, e.g. {allowed}"
    )
    raise StmapInputError(msg)


def open_labels(path: str | Path, slide_hw: Sequence[int]) -> ArrayLabels:
    """Open a label image lazily: TIFF / OME-TIFF (level 0 of its first series), zarr or .npy.

    Parameters
    ----------
    path
        The label image (e.g. Cellpose / StarDist / InstanSeg output saved as TIFF).
    slide_hw
        Level-0 size (y, x) of the slide; the label image's downsample is found from it
        (:func:`label_factor`).
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such label image; check the path"
        raise StmapInputError(msg)
    suffix = path.suffix.lower()
    if suffix not in LABEL_SUFFIXES:
        msg = f"{path}: unsupported label image {path.suffix!r}; use a TIFF / OME-TIFF, zarr or .npy label image"
        raise StmapInputError(msg)
    array = _open_array(path, suffix)
    source = ArrayLabels(array, 1, kind="labels", name=path.name)
    source.factor = label_factor(source.shape_hw, slide_hw, name=path.name)
    logger.info("%s", source.describe())
    return source


def _open_array(path: Path, suffix: str) -> Any:
    if suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if suffix == ".zarr":
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:  # not a zarr store at all
            msg = f"{path}: not a zarr label array ({exc}); pass a TIFF or a zarr array"
            raise StmapInputError(msg) from None
        return node if hasattr(node, "shape") else node[sorted(node.array_keys())[0]]
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, dtype = series.shape, series.dtype
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
    except (tifffile.TiffFileError, OSError, IndexError) as exc:
        msg = f"{path}: not a readable TIFF label image ({exc}); save the labels as a TIFF"
        raise StmapInputError(msg) from None
    logger.debug("%s: %s %s", path, shape, dtype)
    return zarr.open(store, mode="r")


def labels_from_layer(
    data: Any, scale: Sequence[float], *, mpp: float, slide_hw: Sequence[int], name: str
) -> ArrayLabels:
    """A napari Labels layer's data as a label source.

    Parameters
    ----------
    data
        The layer's (y, x) array (the first level of a multiscale layer).
    scale
        The layer's scale (world units per layer px, (y, x)); the plugin's world is µm.
    mpp
        The slide's µm per level-0 px: the layer's downsample is ``scale / mpp``.
    slide_hw
        Level-0 size of the slide, for the check of the layer's size.
    """
    factor = float(scale[-1]) / float(mpp)
    f = round(factor)
    if f < 1 or abs(factor - f) > 1e-3 * f:
        msg = f"layer {name!r} has scale {float(scale[-1]):g} µm/px, not a whole multiple of the slide's {mpp:g} µm/px; give it scale = k·{mpp:g}"
        raise StmapInputError(msg)
    source = ArrayLabels(data, f, kind="napari-labels", name=name)
    if not _covers(source.shape_hw, f, slide_hw):
        (h, w), (sh, sw) = source.shape_hw, (int(v) for v in slide_hw)
        msg = (
            f"layer {name!r} is {h} × {w} px at 1/{f} resolution ({h * f} × {w * f} level-0 px) "
            f"but the slide is {sh} × {sw} px; use labels made on this slide"
        )
        raise StmapInputError(msg)
    return source


def _covers(shape_hw: Sequence[int], f: int, slide_hw: Sequence[int]) -> bool:
    """Whether labels of ``shape_hw`` at factor ``f`` fit the slide (one label px of slack)."""
    return all(abs(s * f - t) < f for s, t in zip(shape_hw, slide_hw, strict=True))


class PolygonLabels(LabelSource):
    """GeoJSON cell polygons drawn into level-0 px labels on demand, window by window.

    Pixel ``(y, x)`` belongs to a polygon when its centre ``(y + 0.5, x + 0.5)`` is inside it;
    where polygons overlap the later one wins. Holes are left empty.

    Parameters
    ----------
    polygons
        Per cell, a list of rings ``[outer, *holes]`` per part: arrays (n, 2) of level-0 px
        (y, x).
    ids
        Label id of each cell (> 0).
    slide_hw
        Level-0 size of the slide (the label image's size).
    name
        File name, for messages.
    """

    def __init__(
        self,
        polygons: Sequence[Sequence[Sequence[np.ndarray]]],
        ids: np.ndarray,
        slide_hw: Sequence[int],
        *,
        name: str,
    ) -> None:
        self.polygons, self.ids = list(polygons), np.asarray(ids, dtype=np.int64)
        self.shape_hw = (int(slide_hw[0]), int(slide_hw[1]))
        self.factor, self.kind, self.name = 1, "geojson", name
        boxes = [np.concatenate([r for part in cell for r in part[:1]]) for cell in self.polygons]
        self.bboxes = np.array(
            [[*b.min(axis=0), *b.max(axis=0)] for b in boxes], dtype=float
        ).reshape(-1, 4)

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        from skimage.draw import polygon as draw_polygon

        out = np.zeros((r1 - r0, c1 - c0), dtype=np.int64)
        b = self.bboxes
        hit = np.flatnonzero((b[:, 2] > r0) & (b[:, 0] < r1) & (b[:, 3] > c0) & (b[:, 1] < c1))
        for k in hit:
            for part in self.polygons[k]:
                for n, ring in enumerate(part):
                    v = np.asarray(ring, dtype=float) - (r0 + 0.5, c0 + 0.5)
                    rr, cc = draw_polygon(v[:, 0], v[:, 1], out.shape)
                    out[rr, cc] = self.ids[k] if n == 0 else 0
        return out
