"""The :class:`Spots` container: measured spots or bins of one section, in level-0 px (y, x)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ...errors import StmapInputError
from ._checks import bbox_text, points_outside, swap_fits, swap_fix, warn_input


@dataclass
class Spots:
    """Measured spots or bins of one section, in level-0 pixels of the full-resolution slide.

    Attributes
    ----------
    centers_yx : np.ndarray
        ``(n_spots, 2)`` float64 spot centres, level-0 px of the full-resolution image, (y, x).
    footprint : str
        ``"disk"`` (Visium, legacy ST) or ``"square"`` (Visium HD bins).
    size_px : float
        Disk diameter or square side in level-0 px (NaN when µm/px is unknown).
    size_um : float
        Disk diameter or square side in µm.
    mpp : float or None
        µm per full-resolution px, derived from the scale factors; None if unknowable.
    counts : scipy.sparse.csr_matrix
        ``(n_spots, n_genes)`` raw counts; row i is ``barcodes[i]``, column j is ``genes[j]``.
    genes, gene_ids : np.ndarray
        ``(n_genes,)`` gene symbols and ids (Ensembl ids when available, else the symbols).
    barcodes : np.ndarray
        ``(n_spots,)`` spot barcodes.
    bin_um : float
        Nominal spot size, µm: HD bin size, 55 (Visium), 100 (legacy ST).
    pitch_um : float or None
        Centre-to-centre step of the grid in µm, when known.
    in_tissue : np.ndarray
        ``(n_spots,)`` bool, Space Ranger's tissue call (all True when the source has none).
    array_rc : np.ndarray or None
        ``(n_spots, 2)`` int grid (array_row, array_col), when known.
    library_id : str
        Sample / library name.
    scalefactors : dict
        Content of ``scalefactors_json.json`` (or ``uns['spatial'][lib]['scalefactors']``).
    image_paths : dict of str to Path
        ``{"hires": ..., "lowres": ...}`` Space Ranger PNGs that are present.
    images : dict of str to np.ndarray
        Loaded images, (y, x, 3) RGB uint8; filled by :meth:`load_image` (h5ad: at read time).
    source : Path
        File or folder the spots were read from.
    """

    centers_yx: np.ndarray
    footprint: str
    size_px: float
    size_um: float
    mpp: float | None
    counts: sp.csr_matrix
    genes: np.ndarray
    gene_ids: np.ndarray
    barcodes: np.ndarray
    bin_um: float
    pitch_um: float | None
    in_tissue: np.ndarray
    array_rc: np.ndarray | None
    library_id: str
    scalefactors: dict = field(default_factory=dict)
    image_paths: dict[str, Path] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    source: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        self.centers_yx = np.asarray(self.centers_yx, dtype=np.float64).reshape(-1, 2)
        self.counts = sp.csr_matrix(self.counts)
        self.genes = np.asarray(self.genes, dtype=str)
        self.gene_ids = np.asarray(self.gene_ids, dtype=str)
        self.barcodes = np.asarray(self.barcodes, dtype=str)
        self.in_tissue = np.asarray(self.in_tissue, dtype=bool)
        if self.array_rc is not None:
            self.array_rc = np.asarray(self.array_rc, dtype=np.int64).reshape(-1, 2)
        self.source = Path(self.source)
        if self.footprint not in ("disk", "square"):
            msg = f"footprint must be 'disk' or 'square', got {self.footprint!r}"
            raise ValueError(msg)
        n, g = self.counts.shape
        lengths = {
            "centers_yx": len(self.centers_yx),
            "barcodes": len(self.barcodes),
            "in_tissue": len(self.in_tissue),
        }
        if self.array_rc is not None:
            lengths["array_rc"] = len(self.array_rc)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad or len(self.genes) != g or len(self.gene_ids) != g:
            msg = f"Spots: counts is {n}×{g} but lengths are {lengths}, genes {len(self.genes)}"
            raise ValueError(msg)

    @property
    def n_spots(self) -> int:
        """Number of spots (rows of ``counts``)."""
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of genes (columns of ``counts``)."""
        return int(self.counts.shape[1])

    def __repr__(self) -> str:
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g}"
        return (
            f"Spots({self.library_id!r}: {self.n_spots} spots × {self.n_genes} genes, "
            f"{self.footprint} {self.size_um:g} µm = {self.size_px:.4g} px, mpp {mpp}, "
            f"images {sorted(set(self.images) | set(self.image_paths))})"
        )

    def image_scale(self, kind: str) -> float:
        """Scale factor ``tissue_{kind}_scalef``: image px per full-resolution px.

        Parameters
        ----------
        kind : str
            ``"hires"`` or ``"lowres"``.
        """
        key = f"tissue_{kind}_scalef"
        value = self.scalefactors.get(key)
        if value is None:
            have = sorted(k for k in self.scalefactors if k.endswith("_scalef"))
            msg = (
                f"{self.source}: no {key} in the scale factors (have {have}); use one of those "
                "images"
            )
            raise StmapInputError(msg)
        return float(value)

    def load_image(self, kind: str) -> np.ndarray:
        """Return the ``kind`` image (``"hires"``/``"lowres"``) as (y, x, 3) RGB uint8.

        Space Ranger PNGs are read on first use and cached in :attr:`images`.
        """
        if kind in self.images:
            return self.images[kind]
        path = self.image_paths.get(kind)
        if path is None:
            have = sorted(set(self.images) | set(self.image_paths))
            msg = f"{self.source}: no {kind} image (have {have}); pick one of those"
            raise StmapInputError(msg)
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as err:
            msg = (
                f"{path}: cannot read the {kind} image ({err}); re-copy it from Space Ranger "
                "outs/spatial/"
            )
            raise StmapInputError(msg) from err
        self.images[kind] = arr
        return arr

    def image_shape_yx(self, kind: str) -> tuple[int, int] | None:
        """(height, width) px of the ``kind`` image without decoding it; None when absent."""
        if kind in self.images:
            return tuple(int(v) for v in self.images[kind].shape[:2])  # type: ignore[return-value]
        path = self.image_paths.get(kind)
        if path is None:
            return None
        from PIL import Image

        try:
            with Image.open(path) as im:
                width, height = im.size
        except OSError:
            return None
        return int(height), int(width)

    def fullres_shape_yx_estimate(self) -> tuple[int, int] | None:
        """Full-resolution image size (height, width) px from the hires/lowres image and scalef.

        Prefers the hires image (more precise). None when no image with a scale factor exists.
        """
        for kind in ("hires", "lowres"):
            shape = self.image_shape_yx(kind)
            scale = self.scalefactors.get(f"tissue_{kind}_scalef")
            if shape is not None and scale:
                return round(shape[0] / float(scale)), round(shape[1] / float(scale))
        return None

    def subset(self, mask_or_index: Any) -> Spots:
        """Return the spots selected by a boolean mask or an integer index (order kept)."""
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            if idx.shape != (self.n_spots,):
                msg = f"subset: boolean mask has shape {idx.shape}, expected ({self.n_spots},)"
                raise ValueError(msg)
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).ravel()
        return replace(
            self,
            centers_yx=self.centers_yx[idx],
            counts=self.counts[idx],
            barcodes=self.barcodes[idx],
            in_tissue=self.in_tissue[idx],
            array_rc=None if self.array_rc is None else self.array_rc[idx],
            scalefactors=dict(self.scalefactors),
            image_paths=dict(self.image_paths),
            images=dict(self.images),
        )

    def check_against_image(
        self, shape_yx: tuple[int, ...], *, name: str = "slide", mpp: float | None = None
    ) -> None:
        """Check that the spots lie on an image of ``shape_yx`` (level-0 px, (y, x, ...)).

        Raises :class:`StmapInputError` when more than half of the in-tissue spots (all spots
        when none is flagged) fall outside the image, suggesting an (x, y) swap when the
        swapped positions fit. Warns (:class:`StmapInputWarning`) when some spots, including
        off-tissue ones, fall outside, and when ``mpp`` (the image's µm/px) disagrees with
        the spots' by more than 10 %.
        """
        self._check_mpp(mpp, name)
        if self.n_spots == 0:
            return
        shape = (int(shape_yx[0]), int(shape_yx[1]))
        basis = self.in_tissue if self.in_tissue.any() else np.ones(self.n_spots, bool)
        outside = points_outside(self.centers_yx, shape)
        n_out, n = int(outside[basis].sum()), int(basis.sum())
        where = f"the {name} ({shape[0]}×{shape[1]} px, y×x)"
        span = bbox_text(self.centers_yx[basis])
        if 2 * n_out > n:
            if swap_fits(self.centers_yx[basis], shape, n_out):
                msg = (
                    f"{self.source}: {n_out} of {n} spots fall outside {where} (spots span {span}) "
                    f"but fit with x and y swapped: the positions' x and y are exchanged; "
                    f"{swap_fix(self.source)}"
                )
                raise StmapInputError(msg)
            msg = (
                f"{self.source}: {n_out} of {n} spots fall outside {where} (spots span {span}): "
                f"wrong image, a lower-resolution level, or (x, y) swapped; use the "
                f"full-resolution image these spots were registered to"
            )
            raise StmapInputError(msg)
        if outside.any():
            msg = (
                f"{self.source}: {int(outside.sum())} of {self.n_spots} spots ({n_out} in tissue) "
                f"lie outside {where}; spots span {span}. Off-tissue Visium HD bins may do so "
                f"legitimately; otherwise check that this is the image Space Ranger was run on"
            )
            warn_input(msg)

    def _check_mpp(self, mpp: float | None, name: str) -> None:
        """Warn when the image's µm/px and the spots' µm/px disagree by more than 10 %."""
        if mpp is None or self.mpp is None or not mpp > 0:
            return
        ratio = float(mpp) / self.mpp
        if abs(ratio - 1.0) > 0.10:
            msg = (
                f"{self.source}: the {name} is at {mpp:.4g} µm/px but the spots' scale factors "
                f"give {self.mpp:.4g} µm/px (ratio {ratio:.3g}): spot positions are in px of the "
                f"full-resolution image Space Ranger saw; use that image (or level) instead"
            )
            warn_input(msg)
