"""Per-cell predicted expression: cells from a segmentation, summed over the dense map.

Cells come from a label image (Cellpose, StarDist, InstanSeg output as TIFF / OME-TIFF, at the
slide's size or a whole-number downsample), GeoJSON polygons (QuPath detections), a napari
Labels layer, or the built-in baseline nucleus segmentation (:func:`segment_nuclei`). They may
be grown by a distance into the cytoplasm (:func:`expand_cells`, the bin2cell / Xenium
convention). Each cell's value is the dense map summed over its mask with fractional coverage
(the additive rule of ``DESIGN.md``), measured tile by tile with memory flat in slide size
(:func:`iter_cells`), and written as ``cells.h5ad`` + ``cells.geojson`` (:class:`CellWriter`,
:func:`run_cells` = ``stmap cells``).

Units: level-0 px, axis order (y, x) inside; (x, y) in ``obsm['spatial']`` and GeoJSON.

Modules: ``labels`` (label sources, downsample check), ``segment`` (built-in nuclei),
``expand`` (growth into cells), ``measure`` (per-cell sums, outlines), ``polygons`` (GeoJSON
cells, exact polygon sums), ``export`` (h5ad + GeoJSON), ``run`` (the whole run).
"""

from __future__ import annotations

from .expand import ExpandedLabels, expand_cells
from .export import CellWriter, build_cells_anndata, geojson_path, write_cells
from .labels import (
    ArrayLabels,
    LabelSource,
    PolygonLabels,
    label_factor,
    labels_from_layer,
    open_labels,
)
from .measure import CellBatch, CellTable, collect, iter_cells
from .polygons import PolygonCells, read_cells_geojson
from .run import measure_cells, open_cells, run_cells
from .segment import NucleusParams, segment_nuclei

__all__ = [
    "ArrayLabels",
    "CellBatch",
    "CellTable",
    "CellWriter",
    "ExpandedLabels",
    "LabelSource",
    "NucleusParams",
    "PolygonCells",
    "PolygonLabels",
    "build_cells_anndata",
    "collect",
    "expand_cells",
    "geojson_path",
    "iter_cells",
    "label_factor",
    "labels_from_layer",
    "measure_cells",
    "open_cells",
    "open_labels",
    "read_cells_geojson",
    "run_cells",
    "segment_nuclei",
    "write_cells",
]
