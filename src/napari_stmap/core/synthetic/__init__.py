"""Synthetic H&E tissue with known expression truth, written like Space Ranger Visium HD output.

The generator backs the demo, the tests and the HD-scale benchmarks. It draws an H&E-like slide
(pink eosin stroma with collagen fibres, purple haematoxylin nuclei; tumour nests, immune
aggregates, normal ducts, adipose tissue, fibrous stroma; near-white background around an
irregular tissue outline) and, from the very same cells, an expression truth:

* ``he.ome.tif``: pyramidal OME-TIFF (512 px JPEG tiles, SubIFD levels by factors of 2 down to
  < 1024 px, ``PhysicalSizeX/Y`` in µm).
* ``truth.zarr``: on a 2 µm grid over the whole slide, the area fraction of every cell type
  (``abundance``, axes (type, y, x)), the tissue fraction, the smooth fields, and the
  gene-by-component profile matrix in UMI per µm² at the reference depth.
* ``outs/binned_outputs/square_XXXum``: Visium HD bins over a centred capture area (at most
  6.5 mm × 6.5 mm): Poisson counts drawn at the finest bin size and summed into the larger
  ones, so bins of different sizes are exactly additive, as in real Visium HD data.
* ``synthetic.json``: seed, µm/px, sizes, genes with their category, cell types, bin sizes,
  capture area.

Everything is a pure function of the seed and of position: per-pixel noise comes from a
counter-based hash of the global pixel index, cells from jittered lattices whose random numbers
are hashes of the lattice index, smooth fields from hashed value noise on a global 8 µm node
grid. A tile therefore looks the same whatever the tiling and the order of generation, and the
slide is written tile by tile with memory bounded by one row of tiles.

Units: positions in µm unless a name ends in ``_px``; level-0 slide pixels are (y, x) and the
pixel (r, c) covers µm ``[r·mpp, (r+1)·mpp) × [c·mpp, (c+1)·mpp)``; the truth cell (i, j)
covers µm ``[2i, 2i+2) × [2j, 2j+2)``.

Modules, lowest first (each imports only those above it): ``_noise`` (hashes, value noise),
``_fields`` (world, cell types, smooth fields), ``_cells``, ``_raster`` (grids, stamps),
``_render`` (H&E colour model), ``_sample`` (SyntheticSample on disk), ``_genes`` (expression
model), ``_truth`` (truth.zarr), ``_density`` (:func:`truth_density`), ``_visium_hd`` (Space
Ranger layout), ``_ometiff`` (pyramidal slide), ``_write`` (:func:`write_synthetic`).
"""

from __future__ import annotations

from ._density import truth_density
from ._fields import CELL_TYPES, TRUTH_GRID_UM
from ._fields import _make_world as _make_world  # for tests: one world, any block
from ._render import _render_rgb as _render_rgb  # for tests: region render
from ._sample import SyntheticSample, load_synthetic
from ._write import write_synthetic

__all__ = [
    "CELL_TYPES",
    "TRUTH_GRID_UM",
    "SyntheticSample",
    "load_synthetic",
    "truth_density",
    "write_synthetic",
]
