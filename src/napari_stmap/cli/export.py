"""``stmap export``: predictions as a SpatialData zarr store (thin call into
:mod:`napari_stmap.core.export_spatialdata`).

Registered in :mod:`napari_stmap.cli` through :func:`_add_export`. spatialdata is imported only
when the command runs (optional extra ``[spatialdata]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import StmapInputError
from .common import _add_region, _progress

__all__ = ["_add_export", "cmd_export"]

_EPILOG = """\
what it writes (coordinate system "global" = level-0 px of the slide):
  he_image    the H&E from pyramid level --image-level down (default: the finest level at most
              4096 px across; a downsampled copy for display, not the full slide)
  gene_maps   one channel per --genes gene at the map's stride, normalised log1p(1e4 gene /
              total) (--values absolute: expected counts per map pixel), NaN where not predicted
  regions / spot_grid / cells
              shapes (circles for disk grids, else polygons) and a table NAME_table with the
              per-region sums of every gene (the numbers stmap aggregate writes)

open it in napari-spatialdata:
  python -c "from napari_spatialdata import Interactive; import spatialdata as sd; \\
    Interactive(sd.read_zarr('OUT.zarr'))"
"""


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write predictions (gene maps, regions, cells, H&E) as a SpatialData zarr store",
        description="Export a prediction store as SpatialData (scverse): the H&E image, the "
        "selected gene maps as a multiscale image, regions / spot grids / cells as shapes and "
        "tables of their sums, all in level-0 px of the slide. Needs the [spatialdata] extra.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction store (.zarr)")
    p.add_argument("--format", choices=["spatialdata"], default="spatialdata", help="output format")
    p.add_argument("out", type=Path, metavar="OUT.zarr", help="SpatialData store to write")
    p.add_argument(
        "--genes",
        required=True,
        help="comma-separated genes for the gene maps, or 'all' (tables hold every gene)",
    )
    p.add_argument(
        "--values",
        choices=["normalised", "absolute"],
        default="normalised",
        help="gene map values: normalised log1p(1e4 gene/total) (default) or absolute counts",
    )
    p.add_argument("--image-level", type=int, default=None, help="H&E pyramid level to copy")
    p.add_argument("--shapes", type=Path, help="GeoJSON regions ([x, y] level-0 px)")
    p.add_argument("--grid", type=float, metavar="SIZE_UM", help="spot grid: spot size in µm")
    p.add_argument("--pitch", type=float, default=None, help="grid pitch in µm (default: size)")
    p.add_argument("--footprint", choices=["disk", "square"], default="square")
    p.add_argument("--hexagonal", action="store_true", help="Visium-like hexagonal grid")
    _add_region(p, "grid only inside this box (level-0 px); default: the tissue")
    p.add_argument("--cells", type=Path, help="cells.h5ad written by stmap cells (.geojson beside)")
    p.add_argument("--slide", type=Path, default=None, help="the slide, if it moved")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zarr")
    p.add_argument(
        "--model", type=Path, default=None, help="model file, if the store does not record it"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_export)


def _genes(text: str, store) -> list[str]:
    if text.strip().lower() == "all":
        return list(store.genes)
    genes = [g.strip() for g in text.split(",") if g.strip()]
    if not genes:
        msg = f"--genes {text!r}: give comma-separated genes (e.g. ERBB2,CD3E) or 'all'"
        raise StmapInputError(msg)
    return genes


def cmd_export(args) -> int:
    """``stmap export --pred STORE.zarr --format spatialdata OUT.zarr --genes ...``."""
    from ..core.export_spatialdata import ExportRegions, check_target, write_spatialdata
    from ..core.extent import check_regions_on_slide
    from ..core.io.regions import read_geojson
    from ..core.io.slide import open_slide
    from ..core.predict import StoreSource
    from ..core.store import open_store
    from .engine import _grid_regions

    check_target(args.out, overwrite=args.overwrite)  # fail before any work
    store = open_store(args.pred, mode="r")
    genes = _genes(args.genes, store)
    mpp = float(store.meta["slide"]["mpp"])
    slide = open_slide(args.slide or store.meta["slide"]["path"], mpp=mpp)
    groups = []
    if args.shapes:
        regions = read_geojson(args.shapes)
        check_regions_on_slide(regions, store.meta["slide"]["shape_yx"], source=str(args.shapes))
        groups.append(ExportRegions("regions", regions))
    if args.grid:
        groups.append(ExportRegions("spot_grid", _grid_regions(args, store, mpp)))
    source = StoreSource(store, model=args.model, device=args.device, background=0.0)
    with _progress("export", unit="block") as progress:
        out = write_spatialdata(
            store,
            args.out,
            genes=genes,
            mode=args.values,
            slide=slide,
            image_level=args.image_level,
            regions=groups,
            cells=args.cells,
            source=source,
            overwrite=args.overwrite,
            progress=progress,
        )
    parts = [f"{len(genes)} gene maps"] + [f"{g.name} ({len(g.regions)})" for g in groups]
    if args.cells:
        parts.append("cells")
    print(f"wrote {out}: H&E, {', '.join(parts)}", file=sys.stdout)
    return 0
