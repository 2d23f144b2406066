"""A synthetic sample on disk: :class:`SyntheticSample`, :func:`load_synthetic`, the files a
sample owns (cleared before an overwrite) and the progress counter the writers share."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stmap import __version__
from napari_stmap.core.errors import StmapInputError

_PACKAGE_VERSION: str = __version__  # written into synthetic.json and the count matrices
_FILES = ("he.ome.tif", "synthetic.json")
_FOLDERS = ("outs", "truth.zarr", ".pyramid.tmp.zarr")


@dataclass(frozen=True)
class SyntheticSample:
    """Paths and metadata of a synthetic sample written by :func:`write_synthetic`.

    Attributes
    ----------
    root : Path
        Folder of the sample.
    slide : Path
        ``root/"he.ome.tif"``, the pyramidal H&E slide.
    outs : Path
        ``root/"outs"``, Space Ranger layout (``binned_outputs/square_XXXum``).
    truth : Path
        ``root/"truth.zarr"``, expression truth on a 2 µm grid.
    mpp : float
        µm per level-0 pixel.
    genes : tuple of str
        Gene names, in the order of the count matrices.
    bin_sizes_um : tuple of float
        Side of the square bins written, in µm.
    seed : int
        Seed the sample was generated from.
    """

    root: Path
    slide: Path
    outs: Path
    truth: Path
    mpp: float
    genes: tuple[str, ...]
    bin_sizes_um: tuple[float, ...]
    seed: int

    @property
    def metadata(self) -> dict[str, Any]:
        """Content of ``root/"synthetic.json"`` (read on each access)."""
        return json.loads((self.root / "synthetic.json").read_text())


def load_synthetic(root: str | Path) -> SyntheticSample:
    """Open a sample written by :func:`write_synthetic` (reads ``root/"synthetic.json"``).

    Raises
    ------
    StmapInputError
        When ``root`` holds no ``synthetic.json``.
    """
    root = Path(root)
    meta_path = root / "synthetic.json"
    if not meta_path.is_file():
        msg = f"{root} is not a synthetic sample (no synthetic.json); write one with write_synthetic() or `stmap synth`"
        raise StmapInputError(msg)
    meta = json.loads(meta_path.read_text())
    return SyntheticSample(
        root=root,
        slide=root / meta["slide"],
        outs=root / meta["outs"],
        truth=root / meta["truth"],
        mpp=float(meta["mpp"]),
        genes=tuple(g["name"] for g in meta["genes"]),
        bin_sizes_um=tuple(float(b) for b in meta["bin_sizes_um"]),
        seed=int(meta["seed"]),
    )


def _clear_sample(root: Path) -> None:
    """Remove the files a previous write_synthetic left in ``root`` (and nothing else)."""
    if not root.is_dir():
        msg = f"{root} is a file, not a folder; choose another output path"
        raise StmapInputError(msg)
    for name in _FILES:
        (root / name).unlink(missing_ok=True)
    for name in _FOLDERS:
        if (root / name).exists():
            shutil.rmtree(root / name)


class _Progress:
    """Counts steps and forwards ``(done, total)`` to the user's callback."""

    def __init__(self, callback: Callable[[int, int], None] | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total)
