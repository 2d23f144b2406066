"""The ``stmap`` command line: each subcommand is a thin call into ``napari_stmap.core``.

Bad input (a missing file, a truncated TIFF, a folder that is not Space Ranger output, ...)
exits with code 2 and one line on stderr naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .core.errors import StmapInputError

logger = logging.getLogger("napari_stmap")

EXIT_USAGE = 2
_VERBOSE_HELP = "log progress details and set-up notes"
#: Names (genes) ``stmap info`` prints before "... (N in all)".
_INFO_NAMES = 10
_INFO_LABELS = {"todo": "to do"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stmap``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(bool(args.verbose))
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except StmapInputError as exc:
        print(f"stmap {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(
            f"stmap {args.command}: error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"stmap {args.command}: interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbose: bool) -> None:
    """Warnings only; ``-v``: INFO from every library and DEBUG from napari-stmap itself.

    napari-stmap's set-up notes (e.g. the torchvision workaround of
    :mod:`napari_stmap.core.model._torchvision_compat`) are DEBUG: shown with ``-v`` only.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="stmap: %(message)s"
    )
    logging.getLogger("napari_stmap").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its parse warnings become our errors


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"stmap: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="stmap",
        description="Predict spatial gene expression from H&E slides (napari-stmap).",
    )
    parser.add_argument("--version", action="version", version=f"napari-stmap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _subcommands():
        register(sub)
    for command in sub.choices.values():  # `stmap predict -v ...` as well as `stmap -v predict`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP
        )
    return parser


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
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    """``stmap info PATH [--json]``."""
    from .core.info import describe

    info = describe(args.path, mpp=args.mpp, bin_um=args.bin_um)
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
    from .core.synthetic import write_synthetic

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


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"expected comma-separated numbers such as 2,8,16, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) <= 0:
        msg = f"expected positive sizes in µm such as 2,8,16, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


class _progress:
    """Context manager yielding a ``progress(done, total)`` callback backed by tqdm (stderr)."""

    def __init__(self, desc: str, unit: str = "it") -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=self.desc,
                unit=self.unit,
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
            )
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _subcommands() -> list[Callable]:
    from ._cli_engine import _add_aggregate, _add_predict
    from ._cli_model import _add_evaluate, _add_train

    return [_add_info, _add_synth, _add_train, _add_evaluate, _add_predict, _add_aggregate]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
