"""Visium HD bins in Space Ranger layout: ``outs/binned_outputs/square_XXXum``.

Counts are Poisson draws from the truth at the finest bin size over a centred capture area,
summed into the larger bins (so bins of different sizes are exactly additive, as in real
Visium HD data), and written band by band: ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3,
in-tissue bins), ``spatial/tissue_positions.parquet`` (all bins, full-resolution (row, col) px),
hires/lowres PNGs and ``scalefactors_json.json``; ``outs/feature_slice.h5`` holds the run
metadata only (what spatialdata-io's Visium HD reader needs to recognise the run).

Units: capture area and bins in µm; positions written in level-0 pixels.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from ._fields import TRUTH_GRID_UM, _World
from ._raster import _block_mean, _block_sum
from ._sample import _PACKAGE_VERSION, _Progress
from ._truth import _TRUTH_CHUNK, _components, _read_truth

_MAX_CAPTURE_UM = 6500.0
_POSITIONS_SCHEMA = pa.schema(
    [("barcode", pa.string()), ("in_tissue", pa.int32()), ("array_row", pa.int32()), ("array_col", pa.int32()),
     ("pxl_row_in_fullres", pa.float64()), ("pxl_col_in_fullres", pa.float64())]
)  # fmt: skip
_MATRIX_PARTS = ("barcodes", "data", "indices", "indptr")


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
    world: _World,
    root: Path,
    genes: list[dict],
    profiles: np.ndarray,
    sizes: Sequence[int],
    capture: Sequence[float],
    depth: float,
    steps: _Progress,
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
            band = (r0 - r_top + b0) // band_rows
            counts = _draw_counts(world.seed, band, profiles, group.attrs, part, sizes[0], depth)
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


def _open_matrix(path: Path, bin_um: int) -> tuple[h5py.File, dict[str, h5py.Dataset]]:
    """A new 10x HDF5 matrix file with empty, growable CSC datasets (barcodes, data, indices,
    indptr = [0])."""
    h5 = h5py.File(path, "w", rdcc_nbytes=0)
    matrix = h5.create_group("matrix")
    opts = {"maxshape": (None,), "chunks": (1 << 16,), "compression": "gzip", "compression_opts": 1}
    dtypes = (f"S{len(f's_{bin_um:03d}um_') + 13}", np.int32, np.int64, np.int64)
    datasets = {
        name: matrix.create_dataset(name, shape=(int(name == "indptr"),), dtype=dtype, **opts)
        for name, dtype in zip(_MATRIX_PARTS, dtypes, strict=True)
    }
    return h5, datasets


def _write_features(matrix: h5py.Group, genes: list[dict]) -> None:
    """``matrix/features`` of a 10x HDF5 matrix: ids, names, type, genome of each gene."""
    features = matrix.create_group("features")
    n = len(genes)
    columns = {
        "id": [g["id"] for g in genes],
        "name": [g["name"] for g in genes],
        "feature_type": ["Gene Expression"] * n,
        "genome": ["GRCh38-synthetic"] * n,
    }
    for key, values in columns.items():
        features.create_dataset(key, data=np.array(values, dtype="S"), compression="gzip")
    features.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))


class _BinWriter:
    """Appends bands of one bin size to ``filtered_feature_bc_matrix.h5`` (in-tissue bins, 10x
    HDF5 v3, CSC by barcode) and ``spatial/tissue_positions.parquet`` (all bins)."""

    def __init__(
        self, folder: Path, bin_um: int, genes: list[dict], mpp: float, capture: Sequence[float]
    ) -> None:
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        self.bin_um, self.genes, self.mpp, self.capture = bin_um, genes, mpp, capture
        self.h5, self.datasets = _open_matrix(folder / "filtered_feature_bc_matrix.h5", bin_um)
        self.positions = pq.ParquetWriter(
            folder / "spatial" / "tissue_positions.parquet", _POSITIONS_SCHEMA
        )
        self.row, self.nnz = 0, 0
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in _MATRIX_PARTS}

    def _flush(self, force: bool = False) -> None:
        """Write the buffered matrix parts (in blocks of ≥ 1 M values: few, large HDF5 writes)."""
        if not force and sum(len(a) for a in self.pending["data"]) < (1 << 18):
            return
        for name, parts in self.pending.items():
            if parts:
                dataset = self.datasets[name]
                values = np.concatenate(parts)
                start = dataset.shape[0]
                dataset.resize((start + len(values),))
                dataset[start:] = values
                parts.clear()

    def append(self, counts: np.ndarray, tissue: np.ndarray) -> None:
        """Add a band: counts (gene, rows, cols) int32, tissue fraction (rows, cols)."""
        n_rows, n_cols = tissue.shape
        rows, cols = (
            a.ravel()
            for a in np.meshgrid(
                np.arange(self.row, self.row + n_rows), np.arange(n_cols), indexing="ij"
            )
        )
        barcodes = _barcodes(self.bin_um, rows, cols)
        in_tissue = tissue.ravel() >= 0.5
        self.positions.write_table(self._positions(barcodes, in_tissue, rows, cols))
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

    def _positions(self, barcodes, in_tissue, rows, cols) -> pa.Table:
        """tissue_positions rows of a band: barcode, in_tissue, array (row, col), full-res px."""
        centre = lambda origin, index: (origin + (index + 0.5) * self.bin_um) / self.mpp  # noqa: E731
        return pa.table(
            [pa.array(barcodes, type=pa.binary()).cast(pa.string()), in_tissue.astype(np.int32), rows.astype(np.int32),
             cols.astype(np.int32), centre(self.capture[0], rows), centre(self.capture[1], cols)],
            schema=_POSITIONS_SCHEMA,
        )  # fmt: skip

    def close(self) -> None:
        """Write shape, features and file attributes; close both files."""
        self._flush(force=True)
        matrix = self.h5["matrix"]
        n_bins = self.datasets["barcodes"].shape[0]
        matrix.create_dataset("shape", data=np.array([len(self.genes), n_bins], dtype=np.int32))
        _write_features(matrix, self.genes)
        self.h5.attrs.update(
            {"chemistry_description": np.bytes_("Visium HD v1 (napari-stmap synthetic)"), "filetype": np.bytes_("matrix"),
             "library_ids": np.array([b"synthetic"]), "original_gem_groups": np.array([1], dtype=np.int64),
             "software_version": f"napari-stmap-{_PACKAGE_VERSION}", "version": np.int32(2)}
        )  # fmt: skip
        self.h5.close()
        self.positions.close()


# ----------------------------------------------------------------------------------------------
# spatial/: images and scale factors
# ----------------------------------------------------------------------------------------------


def _write_spatial(
    world: _World, root: Path, sizes: Sequence[int], capture: Sequence[float], n_levels: int
) -> None:
    """Hires (≤ 2000 px) and lowres (≤ 600 px) PNGs and scalefactors for each bin size."""
    longest = max(world.height_px, world.width_px)
    hires_s, lowres_s = min(1.0, 2000 / longest), min(1.0, 600 / longest)
    hires, lowres = _spatial_images(world, root / "he.ome.tif", n_levels, hires_s, lowres_s)
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
    _write_feature_slice(root / "outs")


def _write_feature_slice(outs: Path) -> None:
    """``outs/feature_slice.h5`` with Space Ranger's run metadata only (``metadata_json``
    holding the HD layout's ``file_format``): no per-bin data. Readers such as spatialdata-io's
    ``visium_hd`` look for this file to recognise a Visium HD run."""
    meta = {
        "hd_layout_json": json.dumps({"file_format": "1.0"}),
        "software_version": f"napari-stmap-{_PACKAGE_VERSION} (synthetic)",
    }
    with h5py.File(outs / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(meta)


def _spatial_images(
    world: _World, slide: Path, n_levels: int, hires_s: float, lowres_s: float
) -> tuple[Image.Image, Image.Image]:
    """Hires and lowres images of the slide at the given scales (from the smallest pyramid
    level that is still at least as large as hires)."""
    longest = max(world.height_px, world.width_px)
    with tifffile.TiffFile(slide) as tif:
        levels = tif.series[0].levels
        k = max(i for i in range(n_levels) if max(levels[i].shape[:2]) >= longest * hires_s - 0.5)
        image = Image.fromarray(levels[k].asarray())

    def size(scale: float) -> tuple[int, int]:
        return (max(1, round(world.width_px * scale)), max(1, round(world.height_px * scale)))

    hires = image.resize(size(hires_s), Image.Resampling.BILINEAR, reducing_gap=2.0)
    lowres = hires.resize(size(lowres_s), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return hires, lowres
