"""SpatialData stores built in tests with spatialdata's own models (no spatialdata-io, no ../shared).

:func:`synthetic_store` writes the synthetic sample's Visium HD bins (read by the project's
Space Ranger reader) as a SpatialData zarr store the way spatialdata-io lays out Visium HD: one
table ``square_NNNum`` per bin size annotating square polygons, and the H&E image. The
``layout`` argument places the shapes and the image in different coordinate systems, so the
reader's rules for finding the slide's level-0 px can each be exercised:

- ``"spaceranger"``: shapes in full-resolution px (Identity to ``"global"``), the image a lower
  pyramid level with ``Scale(2**level)`` (spatialdata-io's hires/lowres convention);
- ``"fullres"``: the full-resolution image and the shapes both Identity to ``"global"``;
- ``"um"``: shapes in µm with ``Scale(1/mpp)`` to ``"global"``, the image Identity;
- ``"xenium"``: shapes in µm, ``"global"`` in px of a 0.2125 µm/px morphology image, the H&E
  placed by an ``Affine`` (scale and shift): the reader must invert it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MORPHOLOGY_MPP = 0.2125
XENIUM_SHIFT_XY = (37.5, -12.25)  # morphology px


def square_polygons(centers_xy: np.ndarray, side: float):
    """Axis-aligned squares of ``side`` around (x, y) centres, as shapely polygons."""
    from shapely import box

    h = side / 2.0
    x, y = centers_xy[:, 0], centers_xy[:, 1]
    return box(x - h, y - h, x + h, y + h)


def _downsample(rgb: np.ndarray, k: int) -> np.ndarray:
    """(y, x, 3) uint8 averaged over k × k blocks (the edge rows/columns that do not fill one
    are dropped)."""
    h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
    blocks = rgb[:h, :w].reshape(h // k, k, w // k, k, 3).astype(np.float32)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def _table(spots, region: str):
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    obs = pd.DataFrame(
        {
            "in_tissue": spots.in_tissue.astype(int),
            "array_row": spots.array_rc[:, 0],
            "array_col": spots.array_rc[:, 1],
            "location_id": np.arange(spots.n_spots),
            "region": pd.Categorical([region] * spots.n_spots),
        },
        index=pd.Index(spots.barcodes),
    )
    var = pd.DataFrame({"gene_ids": spots.gene_ids}, index=pd.Index(spots.genes))
    adata = ad.AnnData(X=spots.counts.copy(), obs=obs, var=var)
    return TableModel.parse(adata, region=region, region_key="region", instance_key="location_id")


def _transforms(layout: str, mpp: float, level: int):
    """(shapes transformation, image transformation) to ``"global"`` and the image level."""
    from spatialdata.transformations import Affine, Identity, Scale

    if layout == "spaceranger":
        return Identity(), Scale([2.0**level] * 2, axes=("y", "x")), level
    if layout == "fullres":
        return Identity(), Identity(), 0
    if layout == "um":
        return Scale([1 / mpp] * 2, axes=("y", "x")), Identity(), 0
    if layout == "xenium":
        k = mpp / MORPHOLOGY_MPP  # morphology px per H&E px
        sx, sy = XENIUM_SHIFT_XY
        he = Affine(
            np.array([[k, 0, sx], [0, k, sy], [0, 0, 1]]),
            input_axes=("x", "y"),
            output_axes=("x", "y"),
        )
        return Scale([1 / MORPHOLOGY_MPP] * 2, axes=("y", "x")), he, 0
    raise ValueError(layout)


def synthetic_store(
    sample, out: Path, *, layout: str = "spaceranger", bins=(2.0, 8.0, 16.0), level: int = 1
) -> Path:
    """Write ``sample``'s bins (``bins`` µm) and H&E as a SpatialData store at ``out``."""
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel

    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.io.spots import read_visium_hd

    slide = open_slide(sample.slide)
    shapes_t, image_t, level = _transforms(layout, sample.mpp, level)
    in_um = layout in ("um", "xenium")
    shapes, tables = {}, {}
    for b in bins:
        spots = read_visium_hd(sample.outs, bin_um=b)
        name = f"square_{int(b):03d}um"
        xy = spots.centers_yx[:, ::-1] * (sample.mpp if in_um else 1.0)
        if layout == "xenium":  # H&E px -> morphology px (the affine) -> µm
            k = sample.mpp / MORPHOLOGY_MPP
            xy = (k * spots.centers_yx[:, ::-1] + np.asarray(XENIUM_SHIFT_XY)) * MORPHOLOGY_MPP
        side = spots.size_px * (sample.mpp if in_um else 1.0)
        gdf = GeoDataFrame(geometry=square_polygons(xy, side), index=np.arange(spots.n_spots))
        shapes[f"sample_{name}"] = ShapesModel.parse(gdf, transformations={"global": shapes_t})
        tables[name] = _table(spots, f"sample_{name}")
    pixels = _downsample(np.asarray(slide.levels[0]), 2**level).transpose(2, 0, 1)
    image = Image2DModel.parse(
        pixels, dims=("c", "y", "x"), transformations={"global": image_t}, c_coords=["r", "g", "b"]
    )
    sdata = SpatialData(images={"sample_he": image}, shapes=shapes, tables=tables)
    sdata.write(out)
    return out
