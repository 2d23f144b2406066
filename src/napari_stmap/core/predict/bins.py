"""Bin-model (MagNet) predictions over a slide: values per bin, a bin lattice, a raster.

A bin model (``input_kind == "bins"``) answers at bin centres, not with a dense map.
:func:`predict_bins` reads its inputs from the slide (each bin's view, and per context level
one tile per chunk of bins, or one crop per bin), runs the network in two passes (level
features chunk by chunk, then the graph over all bins) and scales the outputs to each bin's
area. :func:`predict_footprints` does the same at the centres of footprints.

To show it, the slide is covered by a regular lattice of square bins of side ``bin_um``,
anchored at level-0 px (0, 0): bin ``(i, j)`` has its centre at level-0 px
``((i + ½)·b, (j + ½)·b)`` with ``b = bin_um / mpp``, so predictions of different regions share
one lattice and line up. The raster of a prediction (:func:`bin_raster`) has one pixel per bin
(NaN where no bin was predicted) and its :class:`~napari_stmap.core.geometry.MapGrid` places it
on the slide.

Bin size
--------
:func:`model_bin_um`: the side of the bin area the model's outputs refer to,
``√ metadata["training"]["spot_area_um2"]`` (the reference area of training: outputs need no
area scaling there, and it is the coarsest trained scale, so the cheapest); without that
record (an untrained model), :data:`DEFAULT_BIN_UM` (16 µm). Any other size can be asked for:
outputs are scaled by bin area / reference area (counts are additive).

Values follow the project's rule: counts (genes, then total) per bin are expected counts of
the bin's area; normalised expression is ``log1p(1e4 · gene / total)`` of each bin's counts.
torch (and the network module) are imported when a prediction runs, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..aggregate import aggregate
from ..errors import StmapInputError
from ..geometry import MapGrid, turn_points
from ..io.slide import Slide, model_px_per_level0, read_at_mpp
from ..metrics import normalize_expression

if TYPE_CHECKING:
    import torch

    from ..model.magnet import MagNet
    from ..tiling import TissueMask

__all__ = [
    "DEFAULT_BIN_UM",
    "BinPrediction",
    "PredictionCancelled",
    "bin_lattice",
    "bin_raster",
    "model_bin_um",
    "predict_bin_centres",
    "predict_bin_region",
    "predict_bins",
    "predict_footprints",
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
        raster, grid = self.raster()
        return aggregate(raster, grid, list(footprints))


def model_bin_um(model_or_meta: Any) -> float:
    """Bin side (µm) a bin model is shown at: √ of the training bin area, else 16 µm.

    ``model_or_meta``: a model (its ``metadata``) or a model file's metadata dict.
    """
    area = _reference_area_um2(model_or_meta)
    return DEFAULT_BIN_UM if area is None else math.sqrt(area)


def _reference_area_um2(model_or_meta: Any) -> float | None:
    """Bin area (µm²) the model's outputs refer to (``training.spot_area_um2``), or None."""
    meta = model_or_meta if isinstance(model_or_meta, dict) else None
    if meta is None:
        meta = getattr(model_or_meta, "metadata", None) or {}
    area = (meta.get("training") or {}).get("spot_area_um2")
    if area is not None and math.isfinite(float(area)) and float(area) > 0:
        return float(area)
    return None


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
    model, slide, device, batch_size
        As for :func:`predict_bins` (a bin model, its slide, where and how many per pass).
    bbox_yx : sequence of float, optional
        Level-0 px ``(y0, x0, y1, x1)``; None: the whole slide.
    bin_um : float, optional
        Bin side, µm (default :func:`model_bin_um`).
    tissue : TissueMask, optional
        Only bins touching tissue (e.g. :func:`~napari_stmap.core.tiling.tissue_mask`).
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


# -------------------------------------------------------------- network inference
def predict_bins(
    model: MagNet,
    slide: Slide,
    centers_yx: np.ndarray,
    *,
    areas_um2: np.ndarray | None = None,
    device: Any = "cpu",
    batch_size: int = 64,
    chunk_um: float | None = None,
    shared_context: bool = True,
    tta: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Expected counts of bins centred at ``centers_yx``, context shared per chunk.

    Parameters
    ----------
    model : MagNet
        A bin model (``input_kind == "bins"``).
    slide : Slide
        The slide.
    centers_yx : numpy.ndarray
        (n, 2) bin centres, level-0 px (y, x). The kNN graph is built over all of them.
    areas_um2 : numpy.ndarray, optional
        (n,) bin areas (µm²): outputs are scaled by area / the training bin area
        (``model.metadata["training"]["spot_area_um2"]``); None: the training bin area.
    device : str or torch.device
        Where the network runs.
    batch_size : int
        Bin views (and, with ``shared_context=False``, context crops) per encoder pass.
    chunk_um : float, optional
        Bins are processed in squares of this side (µm; default 4 × the largest view). Each
        chunk's context tiles are read and encoded once and serve all its bins.
    shared_context : bool
        False: encode a crop of every context view of every bin (the per-bin crop path, as in
        the paper; slower, for comparison).
    tta : bool
        Average each bin's level features over the 8 turns and flips of its views and tiles
        (8 × the cost of pass 1).
    progress : callable, optional
        ``progress(done, total)`` over chunks.

    Returns
    -------
    numpy.ndarray
        (n, G + 1) float64 expected counts (genes, then total).

    Notes
    -----
    Pass 1 computes each bin's level features (bin view + context tokens + fusion) chunk by
    chunk; pass 2 runs graph attention, the Transformer and the head over the global kNN
    graph. A bin's output therefore does not depend on how bins are chunked, except through
    the context tile its chunk gives its views (see the module notes). Memory: (L + 1) · d
    floats per bin are held between the passes.
    """
    import torch

    from ..model.magnet import knn_graph

    centres = np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)
    n = len(centres)
    if n == 0:
        return np.zeros((0, model.num_outputs), dtype=np.float64)
    f0 = model_px_per_level0(slide, model.mpp)
    side = (chunk_um or 4.0 * max(model.config["views_um"])) / model.mpp
    cell = np.floor(centres / f0 / side).astype(np.int64)
    keys, group = np.unique(cell, axis=0, return_inverse=True)
    group = group.ravel()
    opts = {"device": device, "batch_size": max(int(batch_size), 1), "shared": shared_context}
    model.eval()
    z: list[torch.Tensor] = []
    with torch.inference_mode():
        for g in range(len(keys)):
            idx = np.flatnonzero(group == g)
            zg = _level_features(model, slide, centres[idx], tta=tta, **opts)
            if not z:
                z = [torch.zeros((n, t.shape[1]), dtype=torch.float32) for t in zg]
            for acc, part in zip(z, zg, strict=True):
                acc[torch.from_numpy(idx)] = part.float().cpu()
            if progress is not None:
                progress(g + 1, len(keys))
        out = _graph_head(model, z, knn_graph(centres, model.k), device, 4096)
    ref = _reference_area_um2(model)
    if areas_um2 is None or ref is None:  # the training bin area, or no record to scale by
        return out
    return out * (np.asarray(areas_um2, dtype=np.float64) / ref)[:, None]


def predict_footprints(
    model: MagNet, slide: Slide, footprints: Sequence[Any], *, batch_size: int = 64, **kw: Any
) -> np.ndarray:
    """:func:`predict_bins` at the centres of footprints (level-0 px), scaled by their areas.

    ``batch_size`` is raised to at least 32 views per pass. Other keywords go to
    :func:`predict_bins`.
    """
    boxes = np.array([fp.bbox_yx() for fp in footprints], dtype=np.float64).reshape(-1, 4)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    areas = np.array([fp.area_px() for fp in footprints], dtype=np.float64) * slide.mpp**2
    return predict_bins(
        model, slide, centres, areas_um2=areas, batch_size=max(int(batch_size), 32), **kw
    )


def _graph_head(
    model: MagNet, z: list[torch.Tensor], neighbours: np.ndarray, device: Any, rows: int
) -> np.ndarray:
    """Pass 2: graph attention over all bins (neighbours gathered from ``z``), head.

    ``z``: per-level features (n, d) of all bins (CPU); ``neighbours``: (n, k) kNN indices,
    -1 for none; ``rows``: bins per pass. Returns (n, G + 1) float64 counts (reference area).
    """
    import torch

    n = neighbours.shape[0]
    out = np.zeros((n, model.num_outputs), dtype=np.float64)
    for s in range(0, n, rows):
        core = np.arange(s, min(n, s + rows))
        nb = neighbours[core]
        extra = np.setdiff1d(nb[nb >= 0], core)
        members = np.concatenate([core, extra])
        local = np.full(n, -1, dtype=np.int64)
        local[members] = np.arange(len(members))
        lnb = np.full((len(members), nb.shape[1]), -1, dtype=np.int64)
        lnb[: len(core)] = np.where(nb >= 0, local[np.maximum(nb, 0)], -1)
        sel = torch.from_numpy(members)
        zl = [t[sel].to(device) for t in z]
        e, _ = model.graph(zl, torch.from_numpy(lnb).to(device))
        out[core] = model.head(e[: len(core)]).double().cpu().numpy()
    return out


@dataclass
class _Context:
    """Images of one context level for a chunk: one shared tile, or one crop per bin."""

    images: np.ndarray  # (m, s, s, 3) uint8
    positions: np.ndarray  # (n, 2) bin centres in their image, px
    image_of: np.ndarray  # (n,) image index of every bin


def _chunk_context(
    model: MagNet, slide: Slide, centres: np.ndarray, shared: bool
) -> list[_Context]:
    """Per context level, the images a chunk's bins read their context from."""
    from ..model.magnet import tile_box

    out = []
    for level, mpp in enumerate(model.context_mpp):
        pos = centres / model_px_per_level0(slide, mpp)
        p, n = model.context_px[level], len(centres)
        if shared:
            origin, side = tile_box(pos, p, model.context_margin_px(level), model.context_stride)
            tile = read_at_mpp(slide, tuple(origin), (side, side), mpp)
            tile = np.array(tile)[None]  # writable, for torch
            out.append(_Context(tile, pos - origin, np.zeros(n, dtype=np.int64)))
        else:
            crops = _crop_views(slide, pos, p, mpp)
            rel = pos - np.floor(pos - p / 2 + 0.5)
            out.append(_Context(crops, rel, np.arange(n)))
    return out


def _turn(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """(B, C, H, W) turned like :func:`~napari_stmap.core.geometry.turn_image`."""
    import torch

    x = torch.rot90(x, k, dims=(2, 3)) if k % 4 else x
    return torch.flip(x, dims=(3,)) if flip else x


def _level_features(
    model: MagNet,
    slide: Slide,
    centres: np.ndarray,
    *,
    device: Any,
    batch_size: int,
    shared: bool,
    tta: bool,
) -> list[torch.Tensor]:
    """Pass 1 for one chunk: per-level features ``[z_0, ..., z_L]`` (n, d) of its bins."""
    import torch

    c0 = centres / model_px_per_level0(slide, model.mpp)
    views = _crop_views(slide, c0, model.view_px, model.mpp)
    contexts = _chunk_context(model, slide, centres, shared)
    turns = [(k, f) for k in range(4) for f in (False, True)] if tta else [(0, False)]
    total: list[torch.Tensor] = []
    for k, flip in turns:
        h0 = torch.cat(
            [
                model.bin_features(_turn(model.preprocess(views[s : s + batch_size]), k, flip))
                for s in range(0, len(views), batch_size)
            ]
        )
        tokens = [
            _context_tokens(model, ctx, level, batch_size, k, flip)
            for level, ctx in enumerate(contexts)
        ]
        z = model.fuse(h0, tokens)
        total = z if not total else [a + b for a, b in zip(total, z, strict=True)]
    return [t / len(turns) for t in total]


def _context_tokens(
    model: MagNet, ctx: _Context, level: int, batch: int, k: int, flip: bool
) -> torch.Tensor:
    """Tokens (n, t², d) of one level: every image encoded once, its bins sampled from it."""
    import torch

    side = ctx.images.shape[1]
    pos = turn_points(ctx.positions, side, k, flip) if (k % 4 or flip) else ctx.positions
    rows, parts = [], []
    for s in range(0, len(ctx.images), batch):
        fmaps = model.context_map(_turn(model.preprocess(ctx.images[s : s + batch]), k, flip))
        for j in range(fmaps.shape[0]):
            sel = np.flatnonzero(ctx.image_of == s + j)
            rel = torch.as_tensor(pos[sel], dtype=torch.float32, device=fmaps.device)
            rows.append(sel)
            parts.append(model.context_tokens(fmaps[j : j + 1], rel, level))
    tok = torch.cat(parts)
    order = torch.from_numpy(np.concatenate(rows)).to(tok.device)
    return torch.zeros_like(tok).index_copy(0, order, tok)


def _crop_views(slide: Slide, c: np.ndarray, px: int, mpp: float) -> np.ndarray:
    """(n, px, px, 3) uint8 views centred on ``c`` (model px), cropped from one region read."""
    origins = np.floor(c - px / 2 + 0.5).astype(np.int64)
    lo = origins.min(axis=0)
    hi = origins.max(axis=0) + px
    region = read_at_mpp(slide, tuple(lo), tuple(int(v) for v in hi - lo), mpp)
    rel = origins - lo
    return np.stack([region[y : y + px, x : x + px] for y, x in rel])


# ------------------------------------------------------------------------ display
def bin_raster(
    centers_yx: np.ndarray, values: np.ndarray, bin_px: float
) -> tuple[np.ndarray, MapGrid]:
    """Put per-bin values on an image grid of one pixel per bin (for a napari image layer).

    Parameters
    ----------
    centers_yx : numpy.ndarray
        (n, 2) bin centres, level-0 px (y, x), on a square lattice of pitch ``bin_px``.
    values : numpy.ndarray
        (n,) or (n, C) values per bin (e.g. :func:`predict_bins` output).
    bin_px : float
        Bin side (lattice pitch), level-0 px.

    Returns
    -------
    raster : numpy.ndarray
        (C, H, W) float32 (or (H, W) for 1-D ``values``); NaN where there is no bin.
    grid : MapGrid
        Where the raster lies (``pixel_px = bin_px``): napari ``scale`` / ``translate`` as for
        dense maps.
    """
    c = np.asarray(centers_yx, dtype=np.float64).reshape(-1, 2)
    v = np.asarray(values, dtype=np.float32)
    flat = v.ndim == 1
    v = v.reshape(len(c), -1)
    first = c.min(axis=0) if len(c) else np.zeros(2)
    ij = np.rint((c - first) / bin_px).astype(np.int64)
    h, w = (ij.max(axis=0) + 1).tolist() if len(c) else (0, 0)
    raster = np.full((v.shape[1], h, w), np.nan, dtype=np.float32)
    raster[:, ij[:, 0], ij[:, 1]] = v.T
    grid = MapGrid(tuple(first - bin_px / 2), float(bin_px), (h, w))
    return (raster[0] if flat else raster), grid
