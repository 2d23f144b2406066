"""``stmap info`` and ``stmap synth``: thin calls into :mod:`napari_stmap.core.info` and
:mod:`napari_stmap.core.synthetic`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import StmapInputError
from .common import _add_backend, _float_list, _progress

__all__ = ["_add_info", "_add_synth", "cmd_info", "cmd_synth"]

#: Names (genes) ``stmap info`` prints before "... (N in all)".
_INFO_NAMES = 10
_INFO_LABELS = {"todo": "to do"}


# ------------------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="describe a slide, measured spots/bins or a prediction store",
        description="Describe a slide (size, levels, µm/px), measured "
        "spots/bins (Space Ranger outs, binned_outputs, .h5ad) or a prediction store "
        "(model, slide, tiles done / off tissue / to do, µm/px, stride, genes).",
    )
    p.add_argument(
        "path", type=Path, help="slide file, Space Ranger folder, .h5ad or prediction store"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument("--bin-um", type=float, default=None, help="Visium HD bin size to describe")
    _add_backend(p)
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    """``stmap info PATH [--json]``."""
    from ..core.info import describe

    info = describe(args.path, mpp=args.mpp, bin_um=args.bin_um, backend=args.backend)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {_info_text(value)}")
    return 0


def _info_text(value) -> str:
    """One ``stmap info`` value as text: dicts as ``key value, ...``; long name lists cut."""
    if isinstance(value, dict):
        return ", ".join(
            f"{v} {_INFO_LABELS.get(k, k.replace('_', ' '))}" for k, v in value.items()
        )
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        shown = ", ".join(value[:_INFO_NAMES])
        return shown if len(value) <= _INFO_NAMES else f"{shown}, ... ({len(value)} in all)"
    return str(value)


# ------------------------------------------------------------------------------------ synth
def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic sample (slide + Visium HD bins + truth)",
        description="Write a synthetic H&E slide (pyramidal OME-TIFF), its ground "
        "truth expression and Visium HD outputs (Space Ranger layout).",
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument(
        "--size-um",
        type=float,
        nargs=2,
        metavar=("W", "H"),
        default=(1500.0, 1500.0),
        help="tissue size in µm (width height); default 1500 1500",
    )
    p.add_argument("--mpp", type=float, default=0.5, help="µm per pixel; default 0.5")
    p.add_argument("--genes", type=int, default=60, help="number of genes; default 60")
    p.add_argument("--seed", type=int, default=0, help="random seed; default 0")
    p.add_argument(
        "--bin-um",
        type=_float_list,
        default=(2.0, 8.0, 16.0),
        help="Visium HD bin sizes in µm, comma separated; default 2,8,16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> int:
    """``stmap synth OUT [--size-um W H] [--mpp M] [--genes N] [--seed S]``."""
    from ..core.synthetic import write_synthetic

    if args.mpp <= 0 or args.genes < 1 or min(args.size_um) <= 0:
        msg = f"--mpp, --genes and --size-um must be positive (got {args.mpp}, {args.genes}, {args.size_um})"
        raise StmapInputError(msg)
    with _progress("synth", unit="tile") as progress:
        sample = write_synthetic(
            args.out,
            size_um=tuple(args.size_um),
            mpp=args.mpp,
            n_genes=args.genes,
            seed=args.seed,
            bin_sizes_um=args.bin_um,
            overwrite=args.overwrite,
            progress=progress,
        )
    print(
        f"wrote {sample.root} (slide {sample.slide.name}, {len(sample.genes)} genes, "
        f"bins {', '.join(f'{b:g}' for b in sample.bin_sizes_um)} µm)"
    )
    return 0
