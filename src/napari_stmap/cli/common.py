"""What every ``stmap`` subcommand shares: logging set-up, error handling, progress bars, parsers.

Subcommand modules (:mod:`.info`, :mod:`.model`, :mod:`.engine`) import this module and core,
never the package face :mod:`napari_stmap.cli`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from ..core.errors import StmapInputError

#: Exit code of a refused input (a missing file, a bad option value, ...).
EXIT_USAGE = 2
#: Exit code after Ctrl-C.
EXIT_INTERRUPTED = 130
VERBOSE_HELP = "log progress details and set-up notes"


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; bad input gives one line on stderr and exit code 2.

    Returns
    -------
    int
        The process exit code: the command's, :data:`EXIT_USAGE` for bad input (a
        :class:`StmapInputError`, a missing or unreadable file), :data:`EXIT_INTERRUPTED` after
        Ctrl-C. Any other exception is a bug and keeps its traceback.
    """
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
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
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `stmap info ... | head`: the reader left, nothing went wrong
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so Python's flush at exit does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


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
    """:func:`warnings.showwarning` for the command line: one line, no source location."""
    print(f"stmap: warning: {message}", file=sys.stderr)


def _float_list(text: str) -> tuple[float, ...]:
    """Argparse type: ``"2,8,16"`` -> ``(2.0, 8.0, 16.0)``, positive sizes in µm."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        msg = f"expected comma-separated numbers such as 2,8,16, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or min(values) <= 0:
        msg = f"expected positive sizes in µm such as 2,8,16, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values


def _add_region(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--region Y0 X0 Y1 X1``: a box in level-0 px of the slide (floats, None if not given)."""
    parser.add_argument(
        "--region", type=float, nargs=4, metavar=("Y0", "X0", "Y1", "X1"), help=help_text
    )


def _add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend auto|tifffile|openslide``: the slide reader (checked by ``open_slide``)."""
    parser.add_argument(
        "--backend",
        default="auto",
        metavar="{auto,tifffile,openslide}",
        help="slide reader: auto (tifffile for the TIFF family it reads natively, OpenSlide for "
        "MIRAX, VMS/VMU, BIF, SCN, Philips and other vendor formats), tifffile or openslide "
        '(pip install "napari-stmap[openslide]"); default auto',
    )


def _add_precision(parser: argparse.ArgumentParser) -> None:
    """``--precision auto|fp32|bf16``: autocast dtype of dense models (default auto)."""
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="network precision: auto (bf16 where it was measured faster with the same "
        "accuracy, else fp32; see docs/benchmarks.md), fp32 or bf16 (autocast); default auto",
    )


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
