"""The ``stmap`` command line: each subcommand is a thin call into ``napari_stmap.core``.

Bad input (a missing file, a truncated TIFF, a folder that is not Space Ranger output, ...)
exits with code 2 and one line on stderr naming the file and the fix, never a traceback.
The subcommands live in :mod:`.info` (info, synth), :mod:`.model` (train, evaluate),
:mod:`.engine` (predict, aggregate), :mod:`.contrast` (contrast) and :mod:`.cells` (cells);
this module assembles them.
Importing it stays light (no torch, dask, zarr or anndata until a command runs).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from .. import __version__
from .cells import _add_cells
from .common import VERBOSE_HELP, _configure_logging, _show_warning, run_command
from .contrast import _add_contrast
from .engine import _add_aggregate, _add_predict
from .export import _add_export
from .info import _add_info, _add_synth
from .model import _add_evaluate, _add_train

__all__ = ["build_parser", "main"]

#: Subcommand registrars, in the order ``stmap --help`` lists them.
_SUBCOMMANDS = (
    _add_info,
    _add_synth,
    _add_train,
    _add_evaluate,
    _add_predict,
    _add_aggregate,
    _add_contrast,
    _add_cells,
    _add_export,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stmap``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(bool(args.verbose))
    warnings.showwarning = _show_warning
    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="stmap",
        description="Predict spatial gene expression from H&E slides (napari-stmap).",
    )
    parser.add_argument("--version", action="version", version=f"napari-stmap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(sub)
    for command in sub.choices.values():  # `stmap predict -v ...` as well as `stmap -v predict`
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser
