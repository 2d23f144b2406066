"""The writer: :func:`write_synthetic` checks its arguments, then writes truth, bins, slide,
spatial images and ``synthetic.json``, reporting progress in steps."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_stmap.core.errors import StmapInputError

from ._fields import CELL_TYPES, TRUTH_GRID_UM, _make_world, _World
from ._genes import _gene_table
from ._ometiff import _SLIDE_TILE, _level_shapes, _write_slide
from ._sample import _PACKAGE_VERSION, SyntheticSample, _clear_sample, _Progress, load_synthetic
from ._truth import _TRUTH_CHUNK, _write_truth
from ._visium_hd import _band_um, _capture_bbox, _write_bins, _write_spatial

log = logging.getLogger(__name__)


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


def _count_steps(
    world: _World, sizes: Sequence[int], capture: Sequence[float], n_genes: int, tile_px: int
) -> int:
    """Number of progress steps: truth chunks, bin bands, slide blocks, pyramid levels, images."""
    th, tw = world.truth_shape
    truth = math.ceil(th / _TRUTH_CHUNK) * math.ceil(tw / _TRUTH_CHUNK)
    bands = math.ceil((capture[2] - capture[0]) / _band_um(sizes, n_genes, capture))
    blocks = math.ceil(world.height_px / tile_px) * math.ceil(world.width_px / tile_px)
    return truth + bands + blocks + len(_level_shapes(world)) + 1


def _metadata(
    world: _World,
    genes: list[dict],
    sizes: Sequence[int],
    capture: Sequence[float],
    depth: float,
    n_levels: int,
) -> dict:
    """Content of synthetic.json."""
    return {
        "format": "napari-stmap synthetic sample",
        "format_version": 1,
        "package_version": _PACKAGE_VERSION,
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
