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
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stmap.core.errors import StmapInputError

__all__ = [
    "CELL_TYPES",
    "TRUTH_GRID_UM",
    "SyntheticSample",
    "load_synthetic",
    "truth_density",
    "write_synthetic",
]

log = logging.getLogger(__name__)

CELL_TYPES: tuple[str, ...] = ("tumour", "lymphocyte", "fibroblast", "epithelial", "adipocyte")
"""Cell types of the synthetic tissue, in the order of the ``abundance`` axis of truth.zarr."""
TRUTH_GRID_UM = 2.0
"""Side of a truth cell in µm (the finest Visium HD bin)."""

_TUM, _LYM, _FIB, _EPI, _ADI = range(5)
_SUB = 4  # truth sub-samples per truth cell side (0.5 µm)
_NODE_UM = 8.0  # spacing of the global node grid that carries the smooth fields
_MAX_CAPTURE_UM = 6500.0
_SLIDE_TILE = 512
_TRUTH_CHUNK = 256  # truth cells per zarr chunk side (512 µm)
_MARGIN_UM = 100.0  # cells are generated this far around a region (exclusion chains, ducts)
_FIELD_NAMES = ("ecm", "hypoxia", "noise1", "noise2", "noise3")

# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSample:
    """Paths and metadata of a synthetic sample written by :func:`write_synthetic`.

    Attributes
    ----------
    root : Path
        Folder of the sample.
    slide : Path
        ``root/"he.ome.tif"``, the pyramidal H&E slide.
    outs : Path
        ``root/"outs"``, Space Ranger layout (``binned_outputs/square_XXXum``).
    truth : Path
        ``root/"truth.zarr"``, expression truth on a 2 µm grid.
    mpp : float
        µm per level-0 pixel.
    genes : tuple of str
        Gene names, in the order of the count matrices.
    bin_sizes_um : tuple of float
        Side of the square bins written, in µm.
    seed : int
        Seed the sample was generated from.
    """

    root: Path
    slide: Path
    outs: Path
    truth: Path
    mpp: float
    genes: tuple[str, ...]
    bin_sizes_um: tuple[float, ...]
    seed: int

    @property
    def metadata(self) -> dict[str, Any]:
        """Content of ``root/"synthetic.json"`` (read on each access)."""
        return json.loads((self.root / "synthetic.json").read_text())


def write_synthetic(
    out_dir: str | Path,
    *,
    size_um: tuple[float, float] = (1500.0, 1500.0),
    mpp: float = 0.5,
    n_genes: int = 60,
    seed: int = 0,
    bin_sizes_um: Sequence[float] = (2.0, 8.0, 16.0),
    depth: float = 1.0,
    tile_px: int = 1024,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSample:
    """Write a synthetic H&E slide, its expression truth and Visium HD bins.

    Parameters
    ----------
    out_dir : str or Path
        Folder to create (must be absent or empty unless ``overwrite``).
    size_um : (float, float)
        Slide (width, height) in µm, like the CLI's ``--size-um W H``.
    mpp : float
        µm per level-0 pixel of the slide.
    n_genes : int
        Number of genes (at least 8): markers, smooth, noise and housekeeping genes.
    seed : int
        Everything (pixels, truth, counts) is a deterministic function of the seed.
    bin_sizes_um : sequence of float
        Square bin sides in µm; each an even integer and a multiple of the smallest.
    depth : float
        Sequencing depth relative to the reference depth of the truth (1.0: about 100 UMI per
        8 µm bin in cell-dense tissue); counts are ``Poisson(depth · truth)``.
    tile_px : int
        Side of the blocks the slide is generated in (a multiple of 512); changes memory and
        speed only, never the pixels.
    overwrite : bool
        Replace the sample files in a non-empty ``out_dir``.
    progress : callable, optional
        Called with ``(done, total)`` steps.

    Returns
    -------
    SyntheticSample
    """
    root = Path(out_dir)
    sizes = _check_args(root, size_um, mpp, n_genes, bin_sizes_um, depth, tile_px, overwrite)
    world = _make_world(seed, mpp, size_um)
    genes, profiles = _gene_table(n_genes, seed)
    root.mkdir(parents=True, exist_ok=True)
    capture = _capture_bbox(world, sizes)
    steps = _Progress(progress, _count_steps(world, sizes, capture, n_genes, tile_px))
    log.info(
        "synthetic: %d × %d px at %.3f µm/px into %s", world.width_px, world.height_px, mpp, root
    )
    _write_truth(world, root / "truth.zarr", genes, profiles, steps)
    _write_bins(world, root, genes, profiles, sizes, capture, depth, steps)
    n_levels = _write_slide(world, root / "he.ome.tif", tile_px, steps)
    _write_spatial(world, root, sizes, capture, n_levels)
    steps.tick()
    meta = _metadata(world, genes, sizes, capture, depth, n_levels)
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return load_synthetic(root)


def load_synthetic(root: str | Path) -> SyntheticSample:
    """Open a sample written by :func:`write_synthetic` (reads ``root/"synthetic.json"``).

    Raises
    ------
    StmapInputError
        When ``root`` holds no ``synthetic.json``.
    """
    root = Path(root)
    meta_path = root / "synthetic.json"
    if not meta_path.is_file():
        msg = f"{root} is not a synthetic sample (no synthetic.json); write one with write_synthetic() or `stmap synth`"
        raise StmapInputError(msg)
    meta = json.loads(meta_path.read_text())
    return SyntheticSample(
        root=root,
        slide=root / meta["slide"],
        outs=root / meta["outs"],
        truth=root / meta["truth"],
        mpp=float(meta["mpp"]),
        genes=tuple(g["name"] for g in meta["genes"]),
        bin_sizes_um=tuple(float(b) for b in meta["bin_sizes_um"]),
        seed=int(meta["seed"]),
    )


def truth_density(
    sample_or_root: SyntheticSample | str | Path,
    *,
    bbox_yx: Sequence[float] | None = None,
    genes: Sequence[str] | None = None,
    grid_um: float = 2.0,
) -> np.ndarray:
    """Expected counts (reference depth) per grid cell, integrated exactly over each cell.

    Parameters
    ----------
    sample_or_root : SyntheticSample or path
        The sample.
    bbox_yx : (y0, x0, y1, x1), optional
        Region in level-0 pixels of the slide; default the whole slide.
    genes : sequence of str, optional
        Genes to return (default all, in sample order).
    grid_um : float
        Side of the output cells in µm (normally a multiple of 2 µm). Cells start at the bbox's
        top-left corner; a last partial row or column covers only the part inside the bbox.

    Returns
    -------
    numpy.ndarray
        float32, shape (C, H, W): the requested genes and a last channel "total" = the sum over
        all genes of the sample. Values are expected UMI counts (not per µm²), additive over
        cells. Multiply by the sample's ``depth`` to compare with its counts.
    """
    import zarr

    sample = (
        sample_or_root
        if isinstance(sample_or_root, SyntheticSample)
        else load_synthetic(sample_or_root)
    )
    group = zarr.open_group(sample.truth, mode="r")
    profiles = np.asarray(group["profiles"][:], dtype=np.float64)
    matrix = np.vstack([profiles[_gene_index(sample, genes)], profiles.sum(axis=0)])
    box_um = _bbox_um(sample, group, bbox_yx)
    if not grid_um > 0:
        msg = f"grid_um must be > 0 µm, got {grid_um}"
        raise StmapInputError(msg)
    wy = _overlap_matrix(box_um[0], box_um[2], grid_um, group["tissue"].shape[0])
    wx = _overlap_matrix(box_um[1], box_um[3], grid_um, group["tissue"].shape[1])
    return _integrate(group, matrix.astype(np.float32), wy, wx)


# ----------------------------------------------------------------------------------------------
# Argument checks, world, progress
# ----------------------------------------------------------------------------------------------


def _check_args(
    root: Path,
    size_um: Sequence[float],
    mpp: float,
    n_genes: int,
    bin_sizes_um: Sequence[float],
    depth: float,
    tile_px: int,
    overwrite: bool,
) -> tuple[int, ...]:
    """Validate write_synthetic's arguments; return the bin sizes as sorted integers (µm)."""
    checks = [
        (
            len(size_um) == 2 and min(size_um) >= 16,
            f"size_um must be (width, height) ≥ 16 µm, got {size_um}",
        ),
        (0.05 <= mpp <= 20, f"mpp must be in [0.05, 20] µm/px, got {mpp}"),
        (n_genes >= 8, f"n_genes must be ≥ 8, got {n_genes}"),
        (depth > 0, f"depth must be > 0, got {depth}"),
        (
            tile_px >= _SLIDE_TILE and tile_px % _SLIDE_TILE == 0,
            f"tile_px must be a multiple of 512, got {tile_px}",
        ),
        (len(bin_sizes_um) >= 1, "bin_sizes_um must name at least one size, e.g. 2 8 16"),
    ]
    for ok, msg in checks:
        if not ok:
            raise StmapInputError(msg)
    sizes = sorted({int(round(b)) for b in bin_sizes_um})
    bad = [b for b in bin_sizes_um if abs(b - round(b)) > 1e-9 or round(b) <= 0 or round(b) % 2]
    if bad or any(b % sizes[0] for b in sizes) or sizes[-1] > min(size_um):
        msg = f"bin_sizes_um {tuple(bin_sizes_um)} must be even µm, multiples of the smallest and ≤ the slide, e.g. 2 8 16"
        raise StmapInputError(msg)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            msg = f"{root} exists and is not empty; choose another folder or pass --overwrite (overwrite=True)"
            raise StmapInputError(msg)
        _clear_sample(root)
    return tuple(sizes)


def _clear_sample(root: Path) -> None:
    """Remove the files a previous write_synthetic left in ``root`` (and nothing else)."""
    if not root.is_dir():
        msg = f"{root} is a file, not a folder; choose another output path"
        raise StmapInputError(msg)
    for name in ("he.ome.tif", "synthetic.json"):
        (root / name).unlink(missing_ok=True)
    for name in ("outs", "truth.zarr", ".pyramid.tmp.zarr"):
        if (root / name).exists():
            shutil.rmtree(root / name)


class _Progress:
    """Counts steps and forwards ``(done, total)`` to the user's callback."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)


@dataclass(frozen=True)
class _World:
    """Everything the tissue is a function of: seed, slide geometry, region thresholds."""

    seed: int
    mpp: float
    height_px: int
    width_px: int
    thresholds: tuple[float, float, float, float]  # adipose, tumour, duct, immune (raw units)

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp

    @property
    def truth_shape(self) -> tuple[int, int]:
        return (
            math.ceil(self.height_um / TRUTH_GRID_UM - 1e-9),
            math.ceil(self.width_um / TRUTH_GRID_UM - 1e-9),
        )


def _make_world(seed: int, mpp: float, size_um: Sequence[float]) -> _World:
    """Slide geometry and the region thresholds that give each region its target area."""
    width_px, height_px = (max(1, round(s / mpp)) for s in size_um)
    provisional = _World(int(seed), float(mpp), height_px, width_px, (0.0, 0.0, 0.0, 0.0))
    step = max(_NODE_UM, max(provisional.height_um, provisional.width_um) / 256)
    ys = np.arange(step / 2, provisional.height_um, step)
    xs = np.arange(step / 2, provisional.width_um, step)
    yy, xx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    raw = _raw_fields(provisional, yy, xx, ("tissue", "adipose", "tumour", "duct", "immune"))
    inside = _tissue_value(provisional, raw["tissue"], yy, xx) > 0
    if inside.sum() < 16:
        inside = np.ones_like(inside)
    free, thresholds = inside.copy(), []
    for name, target in zip(("adipose", "tumour", "duct", "immune"), _REGION_TARGETS, strict=True):
        z = raw[name]
        share = min(1.0, target * inside.sum() / max(free.sum(), 1))
        thresholds.append(float(np.quantile(z[free], 1 - share)))
        free &= z <= thresholds[-1]
    return _World(int(seed), float(mpp), height_px, width_px, tuple(thresholds))


# Share of the tissue area per region, assigned in this order (the rest is stroma).
_REGION_TARGETS = (0.09, 0.30, 0.10, 0.08)


def _count_steps(
    world: _World, sizes: Sequence[int], capture: Sequence[float], n_genes: int, tile_px: int
) -> int:
    """Number of progress steps: truth chunks, bin bands, slide blocks, pyramid levels, images."""
    th, tw = world.truth_shape
    truth = math.ceil(th / _TRUTH_CHUNK) * math.ceil(tw / _TRUTH_CHUNK)
    bands = math.ceil((capture[2] - capture[0]) / _band_um(sizes, n_genes, capture))
    blocks = math.ceil(world.height_px / tile_px) * math.ceil(world.width_px / tile_px)
    return truth + bands + blocks + len(_level_shapes(world)) + 1


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers and value noise
# ----------------------------------------------------------------------------------------------

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 in, uint64 out; wraps on overflow)."""
    h = h ^ (h >> np.uint64(30))
    h = h * _K2
    h = h ^ (h >> np.uint64(27))
    h = h * _K3
    return h ^ (h >> np.uint64(31))


def _hash_bits(seed: int, stream: int, *keys: Any) -> np.ndarray:
    """64 random bits per element of the broadcast integer ``keys``; pure function of its inputs."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    with np.errstate(over="ignore"):
        start = _mix(
            np.array((seed & 0xFFFFFFFF) * 0x100000001 + stream * 0x9E3779B1, dtype=np.uint64)
        )
        h = np.full(arrays[0].shape, start, dtype=np.uint64)
        for k in arrays:
            h = _mix(h ^ (k.astype(np.uint64) * _K1))
    return h


def _hash_u01(seed: int, stream: int, *keys: Any) -> np.ndarray:
    """Uniform float64 in [0, 1) per element of the broadcast integer ``keys``."""
    return (_hash_bits(seed, stream, *keys) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _smoothstep01(t: np.ndarray) -> np.ndarray:
    """Hermite smoothstep of ``t`` clipped to [0, 1] (polynomial only: bitwise reproducible)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _value_noise(
    seed: int, stream: int, y: np.ndarray, x: np.ndarray, scale_y: float, scale_x: float
) -> np.ndarray:
    """Value noise in [-1, 1]: hashed lattice values at (scale_y, scale_x) µm, smooth interpolation.

    Lattice values are hashed once per lattice point (a small table) and gathered per point;
    the result is a pure function of the point's coordinates.
    """
    offset = 0.6180339887 * (stream % 97)
    ty, tx = y / scale_y + offset, x / scale_x + 2 * offset
    iy, ix = np.floor(ty), np.floor(tx)
    sy, sx = _smoothstep01(ty - iy), _smoothstep01(tx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    span_y, span_x = int(iy.max()) - y0 + 2, int(ix.max()) - x0 + 2
    if span_y * span_x <= np.broadcast(iy, ix).size:  # hash a lattice table, then gather
        table = _hash_u01(
            seed, stream, np.arange(y0, y0 + span_y)[:, None], np.arange(x0, x0 + span_x)[None, :]
        )
        table = table * 2.0 - 1.0
        ry, rx = np.broadcast_arrays(iy - y0, ix - x0)

        def corner(dy: int, dx: int) -> np.ndarray:
            return table[ry + dy, rx + dx]
    else:

        def corner(dy: int, dx: int) -> np.ndarray:
            return _hash_u01(seed, stream, iy + dy, ix + dx) * 2.0 - 1.0

    top = corner(0, 0) + (corner(0, 1) - corner(0, 0)) * sx
    bottom = corner(1, 0) + (corner(1, 1) - corner(1, 0)) * sx
    return top + (bottom - top) * sy


_RAW_SPECS: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {
    "tissue": (10, (0.0, 160.0, 55.0), (0.6, 0.28, 0.12)),  # scale 0: a quarter of the slide
    "tumour": (11, (230.0, 85.0), (0.75, 0.25)),
    "immune": (12, (120.0, 45.0), (0.7, 0.3)),
    "duct": (13, (280.0, 110.0), (0.7, 0.3)),
    "adipose": (14, (380.0, 140.0), (0.75, 0.25)),
    "ecm": (15, (420.0, 160.0), (0.7, 0.3)),
    "hypoxia": (16, (300.0, 110.0), (0.7, 0.3)),
    "orient0": (17, (220.0, 90.0), (0.7, 0.3)),
    "orient1": (18, (220.0, 90.0), (0.7, 0.3)),
    "orient2": (19, (220.0, 90.0), (0.7, 0.3)),
    "warp": (20, (45.0,), (1.0,)),
    "illum": (21, (900.0, 300.0), (0.7, 0.3)),
    "noise1": (22, (36.0, 14.0), (0.7, 0.3)),
    "noise2": (23, (36.0, 14.0), (0.7, 0.3)),
    "noise3": (24, (36.0, 14.0), (0.7, 0.3)),
}


def _raw_fields(
    world: _World, y: np.ndarray, x: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Multi-octave value noise of each named field at points (µm), float64, roughly in [-1, 1]."""
    out = {}
    for name in names:
        stream, scales, weights = _RAW_SPECS[name]
        total = np.zeros(np.broadcast_shapes(np.shape(y), np.shape(x)))
        for octave, (scale, weight) in enumerate(zip(scales, weights, strict=True)):
            scale = scale or 0.25 * min(world.height_um, world.width_um)
            total = total + weight * _value_noise(
                world.seed, stream * 8 + octave, y, x, scale, scale
            )
        out[name] = total / sum(weights)
    return out


# ----------------------------------------------------------------------------------------------
# Fields on the global node grid, interpolated bitwise-reproducibly
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Nodes:
    """Raw fields at the global 8 µm nodes ``(iy0 + i, ix0 + j) · 8 µm`` covering a region."""

    iy0: int
    ix0: int
    values: dict[str, np.ndarray]  # name -> (ny, nx) float64


def _nodes(
    world: _World, y0: float, x0: float, y1: float, x1: float, names: Sequence[str]
) -> _Nodes:
    """Evaluate raw fields at the nodes covering the µm box (y0, x0)-(y1, x1) plus one node."""
    iy0, ix0 = math.floor(y0 / _NODE_UM) - 1, math.floor(x0 / _NODE_UM) - 1
    iy1, ix1 = math.floor(y1 / _NODE_UM) + 2, math.floor(x1 / _NODE_UM) + 2
    ny = (np.arange(iy0, iy1 + 1) * _NODE_UM)[:, None]
    nx = (np.arange(ix0, ix1 + 1) * _NODE_UM)[None, :]
    return _Nodes(iy0, ix0, _raw_fields(world, ny, nx, names))


def _node_weights(coords: np.ndarray, origin: int) -> tuple[np.ndarray, np.ndarray]:
    """Node index (relative to ``origin``) left of each µm coordinate, and the fraction past it."""
    t = coords / _NODE_UM
    i = np.floor(t)
    return (i.astype(np.int64) - origin), (t - i)


def _interp_grid(
    nodes: _Nodes, ys: np.ndarray, xs: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Bilinear interpolation of node fields on the grid ``ys × xs`` (µm) -> (h, w) float32.

    The fractions come from the global coordinates, so a pixel gets the same bits whatever the
    region it is computed in.
    """
    iy, fy = _node_weights(ys, nodes.iy0)
    ix, fx = _node_weights(xs, nodes.ix0)
    fy, fx = fy.astype(np.float32)[:, None], fx.astype(np.float32)
    out = {}
    for name in names:
        v = nodes.values[name].astype(np.float32)
        along_x = v[:, ix] * (1 - fx) + v[:, ix + 1] * fx
        out[name] = along_x[iy] * (1 - fy) + along_x[iy + 1] * fy
    return out


def _interp_points(
    nodes: _Nodes, y: np.ndarray, x: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Bilinear interpolation of node fields at scattered points (µm) -> (n,) float64."""
    iy, fy = _node_weights(y, nodes.iy0)
    ix, fx = _node_weights(x, nodes.ix0)
    out = {}
    for name in names:
        v = nodes.values[name]
        top = v[iy, ix] * (1 - fx) + v[iy, ix + 1] * fx
        bottom = v[iy + 1, ix] * (1 - fx) + v[iy + 1, ix + 1] * fx
        out[name] = top * (1 - fy) + bottom * fy
    return out


def _tissue_value(
    world: _World, raw_tissue: np.ndarray, y: np.ndarray, x: np.ndarray
) -> np.ndarray:
    """Tissue where > 0: an irregular blob, centred, covering about 60 % of the slide."""
    ry, rx = 0.47 * world.height_um, 0.47 * world.width_um
    dy = (y - 0.5 * world.height_um) / ry
    dx = (x - 0.5 * world.width_um) / rx
    return 0.62 * raw_tissue + 0.78 - (dy * dy + dx * dx)


def _regions(world: _World, raw: dict[str, np.ndarray]) -> np.ndarray:
    """Region probabilities (stroma, tumour, immune, duct, adipose) from raw fields -> (5, ...)."""
    width = 0.05  # half-width of a region boundary in raw units (about 10 µm)
    steps = [
        _smoothstep01(0.5 + (raw[name] - thr) / (2 * width))
        for name, thr in zip(("adipose", "tumour", "duct", "immune"), world.thresholds, strict=True)
    ]
    adipose = steps[0]
    rest = 1 - adipose
    tumour = rest * steps[1]
    rest = rest * (1 - steps[1])
    duct = rest * steps[2]
    rest = rest * (1 - steps[2])
    immune = rest * steps[3]
    return np.stack([rest * (1 - steps[3]), tumour, immune, duct, adipose])


_STROMA, _R_TUM, _R_IMM, _R_DUCT, _R_ADI = range(5)


def _ecm(world: _World, raw_ecm: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Stroma maturity in [0, 1]: a left-to-right gradient plus a smooth field (visible as eosin
    tone, collagen fibre density and fibroblast density; drives the smooth ECM genes)."""
    gradient = x / world.width_um - 0.5
    return np.clip(0.5 + 0.55 * gradient + 0.9 * raw_ecm, 0.0, 1.0)


def _hypoxia(raw_hyp: np.ndarray) -> np.ndarray:
    """Tumour hypoxia in [0, 1] (visible as more eosinophilic tumour cytoplasm)."""
    return _smoothstep01(0.5 + 1.6 * raw_hyp)


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------

# Per lattice cell type: stream, lattice spacing (µm), jitter (fraction of spacing),
# acceptance per region (stroma, tumour, immune, duct, adipose).
_LATTICES = {
    _TUM: (101, 10.5, 0.3, (0.0, 0.95, 0.0, 0.0, 0.0)),
    _LYM: (102, 6.4, 0.3, (0.045, 0.06, 0.85, 0.05, 0.01)),
    _FIB: (103, 12.0, 0.35, (-1.0, 0.03, 0.08, 0.22, 0.02)),  # -1: ECM-dependent
}
# Per type: nucleus semi-major axis range (µm), aspect (minor/major) range, haematoxylin OD
# range, body/nucleus scale along major and minor axes, vesicular chromatin (0/1).
_NUCLEI = {
    _TUM: ((4.0, 6.4), (0.62, 0.95), (0.55, 0.78), (1.8, 1.95), 1.0),
    _LYM: ((2.3, 2.9), (0.85, 1.0), (1.05, 1.3), (1.3, 1.3), 0.0),
    _FIB: ((5.5, 8.5), (0.2, 0.3), (0.75, 0.95), (1.25, 2.4), 0.0),
    _EPI: ((3.3, 4.1), (0.68, 0.85), (0.62, 0.8), (1.0, 1.0), 0.3),
}
_EXCLUDE_UM = {_LYM: 5.0, _FIB: 6.5}  # no such cell this close to a tumour/lymphocyte centre
_FIBRE_ANGLES = (0.35, 1.4, 2.45)  # radians; fibre families blended by the orient fields
_ADIPOCYTE_UM = 46.0


@dataclass(frozen=True)
class _Cells:
    """Cells (and ducts, adipocyte seeds) near a region, in a fixed global order."""

    y: np.ndarray  # centre, µm
    x: np.ndarray
    kind: np.ndarray  # cell type index
    na: np.ndarray  # nucleus semi-axes, µm
    nb: np.ndarray
    theta: np.ndarray  # major-axis angle, radians, measured from +y towards +x
    ba: np.ndarray  # body semi-axes, µm
    bb: np.ndarray
    od: np.ndarray  # nuclear haematoxylin OD
    ves: np.ndarray  # vesicular chromatin 0..1
    shape: np.ndarray  # (n, 4): harmonic amplitudes/phases of nucleus outline
    ducts: np.ndarray  # (m, 3): y, x, lumen radius (µm)
    fat: np.ndarray  # (k, 2): adipocyte seeds y, x (µm)


def _lattice(world: _World, stream: int, spacing: float, jitter: float, box: Sequence[float]):
    """Jittered lattice points in the µm box and 6 uniforms each (pure function of the index)."""
    i = np.arange(math.floor(box[0] / spacing) - 1, math.ceil(box[2] / spacing) + 1)
    j = np.arange(math.floor(box[1] / spacing) - 1, math.ceil(box[3] / spacing) + 1)
    ii, jj = (a.ravel() for a in np.meshgrid(i, j, indexing="ij"))
    u = _hash_u01(world.seed, stream, ii[None], jj[None], np.arange(8)[:, None])
    y = (ii + 0.5 + jitter * (2 * u[0] - 1)) * spacing
    x = (jj + 0.5 + jitter * (2 * u[1] - 1)) * spacing
    keep = (y >= box[0]) & (y < box[2]) & (x >= box[1]) & (x < box[3])
    return y[keep], x[keep], u[2:, keep]


def _point_fields(
    world: _World, y: np.ndarray, x: np.ndarray, nodes: _Nodes
) -> dict[str, np.ndarray]:
    """Tissue, regions, ECM and dominant fibre angle at scattered points (µm)."""
    raw = _interp_points(nodes, y, x, _POINT_NAMES)
    orient = np.stack([raw[f"orient{k}"] for k in range(3)])
    return {
        "tissue": _tissue_value(world, raw["tissue"], y, x) > 0,
        "regions": _regions(world, raw),
        "ecm": _ecm(world, raw["ecm"], x),
        "angle": np.asarray(_FIBRE_ANGLES)[np.argmax(orient, axis=0)],
    }


def _ducts(world: _World, box: Sequence[float], nodes: _Nodes) -> np.ndarray:
    """Ducts (y, x, lumen radius µm) whose centres lie in the µm box, in duct regions."""
    y, x, u = _lattice(world, 104, 80.0, 0.15, box)
    f = _point_fields(world, y, x, nodes)
    keep = f["tissue"] & (f["regions"][_R_DUCT] > 0.5) & (u[0] < 0.85)
    radius = 7.0 + 11.0 * u[1]
    return np.stack([y[keep], x[keep], radius[keep]], axis=1)


_DUCT_WALL_UM = 11.5  # luminal cells + myoepithelial layer around a lumen
# Duct rings: stream, radius past the lumen (µm), pitch along the ring (µm), nucleus spec
# (semi-major range, aspect range, OD range, vesicular), body (along, across) in µm or None,
# nucleus orientation relative to the radial direction (radians).
_RINGS = (
    (105, 4.2, 7.2, ((3.3, 4.1), (0.68, 0.85), (0.62, 0.8), 0.3), None, 0.0),
    (108, 9.6, 11.0, ((3.0, 3.6), (0.3, 0.4), (0.8, 0.95), 0.0), (3.9, 1.9), 0.5 * math.pi),
)


def _duct_cells(world: _World, ducts: np.ndarray) -> dict[str, np.ndarray]:
    """Epithelial cells of each duct: luminal cells (cuboidal, pink cytoplasm) in a ring around
    the lumen, and flat myoepithelial cells outside them."""
    parts = [_ring_cells(world, ducts, ring) for ring in _RINGS]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _ring_cells(world: _World, ducts: np.ndarray, ring_spec: tuple) -> dict[str, np.ndarray]:
    """One ring of epithelial cells around each duct lumen (see ``_RINGS``)."""
    stream, offset, pitch, nucleus, body, turn = ring_spec
    ring = ducts[:, 2] + offset
    count = np.maximum(6, np.round(2 * np.pi * ring / pitch)).astype(np.int64)
    duct_id = np.repeat(np.arange(len(ducts)), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    key_y = np.round(ducts[duct_id, 0] * 64).astype(np.int64)  # duct identity, not duct order
    key_x = np.round(ducts[duct_id, 1] * 64).astype(np.int64)
    u = _hash_u01(world.seed, stream, key_y[None], key_x[None], k[None], np.arange(6)[:, None])
    phase = _hash_u01(world.seed, stream + 100, key_y, key_x)
    angle = 2 * np.pi * ((k + 0.25 * (u[0] - 0.5)) / np.maximum(count[duct_id], 1) + phase)
    radius = ring[duct_id] + 0.8 * (u[1] - 0.5)
    cells = _nucleus_attributes(_EPI, u[2:], len(k), nucleus)
    cells["y"] = ducts[duct_id, 0] + radius * np.array([math.cos(a) for a in angle])
    cells["x"] = ducts[duct_id, 1] + radius * np.array([math.sin(a) for a in angle])
    cells["theta"] = angle + turn
    along = np.pi * ring[duct_id] / np.maximum(count[duct_id], 1) + 0.6
    cells["ba"] = np.full(len(k), 4.4) if body is None else np.full(len(k), body[0])
    cells["bb"] = along if body is None else np.full(len(k), body[1])
    return cells


def _nucleus_attributes(
    kind: int, u: np.ndarray, n: int, spec: tuple | None = None
) -> dict[str, np.ndarray]:
    """Nucleus size, shape, OD and body size from 4 uniforms per cell (rows of ``u``)."""
    (a_lo, a_hi), (r_lo, r_hi), (h_lo, h_hi), ves = spec or _NUCLEI[kind][:3] + _NUCLEI[kind][4:]
    sa, sb = _NUCLEI[kind][3]
    na = a_lo + (a_hi - a_lo) * u[0]
    nb = na * (r_lo + (r_hi - r_lo) * u[1])
    pleo = 0.14 if kind == _TUM else 0.04
    shape = np.stack([pleo * u[2], 2 * np.pi * u[3], 0.6 * pleo * u[1], 2 * np.pi * u[0]], axis=1)
    return {
        "kind": np.full(n, kind, dtype=np.int8),
        "na": na,
        "nb": nb,
        "od": h_lo + (h_hi - h_lo) * u[2],
        "ves": np.full(n, ves),
        "shape": shape,
        "ba": na * sa,
        "bb": nb * sb,
    }


def _excluded(y: np.ndarray, x: np.ndarray, taken: tuple) -> np.ndarray:
    """True for points closer to any taken centre (cy, cx) than its reach (µm, scalar or per centre)."""
    from scipy.spatial import cKDTree

    cy, cx, reach = taken
    if not len(cy) or not len(y):
        return np.zeros(len(y), dtype=bool)
    reach = np.broadcast_to(np.asarray(reach, dtype=np.float64), cy.shape)
    k = min(4, len(cy))
    dist, idx = cKDTree(np.stack([cy, cx], axis=1)).query(np.stack([y, x], axis=1), k=k)
    dist, idx = dist.reshape(len(y), k), idx.reshape(len(y), k)
    return (dist < reach[np.minimum(idx, len(cy) - 1)]).any(axis=1)


def _lattice_cells(
    world: _World, kind: int, box: Sequence[float], nodes: _Nodes, taken: list
) -> dict:
    """Cells of one lattice type in the µm box, thinned by region, tissue and exclusion."""
    stream, spacing, jitter, accept = _LATTICES[kind]
    y, x, u = _lattice(world, stream, spacing, jitter, box)
    f = _point_fields(world, y, x, nodes)
    rates = np.asarray(accept, dtype=np.float64)[:, None] * np.ones_like(y)
    if accept[_STROMA] < 0:  # fibroblast density follows the ECM field
        rates[_STROMA] = 0.1 + 0.42 * f["ecm"]
    keep = f["tissue"] & (u[0] < (rates * f["regions"]).sum(axis=0))
    for other in taken:
        keep &= ~_excluded(y, x, other)
    cells = _nucleus_attributes(kind, u[1:5, keep], int(keep.sum()))
    cells.update(y=y[keep], x=x[keep], theta=2 * np.pi * u[5, keep])
    if kind == _FIB:  # spindles follow the collagen fibres
        cells["theta"] = f["angle"][keep] + 0.3 * (u[5, keep] - 0.5)
    return cells


def _cells_near(world: _World, box: Sequence[float], reach_um: float) -> _Cells:
    """All cells whose centre lies within ``reach_um`` of the µm box (y0, x0, y1, x1).

    Cells are generated over a wider margin so that exclusion between types is the same for
    every box; the order is global (type, then lattice index), whatever the box.
    """
    m = _MARGIN_UM
    big = (box[0] - m, box[1] - m, box[2] + m, box[3] + m)
    nodes = _nodes(world, *big, names=_POINT_NAMES)
    ducts = _ducts(world, big, nodes)
    near_duct = ducts[:, 0], ducts[:, 1], ducts[:, 2] + _DUCT_WALL_UM
    tum = _lattice_cells(world, _TUM, big, nodes, [(*near_duct[:2], near_duct[2] + 3)])
    lym_taken = [(*near_duct[:2], near_duct[2] + 2), (tum["y"], tum["x"], _EXCLUDE_UM[_LYM])]
    lym = _lattice_cells(world, _LYM, big, nodes, lym_taken)
    fib_taken = [(*near_duct[:2], near_duct[2] + 4)]
    fib_taken += [(c["y"], c["x"], _EXCLUDE_UM[_FIB]) for c in (tum, lym)]
    parts = [
        _duct_cells(world, ducts),
        tum,
        lym,
        _lattice_cells(world, _FIB, big, nodes, fib_taken),
    ]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    y, x = merged["y"], merged["x"]
    near = (y > box[0] - reach_um) & (y < box[2] + reach_um)
    near &= (x > box[1] - reach_um) & (x < box[3] + reach_um)
    fat_y, fat_x, _ = _lattice(world, 107, _ADIPOCYTE_UM, 0.38, big)
    fat = np.stack([fat_y, fat_x], axis=1)
    return _Cells(**{k: v[near] for k, v in merged.items()}, ducts=ducts, fat=fat)


_POINT_NAMES = (
    "tissue",
    "adipose",
    "tumour",
    "duct",
    "immune",
    "ecm",
    "orient0",
    "orient1",
    "orient2",
)


# ----------------------------------------------------------------------------------------------
# Rasterisation (shared by the slide and the truth)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A block of a global pixel grid: pixel (r, c) has its centre at ((gy0+r+½)·s, (gx0+c+½)·s) µm."""

    gy0: int
    gx0: int
    h: int
    w: int
    spacing: float

    @property
    def ys(self) -> np.ndarray:
        return (np.arange(self.h) + self.gy0 + 0.5) * self.spacing

    @property
    def xs(self) -> np.ndarray:
        return (np.arange(self.w) + self.gx0 + 0.5) * self.spacing

    @property
    def box(self) -> tuple[float, float, float, float]:
        s = self.spacing
        return (self.gy0 * s, self.gx0 * s, (self.gy0 + self.h) * s, (self.gx0 + self.w) * s)

    def window(self, cy: float, cx: float, reach: float):
        """Pixels whose centre is within ``reach`` µm (box) of (cy, cx): slices + offsets (µm)."""
        s = self.spacing
        r0 = max(0, math.ceil((cy - reach) / s - 0.5) - self.gy0)
        r1 = min(self.h, math.floor((cy + reach) / s - 0.5) + 1 - self.gy0)
        c0 = max(0, math.ceil((cx - reach) / s - 0.5) - self.gx0)
        c1 = min(self.w, math.floor((cx + reach) / s - 0.5) + 1 - self.gx0)
        if r0 >= r1 or c0 >= c1:
            return None
        dy = ((np.arange(r0, r1) + self.gy0 + 0.5) * s - cy)[:, None]
        dx = ((np.arange(c0, c1) + self.gx0 + 0.5) * s - cx)[None, :]
        return (slice(r0, r1), slice(c0, c1)), dy, dx


def _splat(
    grid: _Grid, cells: _Cells, index: np.ndarray, reach_um: float
) -> tuple[np.ndarray, ...]:
    """Pixels within ``reach_um`` (box) of the given cells, in the cells' own frames.

    Returns flat pixel indices into the (h, w) grid, the cell of each pixel (position in
    ``index``) and the pixel's offsets (u along the major axis, v across, µm, float32).
    """
    s = grid.spacing
    half = math.ceil(reach_um / s) + 1
    offsets = np.arange(-half, half + 1)
    rows = np.floor(cells.y[index] / s).astype(np.int64)[:, None] + offsets
    cols = np.floor(cells.x[index] / s).astype(np.int64)[:, None] + offsets
    dy = ((rows + 0.5) * s - cells.y[index, None]).astype(np.float32)[:, :, None]
    dx = ((cols + 0.5) * s - cells.x[index, None]).astype(np.float32)[:, None, :]
    ok_r = (rows >= grid.gy0) & (rows < grid.gy0 + grid.h) & (np.abs(dy[:, :, 0]) <= reach_um)
    ok_c = (cols >= grid.gx0) & (cols < grid.gx0 + grid.w) & (np.abs(dx[:, 0, :]) <= reach_um)
    keep = ok_r[:, :, None] & ok_c[:, None, :]
    flat = ((rows - grid.gy0) * grid.w)[:, :, None] + (cols - grid.gx0)[:, None, :]
    ct = np.array([math.cos(t) for t in cells.theta[index]], dtype=np.float32)[:, None, None]
    st = np.array([math.sin(t) for t in cells.theta[index]], dtype=np.float32)[:, None, None]
    u, v = dy * ct + dx * st, dx * ct - dy * st
    owner = np.broadcast_to(np.arange(len(index))[:, None, None], keep.shape)
    return flat[keep], owner[keep], u[keep], v[keep]


def _stamp_bodies(
    grid: _Grid, cells: _Cells, label: np.ndarray, nuclei: tuple | None = None
) -> None:
    """Label each pixel with the type of the cell body it is deepest in (normalised distance).

    With ``nuclei = (od, mask)`` also draw nuclei (max-composited). Both are order-independent.
    """
    best = np.ones(label.size, dtype=np.float32)
    pending = []
    for kind, index in _batches(grid, cells):
        reach = float(max(cells.ba[index].max(), cells.bb[index].max()))
        flat, owner, u, v = _splat(grid, cells, index, reach)
        ba, bb = cells.ba[index].astype(np.float32), cells.bb[index].astype(np.float32)
        rho = (u / ba[owner]) ** 2 + (v / bb[owner]) ** 2
        inside = rho < 1
        flat, owner, rho, u, v = flat[inside], owner[inside], rho[inside], u[inside], v[inside]
        np.minimum.at(best, flat, rho)
        if nuclei is not None:
            _stamp_nuclei(cells, index, flat, owner, u, v, nuclei)
        pending.append((flat, rho, kind))
    flat_label = label.reshape(-1)
    for flat, rho, kind in pending:
        flat_label[flat[rho == best[flat]]] = kind


def _batches(grid: _Grid, cells: _Cells, budget: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """(type, cell indices) in batches whose splat windows hold about ``budget`` pixels."""
    for kind in np.unique(cells.kind):
        index = np.nonzero(cells.kind == kind)[0]
        reach = float(max(cells.ba[index].max(), cells.bb[index].max()))
        window = (2 * math.ceil(reach / grid.spacing) + 3) ** 2
        step = max(1, budget // window)
        for start in range(0, len(index), step):
            yield int(kind), index[start : start + step]


def _stamp_nuclei(cells: _Cells, index: np.ndarray, flat, owner, u, v, nuclei: tuple) -> None:
    """Nuclei: irregular ellipses with a soft edge, vesicular rim and nucleolus (tumour)."""
    na, nb = cells.na[index].astype(np.float32)[owner], cells.nb[index].astype(np.float32)[owner]
    a2, a3 = (cells.shape[index, k].astype(np.float32)[owner] for k in (0, 2))
    radius = np.sqrt(u * u + v * v) + np.float32(1e-6)
    cu, su = u / radius, v / radius
    c2, s2 = _cos_sin(cells.shape[index, 1], owner)
    c3, s3 = _cos_sin(cells.shape[index, 3], owner)
    bump = 1 + a2 * ((cu * cu - su * su) * c2 + 2 * cu * su * s2)
    bump = bump + a3 * (cu * (4 * cu * cu - 3) * c3 + su * (3 - 4 * su * su) * s3)
    rn = np.sqrt((u / na) ** 2 + (v / nb) ** 2) / bump
    mask = np.clip((1 - rn) * nb / np.float32(0.45), 0.0, 1.0)
    ves = cells.ves[index].astype(np.float32)[owner]
    od = cells.od[index].astype(np.float32)[owner] * (1 - 0.5 * ves * (1 - rn * rn))
    d2 = ((u - 0.3 * na * c3) ** 2 + (v - 0.3 * nb * s3) ** 2) / np.float32(0.55)
    od = od + (ves > 0.5) * np.float32(0.55) * np.clip(1 - d2, 0.0, 1.0)
    np.maximum.at(nuclei[0].reshape(-1), flat, od * mask)
    np.maximum.at(nuclei[1].reshape(-1), flat, mask)


def _cos_sin(angles: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (float32) of per-cell angles, gathered per pixel (scalar math: reproducible)."""
    cos = np.array([math.cos(a) for a in angles], dtype=np.float32)
    sin = np.array([math.sin(a) for a in angles], dtype=np.float32)
    return cos[owner], sin[owner]


def _stamp_lumens(grid: _Grid, ducts: np.ndarray) -> np.ndarray:
    """Duct lumens: 1 inside the lumen disk, 0 outside, soft over 0.6 µm -> (h, w) float32."""
    lumen = np.zeros((grid.h, grid.w), dtype=np.float32)
    for cy, cx, radius in ducts:
        win = grid.window(float(cy), float(cx), float(radius) + 1.0)
        if win is None:
            continue
        sl, dy, dx = win
        inside = np.clip((radius - np.sqrt(dy * dy + dx * dx)) / 0.6 + 0.5, 0.0, 1.0)
        np.maximum(lumen[sl], inside.astype(np.float32), out=lumen[sl])
    return lumen


def _fat_membranes(grid: _Grid, fat: np.ndarray, adipose: np.ndarray) -> np.ndarray:
    """Adipocyte membranes (Voronoi edges of the fat seeds) on adipose pixels -> (h, w) float32."""
    from scipy.spatial import cKDTree

    out = np.zeros((grid.h, grid.w), dtype=np.float32)
    rows, cols = np.nonzero(adipose)
    if len(rows) == 0 or len(fat) < 2:
        return out
    points = np.stack([grid.ys[rows], grid.xs[cols]], axis=1)
    dist, _ = cKDTree(fat).query(points, k=2)
    out[rows, cols] = np.clip(1.0 - (dist[:, 1] - dist[:, 0]) / 1.8, 0.0, 1.0)
    return out


def _bilinear_upsample(fn: Callable, ys: np.ndarray, xs: np.ndarray, step: float) -> np.ndarray:
    """Evaluate ``fn(node_ys, node_xs)`` on global nodes ``k·step`` µm and interpolate on ys × xs."""
    ty, tx = ys / step, xs / step
    iy, ix = np.floor(ty), np.floor(tx)
    fy, fx = (ty - iy)[:, None], tx - ix
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    vals = fn(np.arange(iy[0], iy[-1] + 2) * step, np.arange(ix[0], ix[-1] + 2) * step)
    iy, ix = iy - iy[0], ix - ix[0]
    along_x = vals[:, ix] * (1 - fx) + vals[:, ix + 1] * fx
    return (along_x[iy] * (1 - fy) + along_x[iy + 1] * fy).astype(np.float32)


def _fibres(world: _World, grid: _Grid, nodes: _Nodes) -> np.ndarray:
    """Collagen fibre texture in [0, 1]: ridged anisotropic noise in three blended, wavy
    orientation families (computed on a 1 µm global grid, then interpolated)."""

    def fibre_nodes(yn: np.ndarray, xn: np.ndarray) -> np.ndarray:
        raw = _interp_grid(nodes, yn, xn, ("orient0", "orient1", "orient2", "warp"))
        yy, xx = yn[:, None], xn[None, :]
        total = weight_sum = 0.0
        for k, angle in enumerate(_FIBRE_ANGLES):
            c, s = math.cos(angle), math.sin(angle)
            along, across = yy * c + xx * s, xx * c - yy * s + 12.0 * raw["warp"]
            ridge = (1 - np.abs(_value_noise(world.seed, 300 + k, along, across, 30.0, 3.2))) ** 5
            weight = (raw[f"orient{k}"].astype(np.float64) + 1.3) ** 6
            total, weight_sum = total + weight * ridge, weight_sum + weight
        return total / weight_sum

    return _bilinear_upsample(fibre_nodes, grid.ys, grid.xs, min(1.0, 2 * world.mpp))


# ----------------------------------------------------------------------------------------------
# The slide: H&E colour model
# ----------------------------------------------------------------------------------------------

# Optical density per unit stain (R, G, B), Macenko reference vectors.
_H_VEC = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_VEC = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
_I0 = np.array([246.0, 244.0, 248.0], dtype=np.float32)
_LUT_STEPS = 4096
_POW10 = (10.0 ** (-(np.arange(4 * _LUT_STEPS) + 0.5) / _LUT_STEPS)).astype(np.float32)
# Cytoplasm (eosin OD, haematoxylin OD) per type; fibroblasts look like their stroma.
_CYTO = {_TUM: (0.17, 0.13), _LYM: (0.14, 0.12), _EPI: (0.30, 0.07)}
_PIXEL_NAMES = ("tissue", "adipose", "ecm", "hypoxia", "illum")
_NODE_NAMES = (*_PIXEL_NAMES, "orient0", "orient1", "orient2", "warp")


def _pow10_neg(od: np.ndarray) -> np.ndarray:
    """10 ** -od (od ≥ 0) via a lookup table: fast and bitwise reproducible."""
    return _POW10[(np.minimum(od, np.float32(3.999)) * np.float32(_LUT_STEPS)).astype(np.int32)]


def _render_rgb(world: _World, gy0: int, gx0: int, h: int, w: int) -> np.ndarray:
    """H&E RGB of level-0 pixels [gy0, gy0+h) × [gx0, gx0+w) -> (h, w, 3) uint8."""
    grid = _Grid(gy0, gx0, h, w, world.mpp)
    ys, xs = grid.ys, grid.xs
    nodes = _nodes(world, *grid.box, names=_NODE_NAMES)
    raw = _interp_grid(nodes, ys, xs, _PIXEL_NAMES)
    tissue = _tissue_value(world, raw["tissue"], ys[:, None], xs[None, :]).astype(np.float32)
    adipose = (raw["adipose"] > world.thresholds[0]) & (tissue > 0)
    cells = _cells_near(world, grid.box, reach_um=14.0)
    label = np.full((h, w), -1, dtype=np.int8)
    label[adipose] = _ADI
    nuclei = (np.zeros((h, w), np.float32), np.zeros((h, w), np.float32))
    _stamp_bodies(grid, cells, label, nuclei)
    layers = {
        "tissue": tissue,
        "label": label,
        "nuclei": nuclei,
        "lumen": _stamp_lumens(grid, cells.ducts),
        "membrane": _fat_membranes(grid, cells.fat, adipose & (label == _ADI)),
        "fibres": _fibres(world, grid, nodes),
    }
    return _compose(world, grid, raw, layers)


def _compose(world: _World, grid: _Grid, raw: dict, layers: dict) -> np.ndarray:
    """Stain densities -> RGB: stroma, fat, cytoplasm, lumens, nuclei, grain (uint8 (h, w, 3))."""
    tissue, label, fib = layers["tissue"], layers["label"], layers["fibres"]
    inside = (tissue > 0) * (0.55 + 0.45 * _smoothstep01(tissue / np.float32(0.06)))
    ecm = _ecm(world, raw["ecm"], grid.xs[None, :].astype(np.float32))
    eosin = inside * (0.13 + 0.30 * ecm) * (0.5 + 0.85 * fib)
    haem = inside * (0.03 + 0.05 * fib)
    fat = label == _ADI
    eosin[fat] = 0.012 + 0.45 * layers["membrane"][fat]
    haem[fat] = 0.006 + 0.07 * layers["membrane"][fat]
    for kind, (e_od, h_od) in _CYTO.items():
        cyto = label == kind
        eosin[cyto] = e_od + (0.2 * _hypoxia(raw["hypoxia"][cyto]) if kind == _TUM else 0.0)
        haem[cyto] = h_od
    lumen = layers["lumen"]
    eosin = eosin * (1 - lumen) + 0.025 * lumen
    haem = haem * (1 - lumen) + 0.008 * lumen
    rows, cols = np.arange(grid.h) + grid.gy0, np.arange(grid.w) + grid.gx0
    bits = _hash_bits(world.seed, 400, rows[:, None], cols[None, :])
    chromatin = 0.78 + 0.44 * ((bits & np.uint64(0xFFFF)).astype(np.float32) / 65536)
    nuc_od, nuc_mask = layers["nuclei"]
    haem = haem * (1 - nuc_mask) + nuc_od * chromatin
    eosin = eosin * (1 - 0.75 * nuc_mask)
    background = 0.028 + 0.012 * raw["illum"]
    rgb = np.empty((grid.h, grid.w, 3), dtype=np.uint8)
    for c in range(3):
        channel = _I0[c] * _pow10_neg(haem * _H_VEC[c] + eosin * _E_VEC[c] + background)
        grain = ((bits >> np.uint64(16 + 12 * c)) & np.uint64(0xFFF)).astype(
            np.float32
        ) * np.float32(5 / 4096)
        rgb[..., c] = np.clip(channel + grain - 2.0, 0, 255).astype(np.uint8)
    return rgb


# ----------------------------------------------------------------------------------------------
# Truth on the 2 µm grid
# ----------------------------------------------------------------------------------------------

_COMPONENTS = (
    *CELL_TYPES, "tissue", "ambient", "fibroblast*ecm", "tissue*ecm", "tumour*hypoxia",
    "load*noise1", "load*noise2", "load*noise3",
)  # fmt: skip
# Total expression of each cell type per µm² of cell body, of tissue, and everywhere (ambient),
# in UMI at the reference depth. "load" = the density of all non-noise genes together: noise
# genes are a fixed share of it times their noise field, so their normalised expression
# (gene / total) depends on the noise fields only and nothing in the image predicts it.
_TYPE_RATE = (2.0, 2.4, 1.2, 1.8, 0.15)
_TISSUE_RATE = 0.12
_AMBIENT_RATE = 0.01
_NOISE_SIGMA = 2.4  # log-scale amplitude of the noise fields (raw fields have sd ≈ 0.3)


def _truth_chunk(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> tuple[np.ndarray, ...]:
    """Abundance (5, ch, cw), tissue (ch, cw) and fields (F, ch, cw) of truth cells from (cy0, cx0).

    Cell bodies are rasterised at 0.5 µm (4 × 4 samples per 2 µm cell), so abundances are
    area fractions in multiples of 1/16.
    """
    grid = _Grid(cy0 * _SUB, cx0 * _SUB, ch * _SUB, cw * _SUB, TRUTH_GRID_UM / _SUB)
    names = ("tissue", "adipose")
    nodes = _nodes(world, *grid.box, names=names)
    raw = _interp_grid(nodes, grid.ys, grid.xs, names)
    tissue = _tissue_value(world, raw["tissue"], grid.ys[:, None], grid.xs[None, :]) > 0
    label = np.full((grid.h, grid.w), -1, dtype=np.int8)
    label[(raw["adipose"] > world.thresholds[0]) & tissue] = _ADI
    cells = _cells_near(world, grid.box, reach_um=14.0)
    _stamp_bodies(grid, cells, label)
    lumen = _stamp_lumens(grid, cells.ducts) > 0.5
    label[lumen] = -1
    tissue = (tissue | (label >= 0)) & ~lumen
    abundance = np.stack([_block_mean(label == k, _SUB) for k in range(len(CELL_TYPES))])
    fields = _truth_fields(world, cy0, cx0, ch, cw)
    return abundance.astype(np.float16), _block_mean(tissue, _SUB).astype(np.float16), fields


def _truth_block(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> tuple[np.ndarray, ...]:
    """:func:`_truth_chunk` computed in pieces of at most 128 × 128 truth cells (less memory)."""
    piece = _TRUTH_CHUNK // 2
    parts = [np.zeros((len(CELL_TYPES), ch, cw), np.float16), np.zeros((ch, cw), np.float16)]
    parts.append(np.zeros((len(_FIELD_NAMES), ch, cw), np.float16))
    for y in range(0, ch, piece):
        for x in range(0, cw, piece):
            ph, pw = min(piece, ch - y), min(piece, cw - x)
            for out, value in zip(
                parts, _truth_chunk(world, cy0 + y, cx0 + x, ph, pw), strict=True
            ):
                out[..., y : y + ph, x : x + pw] = value
    return tuple(parts)


def _truth_fields(world: _World, cy0: int, cx0: int, ch: int, cw: int) -> np.ndarray:
    """Smooth fields (ecm, hypoxia, noise1..3 as multiplicative factors) at truth cell centres."""
    ys = (np.arange(ch) + cy0 + 0.5) * TRUTH_GRID_UM
    xs = (np.arange(cw) + cx0 + 0.5) * TRUTH_GRID_UM
    names = ("ecm", "hypoxia", "noise1", "noise2", "noise3")
    raw = _interp_grid(_nodes(world, ys[0], xs[0], ys[-1], xs[-1], names), ys, xs, names)
    fields = [_ecm(world, raw["ecm"], xs[None, :]), _hypoxia(raw["hypoxia"])]
    s = _NOISE_SIGMA
    fields += [np.exp(s * raw[n].astype(np.float64) - 0.5 * (0.3 * s) ** 2) for n in names[2:]]
    return np.stack(fields).astype(np.float16)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k × k blocks of the last two axes (their sizes are multiples of k)."""
    h, w = a.shape[-2:]
    return a.reshape(*a.shape[:-2], h // k, k, w // k, k).mean(axis=(-3, -1), dtype=np.float32)


def _block_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over k × k blocks of the last two axes (their sizes are multiples of k)."""
    if k == 1:
        return a
    h, w = a.shape[-2:]
    return a.reshape(*a.shape[:-2], h // k, k, w // k, k).sum(axis=(-3, -1))


def _write_truth(
    world: _World, path: Path, genes: list[dict], profiles: np.ndarray, steps: _Progress
) -> None:
    """Write truth.zarr chunk by chunk (each chunk 512 µm × 512 µm)."""
    import zarr

    th, tw = world.truth_shape
    group = zarr.open_group(path, mode="w")
    c = _TRUTH_CHUNK
    nt, nf = len(CELL_TYPES), len(_FIELD_NAMES)
    abundance = group.create_array(
        "abundance", shape=(nt, th, tw), chunks=(nt, c, c), dtype="float16", fill_value=0
    )
    tissue = group.create_array(
        "tissue", shape=(th, tw), chunks=(c, c), dtype="float16", fill_value=0
    )
    fields = group.create_array(
        "fields", shape=(nf, th, tw), chunks=(nf, c, c), dtype="float16", fill_value=0
    )
    group.create_array("profiles", data=profiles.astype(np.float32), chunks=profiles.shape)
    group.attrs.update(_truth_attrs(world, genes, profiles))
    for cy0 in range(0, th, c):
        for cx0 in range(0, tw, c):
            ch, cw = min(c, th - cy0), min(c, tw - cx0)
            ab, ti, fi = _truth_block(world, cy0, cx0, ch, cw)
            abundance[:, cy0 : cy0 + ch, cx0 : cx0 + cw] = ab
            tissue[cy0 : cy0 + ch, cx0 : cx0 + cw] = ti
            fields[:, cy0 : cy0 + ch, cx0 : cx0 + cw] = fi
            steps.tick()


def _truth_attrs(world: _World, genes: list[dict], profiles: np.ndarray) -> dict:
    """Self-description of truth.zarr (units, axes, how genes are built from components)."""
    return {
        "grid_um": TRUTH_GRID_UM,
        "mpp": world.mpp,
        "shape_px": [world.height_px, world.width_px],
        "axes": "abundance (type, y, x); tissue (y, x); fields (field, y, x); profiles (gene, component)",
        "cell_types": list(CELL_TYPES),
        "field_names": list(_FIELD_NAMES),
        "genes": [g["name"] for g in genes],
        "components": list(_COMPONENTS),
        "load_weights": _load_weights(genes, profiles),
        "units": (
            "abundance/tissue: area fraction of each 2 µm cell; profiles: expected UMI per µm² at the "
            "reference depth; gene density = sum_k profiles[g, k] * component_k, where component "
            "'a*b' is map a times field b and 'load' = sum of load_weights times their maps"
        ),
    }


def _read_truth(group: Any, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, ...]:
    """Stored truth arrays (abundance, tissue, fields) of cells [r0, r1) × [c0, c1) of truth.zarr."""
    return (
        np.asarray(group["abundance"][:, r0:r1, c0:c1]),
        np.asarray(group["tissue"][r0:r1, c0:c1]),
        np.asarray(group["fields"][:, r0:r1, c0:c1]),
    )


def _components(
    attrs: Any, abundance: np.ndarray, tissue: np.ndarray, fields: np.ndarray
) -> np.ndarray:
    """Component maps (K, rows, cols) float32 from stored truth arrays (see ``_truth_attrs``)."""
    tissue = tissue.astype(np.float32)
    base = dict(zip(attrs["cell_types"], abundance.astype(np.float32), strict=True))
    base["tissue"], base["ambient"] = tissue, np.ones_like(tissue)
    field = dict(zip(attrs["field_names"], fields.astype(np.float32), strict=True))
    names = {c: k for k, c in enumerate(attrs["components"])}
    out = np.empty((len(names), *tissue.shape), dtype=np.float32)
    for loads in (False, True):  # "load" is a weighted sum of the other components
        for comp, k in names.items():
            left, _, right = comp.partition("*")
            if (left == "load") == loads:
                out[k] = base[left] * field[right] if right else base[left]
        if not loads:
            weights = attrs["load_weights"].items()
            base["load"] = sum(np.float32(w) * out[names[c]] for c, w in weights)
    return out


def _load_weights(genes: list[dict], profiles: np.ndarray) -> dict[str, float]:
    """Weights of the non-load components in "load": the column sums over non-noise genes."""
    keep = [g for g, gene in enumerate(genes) if gene["category"] != "noise"]
    sums = profiles[keep].sum(axis=0)
    return {c: float(sums[k]) for k, c in enumerate(_COMPONENTS) if not c.startswith("load")}


# ----------------------------------------------------------------------------------------------
# Genes
# ----------------------------------------------------------------------------------------------

_MARKERS = {
    "tumour": ("ERBB2", "GRB7", "STARD3", "PGAP3", "MKI67", "CCND1", "TOP2A", "MUC1"),
    "lymphocyte": ("CD3E", "PTPRC", "CD2", "MS4A1", "CD52", "CD79A", "CCL5", "CD8A"),
    "fibroblast": ("COL1A1", "COL1A2", "DCN", "LUM", "COL3A1", "PDGFRB", "FAP", "FBLN1"),
    "epithelial": ("KRT5", "KRT14", "KRT17", "KRT8", "KRT18", "EPCAM", "ELF3", "CLDN4"),
    "adipocyte": ("ADIPOQ", "PLIN1", "FABP4", "LEP", "CIDEA", "LPL"),
}
_SMOOTH = (
    ("POSTN", "fibroblast*ecm"), ("CA9", "tumour*hypoxia"), ("SPARC", "tissue*ecm"),
    ("VEGFA", "tumour*hypoxia"), ("FN1", "fibroblast*ecm"), ("MMP11", "tissue*ecm"),
)  # fmt: skip
_HOUSEKEEPING = (
    "ACTB",
    "GAPDH",
    "B2M",
    "RPLP0",
    "EEF1A1",
    "TPT1",
    "MALAT1",
    "RPS27A",
    "UBC",
    "PPIA",
)


def _gene_list(n_genes: int) -> list[dict]:
    """Names and categories: markers (round-robin over types), smooth, noise, housekeeping."""
    n_hk, n_noise, n_smooth = (max(1, round(f * n_genes)) for f in (0.1, 0.12, 0.12))
    n_marker = n_genes - n_hk - n_noise - n_smooth
    genes = []
    for i in range(n_marker):
        kind = CELL_TYPES[i % len(CELL_TYPES)]
        names = _MARKERS[kind]
        rank = i // len(CELL_TYPES)
        genes.append(
            {
                "name": names[rank] if rank < len(names) else None,
                "category": "marker",
                "cell_type": kind,
                "component": kind,
            }
        )
    for i in range(n_smooth):
        name, comp = _SMOOTH[i] if i < len(_SMOOTH) else (None, _SMOOTH[i % 3][1])
        kind, _, field = comp.partition("*")
        genes.append(
            {
                "name": name,
                "category": "smooth",
                "cell_type": kind if kind in CELL_TYPES else None,
                "field": field,
                "component": comp,
            }
        )
    for i in range(n_noise):
        genes.append(
            {
                "name": None,
                "category": "noise",
                "field": f"noise{i % 3 + 1}",
                "component": f"load*noise{i % 3 + 1}",
            }
        )
    for i in range(n_hk):
        genes.append(
            {
                "name": _HOUSEKEEPING[i] if i < len(_HOUSEKEEPING) else None,
                "category": "housekeeping",
            }
        )
    serial = 0
    for index, gene in enumerate(genes):
        if gene["name"] is None:
            serial += 1
            gene["name"] = f"GENE{serial:04d}"
        gene["id"] = f"SYNG{index + 1:08d}"
    return genes


def _gene_table(n_genes: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Genes and their profiles (gene, component) in UMI per µm² at the reference depth."""
    genes = _gene_list(n_genes)
    rng = np.random.default_rng([seed, 9])
    weight = rng.lognormal(0.0, 0.6, size=len(genes))
    col = {name: k for k, name in enumerate(_COMPONENTS)}
    rate = np.asarray(_TYPE_RATE)
    profiles = np.zeros((len(genes), len(_COMPONENTS)))
    groups: dict[str, list[int]] = {}
    for g, gene in enumerate(genes):
        groups.setdefault(gene.get("component") or gene["category"], []).append(g)
    for key, members in groups.items():
        share = weight[members] / weight[members].sum()
        if key == "housekeeping":
            profiles[np.ix_(members, range(len(rate)))] = 0.22 * share[:, None] * rate
        elif key in CELL_TYPES:
            level = 0.45 * share[:, None] * rate
            profiles[np.ix_(members, range(len(rate)))] = 0.03 * level
            profiles[members, col[key]] = level[:, CELL_TYPES.index(key)]
        else:
            left = key.partition("*")[0]
            scale = {"load": 0.05, "tissue": 0.6 * _TISSUE_RATE}.get(left)
            profiles[members, col[key]] = share * (
                scale if scale else 0.3 * rate[CELL_TYPES.index(left)]
            )
    expression = profiles[:, : len(rate)].mean(axis=1) + profiles[:, len(rate) + 2 :].mean(axis=1)
    expression[[gene["category"] == "noise" for gene in genes]] = (
        0.0  # noise genes: load share only
    )
    share = expression / expression.sum()
    profiles[:, col["tissue"]] += _TISSUE_RATE * share
    profiles[:, col["ambient"]] += _AMBIENT_RATE * share
    return genes, profiles


# ----------------------------------------------------------------------------------------------
# Visium HD bins
# ----------------------------------------------------------------------------------------------


def _capture_bbox(world: _World, sizes: Sequence[int]) -> tuple[float, float, float, float]:
    """Centred capture area (y0, x0, y1, x1) in µm: ≤ 6.5 mm, a whole number of the largest
    bins, its origin on the 2 µm truth grid."""

    def axis(extent: float) -> tuple[float, float]:
        side = math.floor(min(extent, _MAX_CAPTURE_UM) / sizes[-1]) * sizes[-1]
        start = math.floor((extent - side) / 2 / TRUTH_GRID_UM) * TRUTH_GRID_UM
        return float(start), float(start + side)

    (y0, y1), (x0, x1) = axis(world.height_um), axis(world.width_um)
    return (y0, x0, y1, x1)


def _band_um(sizes: Sequence[int], n_genes: int, capture: Sequence[float]) -> int:
    """Height (µm) of the bands bins are drawn in: whole largest bins, about 2 M values each."""
    cols = (capture[3] - capture[1]) / TRUTH_GRID_UM
    rows = max(1.0, 2e6 / (cols * n_genes))
    return int(sizes[-1] * max(1, math.floor(rows * TRUTH_GRID_UM / sizes[-1])))


def _write_bins(
    world: _World, root: Path, genes: list[dict], profiles: np.ndarray, sizes, capture, depth, steps
) -> None:
    """Poisson counts at the finest bin size, summed into the larger ones, band by band.

    Band k (from the top of the capture area) draws from its own RNG (seed, k), so the counts
    do not depend on how the truth is read.
    """
    import zarr

    group = zarr.open_group(root / "truth.zarr", mode="r")
    folder = root / "outs" / "binned_outputs"
    writers = [
        _BinWriter(folder / f"square_{b:03d}um", b, genes, world.mpp, capture) for b in sizes
    ]
    band_rows = round(_band_um(sizes, len(genes), capture) / TRUTH_GRID_UM)
    read_rows = band_rows * max(1, _TRUTH_CHUNK // band_rows)
    r_top, r_end = round(capture[0] / TRUTH_GRID_UM), round(capture[2] / TRUTH_GRID_UM)
    c0, c1 = round(capture[1] / TRUTH_GRID_UM), round(capture[3] / TRUTH_GRID_UM)
    for r0 in range(r_top, r_end, read_rows):
        truth = _read_truth(group, r0, min(r0 + read_rows, r_end), c0, c1)
        for b0 in range(0, truth[1].shape[0], band_rows):
            part = [a[..., b0 : b0 + band_rows, :] for a in truth]
            counts = _draw_counts(
                world.seed,
                (r0 - r_top + b0) // band_rows,
                profiles,
                group.attrs,
                part,
                sizes[0],
                depth,
            )
            tissue = part[1].astype(np.float32)
            for b, writer in zip(sizes, writers, strict=True):
                writer.append(
                    _block_sum(counts, b // sizes[0]), _block_mean(tissue, round(b / TRUTH_GRID_UM))
                )
            steps.tick()
    for writer in writers:
        writer.close()


def _draw_counts(
    seed: int, band: int, profiles: np.ndarray, attrs: Any, truth: list, fine: int, depth: float
) -> np.ndarray:
    """Poisson counts (gene, rows, cols) int32 of the finest bins of one band of truth cells."""
    comps = _components(attrs, *truth)
    rows, cols = comps.shape[1:]
    density = (profiles.astype(np.float32) @ comps.reshape(len(comps), -1)).reshape(-1, rows, cols)
    lam = depth * TRUTH_GRID_UM**2 * _block_sum(density, round(fine / TRUTH_GRID_UM))
    return np.random.default_rng([seed, 11, band]).poisson(lam).astype(np.int32)


def _barcodes(bin_um: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Space Ranger HD barcodes ``s_008um_00012_00034-1`` (fixed-width bytes), vectorised."""
    prefix = np.frombuffer(f"s_{bin_um:03d}um_".encode(), dtype=np.uint8)
    n, p = len(rows), len(prefix)
    buf = np.empty((n, p + 13), dtype=np.uint8)
    buf[:, :p] = prefix
    for k in range(5):
        buf[:, p + k] = 48 + (rows // 10 ** (4 - k)) % 10
        buf[:, p + 6 + k] = 48 + (cols // 10 ** (4 - k)) % 10
    buf[:, p + 5], buf[:, p + 11], buf[:, p + 12] = ord("_"), ord("-"), ord("1")
    return buf.view(f"S{p + 13}").ravel()


class _BinWriter:
    """Appends bands of one bin size to ``filtered_feature_bc_matrix.h5`` (in-tissue bins, 10x
    HDF5 v3, CSC by barcode) and ``spatial/tissue_positions.parquet`` (all bins)."""

    def __init__(
        self, folder: Path, bin_um: int, genes: list[dict], mpp: float, capture: Sequence[float]
    ) -> None:
        import h5py
        import pyarrow as pa
        import pyarrow.parquet as pq

        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        self.bin_um, self.genes, self.mpp, self.capture = bin_um, genes, mpp, capture
        self.h5 = h5py.File(folder / "filtered_feature_bc_matrix.h5", "w", rdcc_nbytes=0)
        matrix = self.h5.create_group("matrix")
        opts = {
            "maxshape": (None,),
            "chunks": (1 << 16,),
            "compression": "gzip",
            "compression_opts": 1,
        }
        self.barcodes = matrix.create_dataset(
            "barcodes", shape=(0,), dtype=f"S{len(f's_{bin_um:03d}um_') + 13}", **opts
        )
        self.data = matrix.create_dataset("data", shape=(0,), dtype=np.int32, **opts)
        self.indices = matrix.create_dataset("indices", shape=(0,), dtype=np.int64, **opts)
        self.indptr = matrix.create_dataset("indptr", shape=(1,), dtype=np.int64, **opts)
        self.schema = pa.schema(
            [("barcode", pa.string()), ("in_tissue", pa.int32()), ("array_row", pa.int32()), ("array_col", pa.int32()),
             ("pxl_row_in_fullres", pa.float64()), ("pxl_col_in_fullres", pa.float64())]
        )  # fmt: skip
        self.positions = pq.ParquetWriter(
            folder / "spatial" / "tissue_positions.parquet", self.schema
        )
        self.row, self.nnz = 0, 0
        self.pending: dict[str, list[np.ndarray]] = {
            "barcodes": [],
            "data": [],
            "indices": [],
            "indptr": [],
        }

    def _flush(self, force: bool = False) -> None:
        """Write the buffered matrix parts (in blocks of ≥ 1 M values: few, large HDF5 writes)."""
        if not force and sum(len(a) for a in self.pending["data"]) < (1 << 18):
            return
        for name, parts in self.pending.items():
            if parts:
                dataset = getattr(self, name)
                values = np.concatenate(parts)
                start = dataset.shape[0]
                dataset.resize((start + len(values),))
                dataset[start:] = values
                parts.clear()

    def append(self, counts: np.ndarray, tissue: np.ndarray) -> None:
        """Add a band: counts (gene, rows, cols) int32, tissue fraction (rows, cols)."""
        import pyarrow as pa

        n_rows, n_cols = tissue.shape
        rows, cols = (
            a.ravel()
            for a in np.meshgrid(
                np.arange(self.row, self.row + n_rows), np.arange(n_cols), indexing="ij"
            )
        )
        barcodes = _barcodes(self.bin_um, rows, cols)
        in_tissue = tissue.ravel() >= 0.5
        centre = lambda origin, index: (origin + (index + 0.5) * self.bin_um) / self.mpp  # noqa: E731
        table = pa.table(
            [pa.array(barcodes, type=pa.binary()).cast(pa.string()), in_tissue.astype(np.int32), rows.astype(np.int32),
             cols.astype(np.int32), centre(self.capture[0], rows), centre(self.capture[1], cols)],
            schema=self.schema,
        )  # fmt: skip
        self.positions.write_table(table)
        kept = counts.reshape(len(counts), -1)[:, in_tissue].T
        bins, genes = np.nonzero(kept)
        per_bin = np.bincount(bins, minlength=len(kept))
        for name, values in (
            ("barcodes", barcodes[in_tissue]),
            ("data", kept[bins, genes]),
            ("indices", genes.astype(np.int64)),
            ("indptr", self.nnz + np.cumsum(per_bin)),
        ):
            self.pending[name].append(values)
        self.nnz += len(bins)
        self.row += n_rows
        self._flush()

    def close(self) -> None:
        """Write shape, features and file attributes; close both files."""
        from napari_stmap import __version__

        self._flush(force=True)
        matrix = self.h5["matrix"]
        matrix.create_dataset(
            "shape", data=np.array([len(self.genes), self.barcodes.shape[0]], dtype=np.int32)
        )
        features = matrix.create_group("features")
        n = len(self.genes)
        columns = {
            "id": [g["id"] for g in self.genes],
            "name": [g["name"] for g in self.genes],
            "feature_type": ["Gene Expression"] * n,
            "genome": ["GRCh38-synthetic"] * n,
        }
        for key, values in columns.items():
            features.create_dataset(key, data=np.array(values, dtype="S"), compression="gzip")
        features.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
        self.h5.attrs.update(
            {"chemistry_description": np.bytes_("Visium HD v1 (napari-stmap synthetic)"), "filetype": np.bytes_("matrix"),
             "library_ids": np.array([b"synthetic"]), "original_gem_groups": np.array([1], dtype=np.int64),
             "software_version": f"napari-stmap-{__version__}", "version": np.int32(2)}
        )  # fmt: skip
        self.h5.close()
        self.positions.close()


# ----------------------------------------------------------------------------------------------
# The slide: pyramidal OME-TIFF written tile by tile
# ----------------------------------------------------------------------------------------------


def _level_shapes(world: _World) -> list[tuple[int, int]]:
    """(height, width) px of each pyramid level: halving until the longest side is < 1024 px."""
    shapes = [(world.height_px, world.width_px)]
    while max(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _halve(image: np.ndarray) -> np.ndarray:
    """2 × 2 mean of an (h, w, 3) uint8 image (odd sizes padded by edge replication)."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    total = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, 3).sum(
        axis=(1, 3), dtype=np.uint16
    )
    return ((total + 2) // 4).astype(np.uint8)


def _level0_tiles(
    world: _World, tile_px: int, level1: Any, steps: _Progress
) -> Iterator[np.ndarray]:
    """512 px tiles of level 0 in TIFF order, generated in rows of ``tile_px`` blocks; each
    block is also halved into level 1 (a temporary zarr array) when there is one."""
    height, width = world.height_px, world.width_px
    for top in range(0, height, tile_px):
        h = min(tile_px, height - top)
        strip = np.empty((h, width, 3), dtype=np.uint8)
        for left in range(0, width, tile_px):
            w = min(tile_px, width - left)
            strip[:, left : left + w] = block = _render_block(world, top, left, h, w)
            if level1 is not None:
                level1[top // 2 : (top + h + 1) // 2, left // 2 : (left + w + 1) // 2] = _halve(
                    block
                )
            steps.tick()
        for ty in range(0, h, _SLIDE_TILE):
            for tx in range(0, width, _SLIDE_TILE):  # copies: tifffile's buffer must not pin strips
                yield strip[ty : ty + _SLIDE_TILE, tx : tx + _SLIDE_TILE].copy()
        del strip


def _render_block(world: _World, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Render a block in pieces of at most 512 × 512 px: bounded temporaries, same pixels."""
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y in range(0, h, _SLIDE_TILE):
        for x in range(0, w, _SLIDE_TILE):
            ph, pw = min(_SLIDE_TILE, h - y), min(_SLIDE_TILE, w - x)
            out[y : y + ph, x : x + pw] = _render_rgb(world, top + y, left + x, ph, pw)
    return out


def _array_tiles(array: Any) -> Iterator[np.ndarray]:
    """512 px tiles of a (h, w, 3) zarr array in TIFF order, read one row of tiles at a time."""
    height, width = array.shape[:2]
    for ty in range(0, height, _SLIDE_TILE):
        band = np.asarray(array[ty : ty + _SLIDE_TILE])
        for tx in range(0, width, _SLIDE_TILE):
            yield band[:, tx : tx + _SLIDE_TILE].copy()
        del band


def _halve_level(source: Any, target: Any) -> None:
    """Fill pyramid level ``target`` from ``source`` (zarr arrays), 512 source rows at a time."""
    for top in range(0, source.shape[0], 2 * _SLIDE_TILE):
        target[top // 2 : top // 2 + _SLIDE_TILE] = _halve(
            np.asarray(source[top : top + 2 * _SLIDE_TILE])
        )


def _write_slide(world: _World, path: Path, tile_px: int, steps: _Progress) -> int:
    """Write the pyramidal OME-TIFF; return the number of levels."""
    import tifffile
    import zarr

    shapes = _level_shapes(world)
    tmp = path.parent / ".pyramid.tmp.zarr"
    store = zarr.open_group(tmp, mode="w")
    levels = [
        store.create_array(
            str(k), shape=(*shape, 3), chunks=(_SLIDE_TILE // 2, _SLIDE_TILE, 3), dtype="uint8"
        )
        for k, shape in enumerate(shapes[1:], start=1)
    ]
    opts = {"tile": (_SLIDE_TILE, _SLIDE_TILE), "photometric": "rgb", "compression": "jpeg",
            "compressionargs": {"level": 90}, "dtype": np.uint8, "maxworkers": 2, "buffersize": 1 << 24,
            "resolutionunit": "CENTIMETER"}  # fmt: skip
    metadata = {"axes": "YXS", "PhysicalSizeX": world.mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": world.mpp, "PhysicalSizeYUnit": "µm", "Name": "synthetic H&E"}  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tiles = _level0_tiles(world, tile_px, levels[0] if levels else None, steps)
        res = 1e4 / world.mpp
        tif.write(
            tiles,
            shape=(*shapes[0], 3),
            subifds=len(levels),
            resolution=(res, res),
            metadata=metadata,
            **opts,
        )
        for k, level in enumerate(levels, start=1):
            if k >= 2:
                _halve_level(levels[k - 2], level)
            res = 1e4 / (world.mpp * 2**k)
            tif.write(
                _array_tiles(level),
                shape=(*shapes[k], 3),
                subfiletype=1,
                resolution=(res, res),
                **opts,
            )
            steps.tick()
    shutil.rmtree(tmp)
    steps.tick()
    return len(shapes)


def _write_spatial(
    world: _World, root: Path, sizes: Sequence[int], capture: Sequence[float], n_levels: int
) -> None:
    """Hires (≤ 2000 px) and lowres (≤ 600 px) PNGs and scalefactors for each bin size."""
    import tifffile
    from PIL import Image

    longest = max(world.height_px, world.width_px)
    hires_s, lowres_s = min(1.0, 2000 / longest), min(1.0, 600 / longest)
    with tifffile.TiffFile(root / "he.ome.tif") as tif:
        levels = tif.series[0].levels
        k = max(i for i in range(n_levels) if max(levels[i].shape[:2]) >= longest * hires_s - 0.5)
        image = Image.fromarray(levels[k].asarray())

    def size(scale: float) -> tuple[int, int]:
        return (max(1, round(world.width_px * scale)), max(1, round(world.height_px * scale)))

    hires = image.resize(size(hires_s), Image.Resampling.BILINEAR, reducing_gap=2.0)
    lowres = hires.resize(size(lowres_s), Image.Resampling.BILINEAR, reducing_gap=2.0)
    first = None
    for b in sizes:
        spatial = root / "outs" / "binned_outputs" / f"square_{b:03d}um" / "spatial"
        for name, picture in (
            ("tissue_hires_image.png", hires),
            ("tissue_lowres_image.png", lowres),
        ):
            if first is None:
                picture.save(spatial / name, compress_level=3)
            else:
                shutil.copyfile(first / name, spatial / name)
        first = first or spatial
        scalefactors = {
            "spot_diameter_fullres": b / world.mpp,
            "bin_size_um": float(b),
            "microns_per_pixel": world.mpp,
            "regist_target_img_scalef": hires_s,
            "tissue_lowres_scalef": lowres_s,
            "fiducial_diameter_fullres": 330.0 / world.mpp,
            "tissue_hires_scalef": hires_s,
        }
        (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=4))


def _metadata(
    world: _World,
    genes: list[dict],
    sizes: Sequence[int],
    capture: Sequence[float],
    depth: float,
    n_levels: int,
) -> dict:
    """Content of synthetic.json."""
    from napari_stmap import __version__

    return {
        "format": "napari-stmap synthetic sample",
        "format_version": 1,
        "package_version": __version__,
        "seed": world.seed,
        "mpp": world.mpp,
        "size_um": [world.width_um, world.height_um],
        "shape_px": [world.height_px, world.width_px],
        "depth": depth,
        "slide": "he.ome.tif",
        "outs": "outs",
        "truth": "truth.zarr",
        "truth_grid_um": TRUTH_GRID_UM,
        "pyramid_levels": n_levels,
        "cell_types": list(CELL_TYPES),
        "genes": [
            {k: g.get(k) for k in ("name", "id", "category", "cell_type", "field")} for g in genes
        ],
        "bin_sizes_um": [float(b) for b in sizes],
        "bin_dirs": [f"outs/binned_outputs/square_{b:03d}um" for b in sizes],
        "capture_bbox_um": list(capture),
        "capture_bbox_px": [v / world.mpp for v in capture],
        "notes": "truth.zarr holds expected counts at the reference depth; counts are Poisson(depth × truth) "
        "drawn per finest bin and summed into larger bins; filtered matrices hold in-tissue bins only.",
    }


# ----------------------------------------------------------------------------------------------
# truth_density helpers
# ----------------------------------------------------------------------------------------------


def _gene_index(sample: SyntheticSample, genes: Sequence[str] | None) -> np.ndarray:
    """Indices of the requested genes in the sample (all when None)."""
    if genes is None:
        return np.arange(len(sample.genes))
    lookup = {g: i for i, g in enumerate(sample.genes)}
    missing = [g for g in genes if g not in lookup]
    if missing:
        msg = f"genes {missing[:5]} are not in the synthetic sample {sample.root}; it has e.g. {list(sample.genes[:5])}"
        raise StmapInputError(msg)
    return np.array([lookup[g] for g in genes], dtype=np.int64)


def _bbox_um(
    sample: SyntheticSample, group: Any, bbox_yx: Sequence[float] | None
) -> tuple[float, ...]:
    """The level-0 pixel bbox (default: whole slide) converted to µm."""
    height, width = group.attrs["shape_px"]
    box = (
        (0.0, 0.0, float(height), float(width))
        if bbox_yx is None
        else tuple(float(v) for v in bbox_yx)
    )
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        msg = f"bbox_yx must be (y0, x0, y1, x1) level-0 px with y1 > y0 and x1 > x0, got {bbox_yx}"
        raise StmapInputError(msg)
    return tuple(v * sample.mpp for v in box)


def _overlap_matrix(start: float, stop: float, grid_um: float, n_cells: int):
    """Sparse (n_out, n_cells) overlap in µm between output cells from ``start`` µm and truth cells."""
    from scipy import sparse

    n_out = max(1, math.ceil((stop - start) / grid_um - 1e-9))
    edges = start + grid_um * np.arange(n_out + 1)
    edges[-1] = stop
    span = math.ceil(grid_um / TRUTH_GRID_UM) + 1
    first = np.floor(edges[:-1] / TRUTH_GRID_UM).astype(np.int64)
    cells = first[:, None] + np.arange(span)[None, :]
    lo = np.maximum(edges[:-1, None], cells * TRUTH_GRID_UM)
    hi = np.minimum(edges[1:, None], (cells + 1) * TRUTH_GRID_UM)
    weight = np.clip(hi - lo, 0.0, None)
    ok = (weight > 0) & (cells >= 0) & (cells < n_cells)
    rows = np.broadcast_to(np.arange(n_out)[:, None], cells.shape)
    return sparse.csr_matrix((weight[ok], (rows[ok], cells[ok])), shape=(n_out, n_cells))


def _integrate(group: Any, matrix: np.ndarray, wy: Any, wx: Any) -> np.ndarray:
    """Sum component maps over output cells (overlap-weighted), then apply the gene matrix."""
    used_rows, used_cols = np.unique(wy.indices), np.unique(wx.indices)
    n_comp = matrix.shape[1]
    agg = np.zeros((n_comp, wy.shape[0], wx.shape[0]), dtype=np.float64)
    if len(used_rows) and len(used_cols):
        c0, c1 = int(used_cols[0]), int(used_cols[-1]) + 1
        wx_cols = wx[:, c0:c1].tocsr()  # (n_out_x, cols)
        for r0 in range(int(used_rows[0]), int(used_rows[-1]) + 1, _TRUTH_CHUNK):
            r1 = min(r0 + _TRUTH_CHUNK, int(used_rows[-1]) + 1)
            comps = _components(group.attrs, *_read_truth(group, r0, r1, c0, c1))
            wy_band = wy[:, r0:r1]
            for k in range(n_comp):
                agg[k] += wy_band @ (wx_cols @ comps[k].astype(np.float64).T).T
    out = matrix.astype(np.float64) @ agg.reshape(n_comp, -1)
    return out.reshape(len(matrix), wy.shape[0], wx.shape[0]).astype(np.float32)
