"""Predictions as a SpatialData (scverse) zarr store, for napari-spatialdata, squidpy, scanpy.

:func:`write_spatialdata` writes, from a prediction store:

- ``he_image``: the H&E slide from pyramid level ``image_level`` down (a downsampled copy for
  display, not the full-resolution pixels unless level 0 is asked for), ``(c, y, x)`` uint8,
  ``Scale(level-0 px per level px)`` to the coordinate system :data:`COORDINATE_SYSTEM`;
- ``gene_maps``: the selected genes as one multiscale image, one channel per gene (channel
  names = gene names), float32 at the map's stride, normalised ``log1p(1e4 · gene / total)``
  (or absolute expected counts per map pixel), NaN where the store holds no prediction; its
  transformation ``Scale(stride px) ∘ Translation(origin)`` places map pixel ``(i, j)`` on
  ``[origin + i·p, origin + (i+1)·p)`` level-0 px (the project's :class:`MapGrid`); the coarser
  pyramid levels are spatialdata's (for display);
- one **shapes** element per set of regions (GeoJSON shapes, a spot grid, cells): circles
  (points + ``radius``) for disks, polygons otherwise, coordinates ``(x, y)`` level-0 px;
- one **table** per shapes element (``<name>_table``: element names are unique in a store),
  annotating it (``region``, ``region_key``
  ``"region"``, ``instance_key`` ``"instance_id"``; cells: ``"cell_id"``): the per-region sums
  of predicted counts of every gene (the additive rule, the numbers ``stmap aggregate`` writes,
  from :meth:`~napari_stmap.core.predict.StoreSource.region_sums`), ``obs['total_counts']``,
  ``layers['lognorm']`` and ``obsm['spatial']`` (x, y) as :func:`~napari_stmap.core.export.
  build_anndata` makes them. Cells come as ``stmap cells`` wrote them (cells.h5ad + its
  cells.geojson).

The coordinate system :data:`COORDINATE_SYSTEM` is level-0 px of the slide, so every element
lines up with the slide and with the project's own coordinates. The store is written beside the
target and renamed into place; an existing target is replaced only with ``overwrite=True``.
spatialdata is imported inside functions (optional extra ``[spatialdata]``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StmapInputError
from .export import check_output
from .geometry import Disk, Region

logger = logging.getLogger(__name__)

__all__ = [
    "COORDINATE_SYSTEM",
    "ExportRegions",
    "default_image_level",
    "write_spatialdata",
]

#: The coordinate system of every element: level-0 px of the slide.
COORDINATE_SYSTEM = "global"
INSTALL_HINT = 'pip install "napari-stmap[spatialdata]"'
#: The default H&E level is the finest whose longest side is at most this many px.
DEFAULT_IMAGE_MAX_PX = 4096
#: Pyramid levels are added until the longest side is at most this many px.
_PYRAMID_MIN_PX = 512


@dataclass
class ExportRegions:
    """A set of regions to write as one shapes element and its table.

    Attributes
    ----------
    name : str
        Element and table name (``"regions"``, ``"spot_grid"``, ...).
    regions : list of Region
        Level-0 px footprints (their names become the table's ``obs_names``).
    """

    name: str
    regions: list[Region]


def _spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        msg = f"writing SpatialData needs spatialdata: {INSTALL_HINT}"
        raise StmapInputError(msg) from err
    return spatialdata


# ---------------------------------------------------------------------------------- image
def default_image_level(
    shapes_yx: Sequence[tuple[int, int]], max_px: int = DEFAULT_IMAGE_MAX_PX
) -> int:
    """The finest pyramid level whose longest side is at most ``max_px`` (else the coarsest)."""
    for k, (h, w) in enumerate(shapes_yx):
        if max(h, w) <= max_px:
            return k
    return len(shapes_yx) - 1


def _scale_factors(shape_hw: Sequence[int]) -> list[int]:
    """Factors of 2 until the longest side is at most :data:`_PYRAMID_MIN_PX`."""
    out, side = [], max(shape_hw)
    while side > _PYRAMID_MIN_PX:
        out.append(2)
        side = math.ceil(side / 2)
    return out


def he_element(slide: Any, level: int) -> Any:
    """The slide's pyramid level ``level`` as a multiscale ``Image2DModel`` in level-0 px."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    n = len(slide.levels)
    if not (0 <= level < n):
        sizes = ", ".join(f"{k}: {a.shape[0]}×{a.shape[1]}" for k, a in enumerate(slide.levels))
        msg = f"--image-level {level}: the slide has levels {sizes} px (y×x); pick one of them"
        raise StmapInputError(msg)
    arr = slide.levels[level]
    h0, w0 = slide.shape_yx
    scale = Scale([h0 / arr.shape[0], w0 / arr.shape[1]], axes=("y", "x"))
    return Image2DModel.parse(
        arr.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=_scale_factors(arr.shape[:2]) or None,
        transformations={COORDINATE_SYSTEM: scale},
    )


def gene_element(store: Any, genes: Sequence[str], mode: str) -> Any:
    """The genes' maps (C, H, W) float32 as a multiscale ``Image2DModel`` in level-0 px."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Translation
    from spatialdata.transformations import Sequence as Chain

    from .predict.views import gene_view, view_grid

    maps = da.stack([gene_view(store, g, mode=mode) for g in genes])
    grid = view_grid(store)
    p, (oy, ox) = grid.pixel_px, grid.origin_yx
    place = Chain([Scale([p, p], axes=("y", "x")), Translation([oy, ox], axes=("y", "x"))])
    return Image2DModel.parse(
        maps,
        dims=("c", "y", "x"),
        c_coords=list(genes),
        scale_factors=_scale_factors(maps.shape[1:]) or None,
        transformations={COORDINATE_SYSTEM: place},
    )


# ---------------------------------------------------------------------------------- shapes
def _polygon(region: Region):
    """A Region (signed parts: outer rings +1, holes −1) as a shapely (Multi)Polygon, (x, y)."""
    from shapely import MultiPolygon, Polygon

    polys: list[list[np.ndarray]] = []
    for fp, sign in region.parts:
        ring = np.asarray(fp.outline_yx(), dtype=float)[:, ::-1]
        if sign > 0 or not polys:
            polys.append([ring])
        else:
            polys[-1].append(ring)
    shapes = [Polygon(rings[0], rings[1:]) for rings in polys]
    return shapes[0] if len(shapes) == 1 else MultiPolygon(shapes)


def _is_single(region: Region, kind: type) -> bool:
    return (
        len(region.parts) == 1 and isinstance(region.parts[0][0], kind) and region.parts[0][1] > 0
    )


def shapes_element(regions: Sequence[Region]) -> Any:
    """Circles when every region is one disk, else polygons; index 0..n-1, (x, y) level-0 px."""
    from geopandas import GeoDataFrame
    from shapely import points
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    index = np.arange(len(regions))
    if regions and all(_is_single(r, Disk) for r in regions):
        disks = [r.parts[0][0] for r in regions]
        xy = np.array([[d.center_yx[1], d.center_yx[0]] for d in disks], dtype=float)
        gdf = GeoDataFrame(
            {"radius": [d.radius_px for d in disks]}, geometry=points(xy), index=index
        )
    else:
        gdf = GeoDataFrame(geometry=[_polygon(r) for r in regions], index=index)
    return ShapesModel.parse(gdf, transformations={COORDINATE_SYSTEM: Identity()})


def region_table(
    name: str,
    regions: Sequence[Region],
    sums: np.ndarray,
    genes: Sequence[str],
    mpp: float,
    meta: dict,
) -> Any:
    """AnnData of the regions' sums (as ``stmap aggregate``) annotating shapes ``name``."""
    import pandas as pd
    from spatialdata.models import TableModel

    from .export import build_anndata

    g = len(genes)
    adata = build_anndata(
        sums[:, :g],
        sums[:, g],
        genes,
        np.array([r.center_yx for r in regions], dtype=float).reshape(-1, 2),
        mpp=mpp,
        area_um2=np.array([r.area_px for r in regions], dtype=float) * mpp**2,
        footprint=[r.kind for r in regions],
        names=[r.name for r in regions],
        library_id=name,
        uns_meta=meta,
    )
    adata.obs.index.name = None  # build_anndata calls it "region": the region_key here
    adata.obs["region"] = pd.Categorical([name] * adata.n_obs)
    adata.obs["instance_id"] = np.arange(adata.n_obs)
    return TableModel.parse(adata, region=name, region_key="region", instance_key="instance_id")


# ---------------------------------------------------------------------------------- cells
def cells_elements(h5ad: str | Path, store_meta: dict) -> tuple[Any, Any]:
    """(shapes, table) of a ``stmap cells`` output (cells.h5ad + cells.geojson beside it).

    Refuses cells measured on another slide (level-0 size) than the store's.
    """
    import anndata as ad
    import pandas as pd
    from geopandas import GeoDataFrame
    from shapely.geometry import shape
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    h5ad = Path(h5ad)
    geo = h5ad.with_suffix(".geojson")
    for path in (h5ad, geo):
        if not path.is_file():
            msg = f"{path}: not found; --cells takes the .h5ad that stmap cells wrote, with its .geojson beside it"
            raise StmapInputError(msg)
    adata = ad.read_h5ad(h5ad)
    if "cell_id" not in adata.obs:
        msg = f"{h5ad}: no obs['cell_id']; --cells takes the .h5ad that stmap cells wrote"
        raise StmapInputError(msg)
    _check_cells_slide(h5ad, adata, store_meta)
    features = json.loads(geo.read_text()).get("features", [])
    ids = [int(f["properties"]["cell_id"]) for f in features]
    gdf = GeoDataFrame(geometry=[shape(f["geometry"]) for f in features], index=pd.Index(ids))
    cell_ids = adata.obs["cell_id"].to_numpy(np.int64)
    missing = np.setdiff1d(cell_ids, gdf.index.to_numpy())
    if missing.size:
        msg = f"{geo}: no outline for {missing.size} cells of {h5ad.name} (e.g. {missing[0]}); use the pair stmap cells wrote"
        raise StmapInputError(msg)
    shapes = ShapesModel.parse(gdf.loc[cell_ids], transformations={COORDINATE_SYSTEM: Identity()})
    adata.obs["region"] = pd.Categorical(["cells"] * adata.n_obs)
    adata.obs["cell_id"] = cell_ids
    table = TableModel.parse(adata, region="cells", region_key="region", instance_key="cell_id")
    return shapes, table


def _check_cells_slide(h5ad: Path, adata: Any, store_meta: dict) -> None:
    """Cells must lie on the store's slide: same µm/px (and slide file when recorded)."""
    prov = dict(adata.uns.get("stmap", {}))
    mpp = prov.get("mpp")
    want = float(store_meta["slide"]["mpp"])
    if mpp not in (None, "") and not math.isclose(float(mpp), want, rel_tol=1e-6):
        msg = f"{h5ad}: cells measured at {float(mpp):g} µm/px but the store's slide is {want:g} µm/px; pass the cells of this slide"
        raise StmapInputError(msg)
    slide = prov.get("slide")
    if slide and Path(slide).name != Path(store_meta["slide"]["path"]).name:
        logger.warning(
            "%s: cells of slide %s, store of %s", h5ad, slide, store_meta["slide"]["path"]
        )


# ---------------------------------------------------------------------------------- write
def check_target(out: str | Path, *, overwrite: bool) -> Path:
    """The output store path, refused when it exists (unless ``overwrite``) or is not ``.zarr``."""
    return check_output(out, (".zarr",), overwrite)


def write_spatialdata(
    store: Any,
    out: str | Path,
    *,
    genes: Sequence[str],
    mode: str = "normalised",
    slide: Any = None,
    image_level: int | None = None,
    regions: Sequence[ExportRegions] = (),
    cells: str | Path | None = None,
    source: Any = None,
    overwrite: bool = False,
    progress: Any = None,
) -> Path:
    """Write predictions of ``store`` as a SpatialData zarr store at ``out`` (see the module).

    Parameters
    ----------
    store : PredictionStore
        The prediction store (opened read-only is enough unless regions need missing tiles).
    out : path
        The ``.zarr`` folder to write.
    genes : sequence of str
        Genes to write as channels of ``gene_maps`` (and nothing else: tables hold every gene).
    mode : {"normalised", "absolute"}
        Values of the gene maps.
    slide : Slide, optional
        The store's slide (default: opened from the path the store records).
    image_level : int, optional
        Pyramid level of the H&E to copy (default :func:`default_image_level`).
    regions : sequence of ExportRegions
        Shapes to write with their tables of sums.
    cells : path, optional
        A ``stmap cells`` output (cells.h5ad with cells.geojson beside it).
    source : StoreSource, optional
        Sums the regions (default: a :class:`~napari_stmap.core.predict.StoreSource` on the store,
        off-tissue tiles as 0 counts, missing tiles predicted as ``stmap aggregate`` does).
    overwrite : bool
        Replace an existing ``out``.
    progress : callable, optional
        ``progress(done, total)`` while summing regions.

    Returns
    -------
    Path
        ``out``.
    """
    sd = _spatialdata()
    from .io.slide import open_slide
    from .predict import StoreSource
    from .predict.views import check_mode

    out = check_target(out, overwrite=overwrite)
    check_mode(mode)
    missing = [g for g in genes if g not in store.genes]
    if missing or not genes:
        msg = f"genes {missing[:5] or '(none)'} are not in the store's model; it has {', '.join(store.genes[:8])}, ... ({len(store.genes)})"
        raise StmapInputError(msg)
    meta = store.meta
    mpp = float(meta["slide"]["mpp"])
    slide = slide if slide is not None else open_slide(meta["slide"]["path"], mpp=mpp)
    if image_level is None:
        image_level = default_image_level([a.shape[:2] for a in slide.levels])
    images = {
        "he_image": he_element(slide, image_level),
        "gene_maps": gene_element(store, genes, mode),
    }
    shapes, tables = {}, {}
    if regions:
        source = source or StoreSource(store, background=0.0)
        info = {"store": str(store.path), "model": meta["model"].get("path", "")}
        for group in regions:
            sums = source.region_sums(group.regions, progress=progress)
            shapes[group.name] = shapes_element(group.regions)
            tables[f"{group.name}_table"] = region_table(
                group.name, group.regions, sums, store.genes, mpp, info
            )
    if cells is not None:
        shapes["cells"], tables["cells_table"] = cells_elements(cells, meta)
    sdata = sd.SpatialData(images=images, shapes=shapes, tables=tables)
    _write_atomic(sdata, out)
    logger.info("wrote %s: %s", out, sdata)
    return out


def _write_atomic(sdata: Any, out: Path) -> None:
    """Write beside ``out``, then move it into place (replacing ``out`` only now)."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp.zarr")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's, not ours
            sdata.write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
