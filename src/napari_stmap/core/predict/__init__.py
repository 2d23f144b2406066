"""Prediction: one tiled dense path, bin models (MagNet), gene views, cohorts, one source interface.

- Dense models run tile by tile through one pipeline (:mod:`.reader` windows at the model's
  µm/px, :mod:`.pipeline` batches on the device, :mod:`.scheduler` order): into a store,
  interactively (:class:`Predictor`, :func:`ensure_region`) or for whole slides and cohorts on
  dask (:func:`predict_slide`, :func:`predict_cohort`), or into memory (:func:`predict_map`).
- Gene maps are cheap views of the stored embeddings (:func:`gene_view`, :func:`gene_pyramid`,
  :class:`LiveGeneView` for a GUI).
- :func:`predict_spots` answers at spots for any architecture; bin models answer at bin
  centres (:func:`predict_bin_region`, :class:`BinPrediction`).
- :class:`PredictionSource` is the one interface docks, ``stmap aggregate`` and Compare use
  (:class:`StoreSource` for a dense store, :class:`BinSource` for bins).

Positions are level-0 px of the slide, axis order (y, x); maps are (C, H, W) in output px.
"""

from __future__ import annotations

from .bins import (
    DEFAULT_BIN_UM,
    BinPrediction,
    PredictionCancelled,
    bin_lattice,
    bin_raster,
    model_bin_um,
    predict_bin_centres,
    predict_bin_region,
    predict_bins,
    predict_footprints,
)
from .cohort import model_cache_info, predict_cohort, predict_slide
from .dense import map_region, predict_map, region_spec
from .device import available_devices, dihedral_embed
from .live_view import DEFAULT_LIVE_CACHE_BYTES, LiveGeneView, ViewWorker
from .pipeline import embed_windows, shutdown_io_pool
from .predictor import DISPLAY_MASK_MARGIN_UM, Predictor, ensure_region
from .reader import DEFAULT_IMAGE_CACHE_BYTES, SlideReader
from .source import (
    BinSource,
    PredictionSource,
    StoreSource,
    as_source,
    combine_parts,
    region_parts,
)
from .spots import predict_spots, spot_area_ratio, spot_footprints
from .units import predict_units, unit_spots
from .views import gene_pyramid, gene_view, region_map, view_grid

__all__ = [
    "DEFAULT_BIN_UM",
    "DEFAULT_IMAGE_CACHE_BYTES",
    "DEFAULT_LIVE_CACHE_BYTES",
    "DISPLAY_MASK_MARGIN_UM",
    "BinPrediction",
    "BinSource",
    "LiveGeneView",
    "PredictionCancelled",
    "PredictionSource",
    "Predictor",
    "SlideReader",
    "StoreSource",
    "ViewWorker",
    "as_source",
    "available_devices",
    "bin_lattice",
    "bin_raster",
    "combine_parts",
    "dihedral_embed",
    "embed_windows",
    "ensure_region",
    "gene_pyramid",
    "gene_view",
    "map_region",
    "model_bin_um",
    "model_cache_info",
    "predict_bin_centres",
    "predict_bin_region",
    "predict_bins",
    "predict_cohort",
    "predict_footprints",
    "predict_map",
    "predict_slide",
    "predict_spots",
    "predict_units",
    "region_map",
    "region_parts",
    "region_spec",
    "shutdown_io_pool",
    "spot_area_ratio",
    "spot_footprints",
    "unit_spots",
    "view_grid",
]
