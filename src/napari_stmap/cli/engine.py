"""``stmap predict`` and ``stmap aggregate``: thin calls into :mod:`napari_stmap.core.predict`,
:mod:`napari_stmap.core.regions`, :mod:`napari_stmap.core.io.regions` and
:mod:`napari_stmap.core.export`.

Registered in :mod:`napari_stmap.cli` through :func:`_add_predict` and :func:`_add_aggregate`.
Core modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ..core.errors import StmapInputError
from .common import _add_backend, _add_precision, _add_region, _progress

__all__ = ["_add_aggregate", "_add_predict", "cmd_aggregate", "cmd_predict"]


# ---------------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict a slide (or a cohort) into a resumable prediction store",
        description="Run a dense model over the tissue of a slide, tile by tile, into a zarr "
        "store of embeddings (resumable: rerun to continue). Several --slide (with --out a "
        "folder) or a --manifest CSV (columns slide,out) run as one dask graph.",
        epilog="multi-GPU: start a dask scheduler and one worker per GPU, e.g.\n"
        "  dask scheduler & CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 1 &\n"
        "  CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nthreads 1 &\n"
        "  stmap predict ... --device cuda --scheduler tcp://HOST:8786",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="model file (.safetensors)")
    p.add_argument("--slide", type=Path, action="append", default=[], help="slide (repeat)")
    p.add_argument("--manifest", type=Path, help="CSV with columns slide,out (a cohort)")
    p.add_argument("--out", type=Path, help="store (.zarr) for one slide, or a folder for many")
    _add_region(p, "only this box (level-0 px)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps; default cpu")
    p.add_argument(
        "--scheduler",
        default=None,
        help="dask.distributed scheduler address (default: threads in this process)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass; default: chosen for the device within --max-memory "
        "(1 on the CPU, as many as fit on a GPU)",
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="tile core size in model px; default: the model's (smaller if one window does not "
        "fit --max-memory)",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory budget of the prediction in GB (network activations, windows, caches; "
        "the process itself comes on top); default half the free memory (80%% of a GPU's)",
    )
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument("--all-tiles", action="store_true", help="predict off-tissue tiles too")
    _add_precision(p)
    _add_backend(p)
    p.set_defaults(func=cmd_predict)


def _cohort(args) -> list[tuple[Path, Path]]:
    if args.manifest is not None:
        return _read_manifest(args.manifest)
    if not args.slide:
        msg = "give --slide SLIDE (repeatable) or --manifest CSV"
        raise StmapInputError(msg)
    if args.out is None:
        msg = "give --out STORE.zarr (one slide) or --out FOLDER (several slides)"
        raise StmapInputError(msg)
    if len(args.slide) == 1 and args.out.suffix == ".zarr":
        return [(args.slide[0], args.out)]
    return [(s, args.out / f"{_stem(s)}.zarr") for s in args.slide]


def _read_manifest(path: Path) -> list[tuple[Path, Path]]:
    if not path.is_file():
        msg = f"{path}: manifest not found; give a CSV with columns slide,out"
        raise StmapInputError(msg)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide", "out"} <= set(rows[0]):
        msg = f"{path}: manifest needs a header with columns slide,out (one row per slide)"
        raise StmapInputError(msg)
    base = path.parent
    return [(base / r["slide"], base / r["out"]) for r in rows]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def cmd_predict(args) -> int:
    """``stmap predict --model M --slide S --out STORE.zarr [...]``."""
    from ..core.io.slide import open_slide
    from ..core.predict import predict_cohort

    pairs = _cohort(args)
    for slide, _ in pairs:
        if not slide.exists():
            msg = f"{slide}: slide not found; check the path"
            raise StmapInputError(msg)
    slides = [open_slide(s, mpp=args.mpp, backend=args.backend) for s, _ in pairs]
    options = {"tissue": not args.all_tiles, "max_memory_gb": args.max_memory, "on_plan": _say}
    if args.tile_px:
        options["tile_px"] = args.tile_px
    options["precision"] = args.precision
    if args.region:  # before anything is written
        options["region"] = _region_on_slides(args.region, slides, [s for s, _ in pairs])
    for _, out in pairs:
        out.parent.mkdir(parents=True, exist_ok=True)
    with _progress("predict", unit="tile") as progress:
        stores = predict_cohort(
            [(s, o) for s, (_, o) in zip(slides, pairs, strict=True)],
            args.model,
            scheduler=args.scheduler,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress,
            **options,
        )
    for store in stores:
        c = store.counts()
        print(f"{store.path}: {c['done']} tiles done, {c['skipped']} off tissue, {c['todo']} to do")
    return 0


def _say(plan) -> None:
    """The run's batch size, window and memory, one line on stderr."""
    print(f"stmap: {plan.describe()}", file=sys.stderr, flush=True)


def _region_on_slides(region, slides, paths) -> tuple[float, float, float, float]:
    """``--region`` checked against every slide (refused off a slide, warned when clipped).

    Returns the box as given: the engine only predicts the tiles on the slide anyway, and
    one box serves all slides of a cohort.
    """
    from ..core.extent import check_box_on_slide

    for slide, path in zip(slides, paths, strict=True):
        check_box_on_slide(region, slide.shape_yx, what="--region", slide=str(path))
    return tuple(float(v) for v in region)


# -------------------------------------------------------------------------------- aggregate
def _add_aggregate(sub) -> None:
    p = sub.add_parser(
        "aggregate",
        help="sum predicted expression over shapes or a spot grid, write .h5ad or .csv",
        description="Per-region sums of the predicted expected counts (additive rule) for "
        "every gene, over GeoJSON shapes ([x, y] in level-0 px, as QuPath exports) or a "
        "generated spot grid. Tiles a region needs and the store lacks are predicted.",
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction store (.zarr)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shapes", type=Path, help="GeoJSON regions ([x, y] level-0 px)")
    src.add_argument("--grid", type=float, metavar="SIZE_UM", help="spot grid: spot size in µm")
    p.add_argument("--pitch", type=float, default=None, help="grid pitch in µm (default: size)")
    p.add_argument("--footprint", choices=["disk", "square"], default="square")
    p.add_argument("--hexagonal", action="store_true", help="Visium-like hexagonal grid")
    _add_region(p, "grid only inside this box (level-0 px); default: the tissue")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--model", type=Path, default=None, help="model file, if the store does not record it"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_aggregate)


def cmd_aggregate(args) -> int:
    """``stmap aggregate --pred STORE (--shapes F | --grid UM) --out OUT``."""
    from ..core.export import check_output
    from ..core.extent import check_regions_on_slide
    from ..core.io.regions import read_geojson
    from ..core.predict import StoreSource
    from ..core.store import open_store

    check_output(args.out, (".h5ad", ".csv"), args.overwrite)  # fail before any work
    store = open_store(args.pred, mode="r")
    mpp = float(store.meta["slide"]["mpp"])
    if args.shapes:
        regions = read_geojson(args.shapes)
        check_regions_on_slide(regions, store.meta["slide"]["shape_yx"], source=str(args.shapes))
    else:
        regions = _grid_regions(args, store, mpp)
    # off-tissue tiles count as 0 counts; tiles the regions need are predicted first
    source = StoreSource(store, model=args.model, device=args.device, background=0.0)
    with _progress("aggregate", unit="block") as progress:
        sums = source.region_sums(regions, progress=progress)
    path = _write(args, store, regions, sums, mpp)
    print(f"wrote {path}: {len(regions)} regions × {len(store.genes)} genes", file=sys.stdout)
    return 0


def _grid_regions(args, store, mpp: float) -> list:
    import numpy as np

    from ..core.geometry import Region, spot_grid

    if args.grid <= 0 or (args.pitch is not None and args.pitch <= 0):
        msg = f"--grid and --pitch must be positive µm (got {args.grid}, {args.pitch})"
        raise StmapInputError(msg)
    box = tuple(args.region) if args.region else _tissue_bbox(store)
    size_px, pitch_px = args.grid / mpp, (args.pitch or args.grid) / mpp
    centers, fps = spot_grid(
        box, size_px=size_px, pitch_px=pitch_px, footprint=args.footprint, hexagonal=args.hexagonal
    )
    if len(fps) == 0:
        msg = f"no {args.grid:g} µm spot fits in the region {box} (level-0 px); enlarge --region"
        raise StmapInputError(msg)
    width = int(np.ceil(np.log10(len(fps) + 1)))
    return [Region(f"spot_{k:0{width}d}", [(fp, 1.0)]) for k, fp in enumerate(fps)]


def _tissue_bbox(store) -> tuple[float, float, float, float]:
    """Level-0 px box around the tiles that are not off tissue."""
    import numpy as np

    from ..core.store import SKIPPED

    ij = np.argwhere(store.done != SKIPPED)
    spec = store.spec
    if len(ij) == 0:
        return store.grid.bbox_yx
    boxes = np.array([spec.core_level0(tuple(int(v) for v in t)) for t in ij])
    return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def _write(args, store, regions, sums, mpp: float) -> Path:
    import numpy as np

    from ..core.export import build_anndata, write_regions
    from ..core.io.slide import open_slide

    slide = open_slide(store.meta["slide"]["path"], mpp=mpp)
    thumb = slide.thumbnail(2000)
    scale = thumb.shape[0] / slide.shape_yx[0]
    g = len(store.genes)
    adata = build_anndata(
        sums[:, :g],
        sums[:, g],
        store.genes,
        np.array([r.center_yx for r in regions]),
        mpp=mpp,
        area_um2=np.array([r.area_px for r in regions]) * mpp**2,
        footprint=[r.kind for r in regions],
        names=[r.name for r in regions],
        library_id=_stem(Path(store.meta["slide"]["path"])),
        image=thumb,
        image_scale=scale,
        uns_meta={"store": str(store.path), "model": store.meta["model"].get("path", "")},
    )
    return write_regions(adata, args.out, overwrite=args.overwrite)
