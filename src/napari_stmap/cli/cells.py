"""``stmap cells``: per-cell predicted expression, a thin call into :mod:`napari_stmap.core.cells`.

Registered in :mod:`napari_stmap.cli` through :func:`_add_cells`; core is imported only when
the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import _progress

__all__ = ["_add_cells", "cmd_cells"]


def _add_cells(sub) -> None:
    p = sub.add_parser(
        "cells",
        help="per-cell predicted expression from a segmentation (or a built-in one), to .h5ad",
        description="Sum the predicted expression over every cell's mask (additive rule) and "
        "write cells.h5ad (AnnData cells × genes) with cells.geojson (outlines, QuPath "
        "detections) beside it. Cells come from a label image (Cellpose / StarDist / "
        "InstanSeg TIFF at the slide's size or a whole-number downsample), GeoJSON polygons "
        "(QuPath), or --segment: a simple built-in nucleus segmentation (haematoxylin "
        "threshold + watershed; a baseline, bring a deep-learning segmentation for real work). "
        "Tiles the cells need and the store lacks are predicted.",
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction store (.zarr)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", type=Path, help="label image: TIFF / OME-TIFF, zarr or .npy")
    src.add_argument("--geojson", type=Path, help="cell or nucleus polygons ([x, y] level-0 px)")
    src.add_argument(
        "--segment",
        action="store_true",
        help="built-in nucleus segmentation (labels kept as OUT.labels.zarr)",
    )
    p.add_argument(
        "--expand-um",
        type=float,
        default=0.0,
        metavar="D",
        help="grow each cell by D µm without overlapping neighbours (nuclei -> cells); default 0",
    )
    p.add_argument("--slide", type=Path, default=None, help="the slide, if the store's moved")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad (.geojson beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--model", type=Path, default=None, help="model file, if the store does not record it"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_cells)


def cmd_cells(args) -> int:
    """``stmap cells --pred STORE (--labels F | --geojson F | --segment) --out cells.h5ad``."""
    from ..core.cells import run_cells

    bars = []

    def stage(name: str):
        bar = _progress(name, unit="tile")
        bars.append(bar)
        return bar.__enter__()

    try:
        result = run_cells(
            args.pred,
            args.out,
            labels=args.labels,
            geojson=args.geojson,
            segment=args.segment,
            expand_um=args.expand_um,
            slide=args.slide,
            overwrite=args.overwrite,
            model=args.model,
            device=args.device,
            progress=stage,
        )
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    print(
        f"wrote {result['h5ad']} and {result['geojson']}: {result['n_cells']} cells × "
        f"{result['genes']} genes ({result['source']})",
        file=sys.stdout,
    )
    if result["labels"] is not None:
        print(f"segmentation labels kept in {result['labels']} (reuse with --labels)")
    return 0
