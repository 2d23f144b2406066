"""``stmap contrast``: what differs between two regions, a thin call into
:mod:`napari_stmap.core.contrast`.

Registered in :mod:`napari_stmap.cli` through :func:`_add_contrast`. Core modules are imported
only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import StmapInputError
from .common import _progress

__all__ = ["_add_contrast", "cmd_contrast"]

_DESCRIPTION = """\
Compare region A with region B (or with the rest of the tissue) over the units inside each:
spot-grid units of a chosen size, or cells. Per gene: mean normalised expression
log1p(1e4 * gene / total) in each, log2 fold change of the mean counts per 10k (pseudocount 1),
two-sided Wilcoxon rank-sum test with Benjamini-Hochberg q-values. A unit belongs to a region
when most of its area lies inside (a cell: its centroid); units off the tissue are left out.
Tiles the units need and the store lacks are predicted first."""

_EPILOG = """\
Units of one slide are not independent samples (neighbouring units share cells and context),
so the p- and q-values rank genes; they do not prove a difference between tissues.

examples:
  stmap contrast --pred C2.zarr --shapes regions.geojson --a Tumor --b Stroma --out t.csv
  stmap contrast --pred C2.zarr --shapes regions.geojson --a 0 --b rest --unit-um 100 --out t.csv
  stmap contrast --pred C2.zarr --shapes regions.geojson --a Tumor --b rest --cells cells.h5ad --out t.csv
"""


def _add_contrast(sub) -> None:
    import argparse

    p = sub.add_parser(
        "contrast",
        help="compare two regions gene by gene (means, log2 fold change, Wilcoxon + BH)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction store (.zarr)")
    p.add_argument(
        "--shapes", type=Path, required=True, help="GeoJSON regions ([x, y] level-0 px, QuPath)"
    )
    p.add_argument("--a", required=True, metavar="NAME", help="region A: name or 0-based index")
    p.add_argument(
        "--b",
        required=True,
        metavar="NAME",
        help="region B: name, index, or 'rest' (the tissue not in A)",
    )
    p.add_argument(
        "--units",
        choices=("square", "visium"),
        default="square",
        help="grid units: touching squares (Visium HD-like) or Visium-like disks on a "
        "hexagonal lattice (pitch 100/55 of the size); default square",
    )
    p.add_argument(
        "--unit-um", type=float, default=55.0, help="unit side or diameter in µm (default 55)"
    )
    p.add_argument(
        "--cells", type=Path, default=None, help="cells.h5ad (stmap cells): cells as the units"
    )
    p.add_argument("--top", type=int, default=10, help="genes to print each way (default 10)")
    p.add_argument("--out", type=Path, required=True, help="output table (.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--model", type=Path, default=None, help="model file, if the store does not record it"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_contrast)


def cmd_contrast(args) -> int:
    """``stmap contrast --pred STORE --shapes F --a A --b B|rest --out OUT.csv``."""
    from ..core.contrast import REST, find_region
    from ..core.export import check_output
    from ..core.extent import check_regions_on_slide
    from ..core.io.regions import read_geojson
    from ..core.store import open_store

    check_output(args.out, (".csv",), args.overwrite)  # fail before any work
    if args.top < 0:
        msg = f"--top {args.top}: pass a number of genes >= 0"
        raise StmapInputError(msg)
    store = open_store(args.pred, mode="r")
    regions = read_geojson(args.shapes)
    where = str(args.shapes)
    region_a = find_region(regions, args.a, source=where)
    region_b = (
        None if args.b.strip().lower() == REST else find_region(regions, args.b, source=where)
    )
    if region_b is region_a:
        msg = f"--a and --b are the same region {region_a.name!r}; pass two regions or --b rest"
        raise StmapInputError(msg)
    chosen = [r for r in (region_a, region_b) if r is not None]
    check_regions_on_slide(chosen, store.meta["slide"]["shape_yx"], source=where)
    result = _compare(args, store, region_a, region_b)
    path = result.write_csv(args.out, overwrite=args.overwrite)
    _print_top(result, args.top)
    print(f"wrote {path}: {len(result.genes)} genes ranked, {result.title()}")
    return 0


def _compare(args, store, region_a, region_b):
    from ..core.contrast import contrast_on_slide
    from ..core.io.slide import open_slide
    from ..core.predict import StoreSource

    slide = open_slide(store.meta["slide"]["path"], mpp=float(store.meta["slide"]["mpp"]))
    # off-tissue tiles count as 0 counts (as stmap aggregate); tiles the units need are predicted
    source = StoreSource(store, model=args.model, device=args.device, background=0.0)
    with _progress("contrast", unit="block") as progress:
        return contrast_on_slide(
            source,
            slide,
            region_a,
            region_b,
            kind=args.units,
            size_um=args.unit_um,
            cells=args.cells,
            progress=progress,
        )


def _print_top(result, top: int) -> None:
    if top == 0:
        return
    table = result.table()
    cols = ["gene", "mean_a", "mean_b", "log2fc", "z", "q"]
    fmt = {c: "{:.3g}".format for c in cols[1:]}
    up = table.head(top)
    down = table.tail(top).iloc[::-1]
    for title, part in (
        (f"higher in {result.name_a}", up[up["z"] > 0]),
        (f"higher in {result.name_b}", down[down["z"] < 0]),
    ):
        print(f"{title} ({result.title()}):")
        text = part[cols].to_string(index=False, formatters=fmt) if len(part) else "  (none)"
        print(text)
    sys.stdout.flush()
