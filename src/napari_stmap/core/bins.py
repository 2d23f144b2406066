"""Bin-model (MagNet) predictions over a region of a slide, as values per bin and as a raster.

A bin model (``input_kind == "bins"``) answers at bin centres, not with a dense map
(:func:`~napari_stmap.core.model.magnet.predict_bins`). To show it, the slide is covered by a
regular lattice of square bins of side ``bin_um``, anchored at level-0 px (0, 0): bin
``(i, j)`` has its centre at level-0 px ``((i + ½)·b, (j + ½)·b)`` with ``b = bin_um / mpp``, so
predictions of different regions share one lattice and line up. The raster of a prediction
(:func:`~napari_stmap.core.model.magnet.bin_raster`) has one pixel per bin (NaN where no bin
was predicted) and its :class:`~napari_stmap.core.geometry.MapGrid` places it on the slide.

Bin size
--------
:func:`model_bin_um`: the side of the bin area the model's outputs refer to,
``√ metadata["training"]["spot_area_um2"]`` (the reference area of training: outputs need no
area scaling there, and it is the coarsest trained scale, so the cheapest); without that
record (an untrained model), :data:`DEFAULT_BIN_UM` (16 µm). Any other size can be asked for:
outputs are scaled by bin area / reference area (counts are additive).

Values follow the project's rule: counts (genes, then total) per bin are expected counts of
the bin's area; normalised expression is ``log1p(1e4 · gene / total)`` of each bin's counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stmap.core.errors import StmapInputError

if TYPE_CHECKING:
    from napari_stmap.core.geometry import MapGrid
    from napari_stmap.core.slide import Slide
    from napari_stmap.core.tiling import TissueMask

__all__ = [
    "DEFAULT_BIN_UM",
    "BinPrediction",
    "PredictionCancelled",
    "bin_lattice",
    "model_bin_um",
    "predict_bin_centres",
    "predict_bin_region",
]

#: Bin side (µm) for a bin model without a training record (``spot_area_um2``).
DEFAULT_BIN_UM = 16.0


class PredictionCancelled(Exception):  # noqa: N818 (not an error: the user asked for it)
    """Raised by :func:`predict_bin_region` when ``cancelled()`` turns true between chunks."""


@dataclass(frozen=True)
class BinPrediction:
    """Predicted expected counts of bins on a square lattice.

    Attributes
    ----------
    centers_yx : numpy.ndarray
        (n, 2) bin centres, level-0 px (y, x).
    counts : numpy.ndarray
        (n, G + 1) float64 expected counts per bin (genes, then total).
    output_names : list of str
        G gene names, then the total's name.
    bin_px : float
        Bin side (lattice pitch), level-0 px.
    mpp : float
        µm per level-0 px of the slide.
    """

    centers_yx: np.ndarray
    counts: np.ndarray
    output_names: list[str]
    bin_px: float
    mpp: float

    @property
    def n(self) -> int:
        """Number of bins."""
        return int(len(self.centers_yx))

    @property
    def bin_um(self) -> float:
        """Bin side, µm."""
        return self.bin_px * self.mpp

    @property
    def genes(self) -> list[str]:
        """Gene names (outputs without the total)."""
        return list(self.output_names[:-1])

    def values(self, gene: str, mode: str = "normalised") -> np.ndarray:
        """(n,) values of ``gene``: ``"absolute"`` counts or ``"normalised"`` log1p(1e4·g/total)."""
        from napari_stmap.core.aggregate import normalize_expression

        if gene not in self.output_names:
            msg = f"{gene!r} is not one of the model's outputs; pass one of {self.genes[:5]}…"
            raise StmapInputError(msg)
        g = self.output_names.index(gene)
        if mode == "absolute":
            return self.counts[:, g].astype(np.float64)
        if mode == "normalised":
            return normalize_expression(self.counts[:, [g]], self.counts[:, -1])[:, 0]
        msg = f"mode {mode!r}: use 'normalised' or 'absolute'"
        raise StmapInputError(msg)

    def raster(self, values: np.ndarray | None = None) -> tuple[np.ndarray, MapGrid]:
        """``values`` ((n,) or (n, C); default all counts) on a one-pixel-per-bin grid.

        Returns the (H, W) or (C, H, W) float32 raster, NaN where there is no bin, and its
        grid (level-0 px; napari ``scale = grid.pixel_px · mpp``, ``translate =
        grid.translate_yx · mpp`` in µm).
        """
        from napari_stmap.core.model.magnet import bin_raster

        v = self.counts if values is None else np.asarray(values)
        return bin_raster(self.centers_yx, v, self.bin_px)

    def gene_raster(self, gene: str, mode: str = "normalised") -> tuple[np.ndarray, MapGrid]:
        """(H, W) raster of :meth:`values` of ``gene`` and its grid."""
        return self.raster(self.values(gene, mode))

    def merged(self, newer: BinPrediction) -> BinPrediction:
        """Bins of both predictions (same lattice); ``newer`` wins where both have a bin."""
        if not math.isclose(newer.bin_px, self.bin_px) or newer.output_names != self.output_names:
            return newer
        c = np.concatenate([newer.centers_yx, self.centers_yx])
        v = np.concatenate([newer.counts, self.counts])
        key = np.floor(c / self.bin_px).astype(np.int64)
        _, first = np.unique(key, axis=0, return_index=True)
        first = np.sort(first)
        return BinPrediction(c[first], v[first], self.output_names, self.bin_px, self.mpp)

    def region_sums(self, footprints: Sequence[Any]) -> np.ndarray:
        """(n_fp, G + 1) counts summed over footprints (level-0 px), fractional bin coverage.

        A bin partly inside a footprint adds that fraction of its counts (the additive rule);
        a footprint touching a part of the lattice without prediction is NaN.
        """
        from napari_stmap.core.aggregate import aggregate

        raster, grid = self.raster()
        return aggregate(raster, grid, list(footprints))


def model_bin_um(model_or_meta: Any) -> float:
    """Bin side (µm) a bin model is shown at: √ of the training bin area, else 16 µm.

    ``model_or_meta``: a model (its ``metadata``) or a model file's metadata dict.
    """
    meta = model_or_meta if isinstance(model_or_meta, dict) else None
    if meta is None:
        meta = getattr(model_or_meta, "metadata", None) or {}
    area = (meta.get("training") or {}).get("spot_area_um2")
    if area is not None and math.isfinite(float(area)) and float(area) > 0:
        return math.sqrt(float(area))
    return DEFAULT_BIN_UM


def bin_lattice(
    bbox_yx: Sequence[float],
    bin_px: float,
    *,
    shape_yx: Sequence[int] | None = None,
    tissue: TissueMask | None = None,
) -> np.ndarray:
    """Centres (n, 2), level-0 px, of the lattice bins whose centre lies in ``bbox_yx``.

    The lattice is anchored at (0, 0) (bin (i, j) centred at ``((i + ½)·b, (j + ½)·b)``).
    ``shape_yx``: keep only bins that lie wholly on the slide; ``tissue``: only bins touching
    tissue.
    """
    if not (math.isfinite(bin_px) and bin_px > 0):
        msg = f"bin side {bin_px!r} px must be a positive number"
        raise StmapInputError(msg)
    y0, x0, y1, x1 = (float(v) for v in bbox_yx)
    if shape_yx is not None:
        h, w = (float(v) for v in shape_yx)
        y0, x0, y1, x1 = max(y0, 0.0), max(x0, 0.0), min(y1, h), min(x1, w)
        last = (math.floor(h / bin_px) - 1, math.floor(w / bin_px) - 1)
    else:
        last = (math.inf, math.inf)
    i0, j0 = max(math.ceil(y0 / bin_px - 0.5), 0), max(math.ceil(x0 / bin_px - 0.5), 0)
    i1 = min(math.ceil(y1 / bin_px - 0.5) - 1, last[0])
    j1 = min(math.ceil(x1 / bin_px - 0.5) - 1, last[1])
    if i1 < i0 or j1 < j0:
        return np.zeros((0, 2))
    ii, jj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="ij")
    centres = (np.stack([ii.ravel(), jj.ravel()], axis=1) + 0.5) * bin_px
    if tissue is not None and len(centres):
        half = bin_px / 2
        centres = centres[tissue.any_in(np.hstack([centres - half, centres + half]))]
    return centres


def predict_bin_region(
    model: Any,
    slide: Slide,
    bbox_yx: Sequence[float] | None = None,
    *,
    bin_um: float | None = None,
    tissue: TissueMask | None = None,
    device: Any = "cpu",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> BinPrediction:
    """Predict a bin model on the lattice bins of a region of the slide.

    Parameters
    ----------
    model : MagNet
        A bin model (``input_kind == "bins"``).
    slide : Slide
        The slide.
    bbox_yx : sequence of float, optional
        Level-0 px ``(y0, x0, y1, x1)``; None: the whole slide.
    bin_um : float, optional
        Bin side, µm (default :func:`model_bin_um`).
    tissue : TissueMask, optional
        Only bins touching tissue (e.g. :func:`~napari_stmap.core.tiling.tissue_mask`).
    device, batch_size
        As for :func:`~napari_stmap.core.model.magnet.predict_bins`.
    progress : callable, optional
        ``progress(done, total)`` over chunks of bins.
    cancelled : callable, optional
        Checked between chunks; when it returns True, :class:`PredictionCancelled` is raised.

    Returns
    -------
    BinPrediction
        Counts of each bin's area (``bin_um²``), genes then total.
    """
    b_um = model_bin_um(model) if bin_um is None else float(bin_um)
    bin_px = b_um / float(slide.mpp)
    box = (0.0, 0.0, *map(float, slide.shape_yx)) if bbox_yx is None else bbox_yx
    centres = bin_lattice(box, bin_px, shape_yx=slide.shape_yx, tissue=tissue)
    return predict_bin_centres(
        model,
        slide,
        centres,
        bin_um=b_um,
        device=device,
        batch_size=batch_size,
        progress=progress,
        cancelled=cancelled,
    )


def predict_bin_centres(
    model: Any,
    slide: Slide,
    centers_yx: np.ndarray,
    *,
    bin_um: float | None = None,
    areas_um2: np.ndarray | None = None,
    device: Any = "cpu",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> BinPrediction:
    """Predict a bin model at given centres (level-0 px), e.g. measured bins.

    ``areas_um2`` (n,): each bin's area (default ``bin_um²``); outputs are scaled by area /
    training area. ``bin_um`` is the raster pitch (default :func:`model_bin_um`). Other
    parameters as for :func:`predict_bin_region`.
    """
    from napari_stmap.core.model.magnet import predict_bins

    if getattr(model, "input_kind", None) != "bins":
        msg = f"{getattr(model, 'arch', '?')!r} is not a bin model (input_kind 'bins', e.g. magnet)"
        raise StmapInputError(msg)
    b_um = model_bin_um(model) if bin_um is None else float(bin_um)
    centres = np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)
    areas = np.full(len(centres), b_um**2) if areas_um2 is None else np.asarray(areas_um2, float)

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if cancelled is not None and cancelled():
            raise PredictionCancelled

    if cancelled is not None and cancelled():
        raise PredictionCancelled
    counts = predict_bins(
        model, slide, centres, areas_um2=areas, device=device, batch_size=batch_size, progress=step
    )
    names = list(getattr(model, "output_names", None) or [*model.genes, "total"])
    return BinPrediction(centres, counts, names, b_um / float(slide.mpp), float(slide.mpp))
