"""What the Cells dock shows: cells as label pyramids and per-cell values as a lazy image.

Qt-free helpers behind ``_widgets/cells.py``. The cells of a view (or the whole slide) are
made into a label image once (:func:`materialise`: numpy for a view, a zarr pyramid on disk for
large extents, written chunk by chunk) and shown as one napari Labels layer (multiscale: levels
by 2, nearest). A gene is shown as an Image whose pixels are the cell's value, looked up from
the labels chunk by chunk (:func:`value_pyramid`, dask): switching genes swaps one lookup table,
no per-cell Python objects, so 100,000 cells stay fluid.

Placement (:func:`layer_placement`): label px ``(a, b)`` covers level-0 px ``[a·f, (a+1)·f)``;
in the viewer's µm world (slide pixel centres at ``index · mpp``) a label image with origin ``o``
gets ``scale = f · mpp`` and ``translate = ((o + 0.5)·f − 0.5)·mpp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import normalize_expression
from .labels import LabelSource
from .measure import CellTable, collect
from .run import measure_cells, open_cells

__all__ = [
    "DockCells",
    "cell_values",
    "compute_dock_cells",
    "layer_placement",
    "materialise",
    "value_pyramid",
]

#: Extents up to this many label px are kept in memory (numpy); larger ones go to zarr.
IN_MEMORY_PX = 64 * 2**20
CHUNK = 1024
#: Cell ids up to this value are looked up through a direct table (4 bytes per id).
DIRECT_LUT_MAX_ID = 2**25


@dataclass
class DockCells:
    """Cells of one dock run: the table and the label pyramid to show.

    Attributes
    ----------
    table : CellTable
        Ids, counts (genes then total), areas (level-0 px²), centroids, outlines.
    levels : list of array-like
        Label pyramid (level 0 first), (y, x) label px of the shown window.
    origin : (int, int)
        Label px of the window's top-left pixel.
    factor : int
        Level-0 px per label px.
    kind : str
        The cells' source (``segment``, ``labels``, ``geojson``, ``napari-labels``).
    """

    table: CellTable
    levels: list
    origin: tuple[int, int]
    factor: int
    kind: str


def materialise(
    source: LabelSource, window: Sequence[int], out_dir: str | Path | None = None
) -> list:
    """Labels of a label-px window as a pyramid: numpy (small) or zarr in ``out_dir`` (large)."""
    r0, c0, r1, c1 = (int(v) for v in window)
    h, w = r1 - r0, c1 - c0
    if h * w <= IN_MEMORY_PX or out_dir is None:
        base = source.read(window).astype(np.int32)
        return [base[:: 2**k, :: 2**k] for k in range(_n_levels(h, w))]
    import zarr

    root = zarr.open_group(str(out_dir), mode="w")
    levels = [root.create_array("0", shape=(h, w), chunks=(CHUNK, CHUNK), dtype="int32")]
    for y in range(0, h, CHUNK):
        for x in range(0, w, CHUNK):
            ye, xe = min(y + CHUNK, h), min(x + CHUNK, w)
            levels[0][y:ye, x:xe] = source.read((r0 + y, c0 + x, r0 + ye, c0 + xe))
    for k in range(1, _n_levels(h, w)):
        prev = levels[-1]
        ph, pw = prev.shape
        arr = root.create_array(
            str(k), shape=(-(-ph // 2), -(-pw // 2)), chunks=(CHUNK, CHUNK), dtype="int32"
        )
        for y in range(0, ph, 2 * CHUNK):
            for x in range(0, pw, 2 * CHUNK):
                block = np.asarray(prev[y : y + 2 * CHUNK : 2, x : x + 2 * CHUNK : 2])
                arr[y // 2 : y // 2 + block.shape[0], x // 2 : x // 2 + block.shape[1]] = block
        levels.append(arr)
    return levels


def _n_levels(h: int, w: int) -> int:
    return 1 + max(0, math.ceil(math.log2(max(h, w) / 2048))) if max(h, w) > 2048 else 1


def layer_placement(origin: Sequence[int], factor: int, mpp: float) -> dict[str, tuple]:
    """napari ``scale`` and ``translate`` (µm, (y, x)) of a label image (see module notes)."""
    s = factor * mpp
    t = tuple(((o + 0.5) * factor - 0.5) * mpp for o in origin)
    return {"scale": (s, s), "translate": t}


def cell_values(table: CellTable, names: Sequence[str], gene: str, mode: str) -> np.ndarray:
    """Per-cell value of ``gene``: ``"normalised"`` log1p(1e4·g/total) or ``"counts"``."""
    col = list(names).index(gene)
    counts = table.counts
    if mode == "counts":
        return counts[:, col].astype(np.float32)
    return normalize_expression(counts[:, [col]], counts[:, -1])[:, 0].astype(np.float32)


def value_pyramid(levels: list, ids: np.ndarray, values: np.ndarray) -> list:
    """Lazy float32 images: each label pixel replaced by its cell's value (NaN: no cell)."""
    import dask.array as da

    ids = np.asarray(ids, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    top = int(ids.max()) if ids.size else 0
    if ids.size and ids.min() > 0 and top <= DIRECT_LUT_MAX_ID:
        table = np.full(top + 2, np.nan, np.float32)  # one slot past the last id: "no cell"
        table[ids] = values

        def lookup(block: np.ndarray) -> np.ndarray:  # a direct table: ~7x faster per block
            idx = np.where((block > 0) & (block <= top), block, top + 1)
            return table[idx]

    else:
        order = np.argsort(ids)
        sid, sval = ids[order], values[order]

        def lookup(block: np.ndarray) -> np.ndarray:
            if sid.size == 0:
                return np.full(block.shape, np.nan, np.float32)
            idx = np.clip(np.searchsorted(sid, block), 0, sid.size - 1)
            return np.where(sid[idx] == block, sval[idx], np.float32(np.nan))

    out = []
    for lvl in levels:
        arr = da.from_array(lvl, chunks=(CHUNK, CHUNK))
        out.append(arr.map_blocks(lookup, dtype=np.float32))
    return out


def compute_dock_cells(
    slide: Any,
    source: Any,
    *,
    how: str,
    path: str | Path | None = None,
    layer: tuple[Any, Sequence[float], str] | None = None,
    expand_um: float = 0.0,
    bbox_yx: Sequence[float] | None = None,
    work_dir: str | Path | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> DockCells:
    """The dock's run (in a worker): cells of a view or the slide, measured, and shown.

    ``how``: ``"segment"``, ``"labels"`` (``path``), ``"geojson"`` (``path``) or ``"layer"``
    (``layer`` = (data, scale, name)). ``bbox_yx``: the view (level-0 px), None: the slide.
    ``work_dir``: where a whole-slide segmentation and large label pyramids are written.
    """
    work = Path(work_dir) if work_dir is not None else None
    seg_out = work / "nuclei.zarr" if (how == "segment" and bbox_yx is None and work) else None
    cells = open_cells(
        slide,
        labels=path if how == "labels" else None,
        geojson=path if how == "geojson" else None,
        layer=layer if how == "layer" else None,
        segment=how == "segment",
        expand_um=expand_um,
        bbox_yx=bbox_yx,
        segment_out=seg_out,
    )
    names = list(source.output_names) if source is not None else []
    batches = measure_cells(cells, source, mpp=slide.mpp, bbox_yx=bbox_yx, progress=progress)
    table = collect(batches, names)
    labels = cells if isinstance(cells, LabelSource) else cells.as_labels(slide.shape_yx)
    window = labels.extent if bbox_yx is None else labels.to_window(bbox_yx)
    levels = materialise(labels, window, work / "display.zarr" if work else None)
    return DockCells(table, levels, (window[0], window[1]), labels.factor, cells.kind)
