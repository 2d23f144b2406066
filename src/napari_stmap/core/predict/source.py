"""One interface to a prediction, whether a dense map in a store or a bin model's bins.

Docks, ``stmap aggregate`` and the comparison with measured data ask a prediction the same
questions: which genes, the expected counts of some regions, a gene's raster, the values of
measured units. :class:`PredictionSource` is that interface; :class:`StoreSource` answers it
from a dense model's :class:`~napari_stmap.core.store.PredictionStore` (predicting missing
tiles on demand through :func:`~napari_stmap.core.predict.predictor.ensure_region`) and
:class:`BinSource` from a bin model's :class:`~napari_stmap.core.predict.bins.BinPrediction`
(MagNet). :func:`as_source` wraps whichever object a caller holds.

Units and conventions (both sources)
------------------------------------
- Positions, boxes and footprints are level-0 px of the slide, axis order (y, x); boxes are
  ``bbox_yx = (y0, x0, y1, x1)``.
- Counts are expected counts (genes in :attr:`~PredictionSource.genes` order, then the
  ``"total"`` channel: G + 1 columns), summed over each footprint by the additive rule: a map
  pixel (dense) or a bin (bins) partly inside a footprint adds that fraction of its counts.
- Rasters are (h, w) float32, rows then columns (y, x), placed on the slide by a
  :class:`~napari_stmap.core.geometry.MapGrid` (origin and pixel side in level-0 px; napari
  ``scale = grid.pixel_px · mpp`` and ``translate = grid.translate_yx · mpp`` in µm).
  ``"normalised"`` values are ``log1p(1e4 · gene / total)`` (after summing, at coarser
  levels), ``"absolute"`` ones counts per level-0 raster pixel (the mean at coarser levels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..aggregate import aggregate
from ..geometry import Footprint, MapGrid, Region, weight_matrix
from ..measured import Measured, Units
from ..store import PredictionStore
from .bins import BinPrediction, model_bin_um
from .predictor import Predictor, ensure_region
from .spots import spot_footprints
from .units import predict_units
from .views import as_store, check_mode, gene_view, normalised_map, pool_blocks, view_grid

__all__ = [
    "BinSource",
    "PredictionSource",
    "StoreSource",
    "as_source",
    "combine_parts",
    "region_parts",
]

Progress = Callable[[int, int], Any] | None


@runtime_checkable
class PredictionSource(Protocol):
    """What docks, ``stmap aggregate`` and Compare ask of a prediction (dense or bins).

    See the module notes for units (level-0 px, (y, x)) and value modes.
    """

    @property
    def genes(self) -> list[str]:
        """The model's G gene names, in output order."""
        ...

    @property
    def output_names(self) -> list[str]:
        """The G genes, then ``"total"`` (the columns of :meth:`region_sums`)."""
        ...

    def region_sums(self, regions: Any, *, progress: Progress = None) -> np.ndarray:
        """Expected counts ``(n, G + 1)`` float64 summed over regions or footprints.

        Parameters
        ----------
        regions : sequence of Region, sequence of Footprint, Footprint or Spots-like
            Level-0 px. A :class:`~napari_stmap.core.geometry.Region` gives one row (its
            parts added with their signs: holes subtract); a footprint one row; Spots-like
            objects (``centers_yx``, ``footprint``, ``size_px``) one row per spot.
        progress : callable, optional
            ``progress(done, total)`` in the source's steps (blocks of regions, or one).

        Returns
        -------
        numpy.ndarray
            ``(n, G + 1)`` float64 counts, genes then total, by the additive rule; NaN where a
            footprint reaches what the source has no value for (see each source).
        """
        ...

    def gene_raster(
        self,
        gene: str,
        *,
        mode: str = "normalised",
        bbox_yx: Sequence[float] | None = None,
        level: int = 0,
    ) -> tuple[np.ndarray, MapGrid]:
        """One gene's raster ``(h, w)`` float32 and its grid (level-0 px).

        Parameters
        ----------
        gene : str
            A gene name or ``"total"``.
        mode : {"normalised", "absolute"}
            ``log1p(1e4 · gene / total)`` or counts per raster pixel.
        bbox_yx : (y0, x0, y1, x1), optional
            Only the raster pixels overlapping this level-0 px box (default: all).
        level : int
            Pyramid level: pixels of ``2**level × 2**level`` level-0 raster pixels (sums
            normalised after summing; absolute values are block means).

        Returns
        -------
        raster : numpy.ndarray
            ``(h, w)`` float32, (y, x); NaN where nothing is predicted.
        grid : MapGrid
            Where ``raster`` lies.
        """
        ...

    def unit_predictions(
        self, measured: Measured, units: dict[str, Units], *, progress: Progress = None
    ) -> dict[str, np.ndarray]:
        """Predicted counts of measured units, per scale key, as Compare scores them.

        Parameters
        ----------
        measured : Measured
            :func:`~napari_stmap.core.measured.load_measured`'s result (restricted to the
            genes being compared).
        units : dict of str to Units
            ``measured.units(...)`` per scale key (µm, as text).
        progress : callable, optional
            ``progress(done, total)`` while predicting.

        Returns
        -------
        dict of str to numpy.ndarray
            Per key, ``(n_units, G + 1)`` expected counts in model gene order, total last:
            the ``predict`` argument of :func:`~napari_stmap.core.evaluate.evaluate_measured`.
        """
        ...


# ================================================================================ regions
def region_parts(regions: Sequence[Region]) -> tuple[list[Footprint], np.ndarray, np.ndarray]:
    """All parts of ``regions`` as ``(footprints, signs (n,), groups (n,))``.

    ``groups[i]`` is the index of the region part ``i`` belongs to; see :func:`combine_parts`.
    """
    fps = [fp for r in regions for fp, _ in r.parts]
    signs = np.array([s for r in regions for _, s in r.parts], dtype=np.float64)
    groups = np.array([k for k, r in enumerate(regions) for _ in r.parts], dtype=np.int64)
    return fps, signs, groups


def combine_parts(
    values: np.ndarray, signs: np.ndarray, groups: np.ndarray, n_groups: int
) -> np.ndarray:
    """Per-region sums ``(n_groups, C)`` of per-part sums ``values`` (n_parts, C).

    Each part adds ``sign · value`` to its group (holes subtract); NaN parts make NaN regions.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values.reshape(len(signs), values.shape[-1] if values.size == 0 else -1)
    out = np.zeros((n_groups, values.shape[1]), dtype=np.float64)
    np.add.at(out, np.asarray(groups), values * np.asarray(signs, dtype=np.float64)[:, None])
    return out


def _summed(
    regions: Any, n_out: int, footprint_sums: Callable[[list[Footprint]], np.ndarray]
) -> np.ndarray:
    """Rows of ``regions`` (Regions: parts combined) from per-footprint sums."""
    items = list(regions) if isinstance(regions, (list, tuple)) else None
    if items and all(isinstance(r, Region) for r in items):
        fps, signs, groups = region_parts(items)
        return combine_parts(footprint_sums(fps), signs, groups, len(items))
    fps = [] if items == [] else spot_footprints(regions)
    if not fps:
        return np.zeros((0, n_out), dtype=np.float64)
    return np.asarray(footprint_sums(fps), dtype=np.float64)


def _bboxes(fps: Sequence[Footprint]) -> np.ndarray:
    return np.array([fp.bbox_yx() for fp in fps], dtype=np.float64).reshape(-1, 4)


def _spatial_blocks(fps: Sequence[Footprint], block_px: float) -> list[np.ndarray]:
    """Indices of ``fps`` grouped by the ``block_px`` square their centre lies in."""
    boxes = _bboxes(fps)
    keys = np.floor((boxes[:, :2] + boxes[:, 2:]) / 2 / block_px).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    _, starts = np.unique(keys[order], axis=0, return_index=True)
    return np.split(order, starts[1:]) if len(order) else []


def _union_bbox(fps: Sequence[Footprint]) -> tuple[float, float, float, float]:
    boxes = _bboxes(fps)
    return (
        float(boxes[:, 0].min()),
        float(boxes[:, 1].min()),
        float(boxes[:, 2].max()),
        float(boxes[:, 3].max()),
    )


def _crop_level(
    counts: np.ndarray, grid: MapGrid, mode: str, bbox_yx: Sequence[float] | None, level: int
) -> tuple[np.ndarray, MapGrid]:
    """(gene[, total]) counts ``(k, H, W)`` on ``grid`` -> one mode's raster, cropped, pooled."""
    if bbox_yx is not None:
        box = tuple(float(v) for v in bbox_yx)
        rs, cs = grid.crop_slices(box)
        counts, grid = counts[:, rs, cs], grid.crop(box)
    k = 2 ** int(level)
    if k > 1:
        counts = pool_blocks(counts, k, "mean" if mode == "absolute" else "sum")
        h, w = grid.shape_hw
        grid = MapGrid(grid.origin_yx, grid.pixel_px * k, (-(-h // k), -(-w // k)))
    if mode == "absolute":
        return counts[0].astype(np.float32, copy=False), grid
    return normalised_map(counts[0], counts[1]), grid


# ============================================================================ both sources
class _Source:
    """The public methods both sources share, over two hooks each source implements.

    ``_footprint_sums(fps, progress)``: counts ``(n, G + 1)`` of a list of footprints;
    ``_raster(gene, mode, bbox_yx, level)``: one gene's raster and grid (``mode`` checked).
    """

    output_names: list[str]

    def region_sums(self, regions: Any, *, progress: Progress = None) -> np.ndarray:
        """Counts ``(n, G + 1)`` of regions or footprints (see :class:`PredictionSource`).

        Regions' parts are combined with their signs; the footprints are summed by the
        source's ``_footprint_sums`` (see each source).
        """
        n_out = len(self.output_names)
        return _summed(regions, n_out, lambda fps: self._footprint_sums(fps, progress))

    def gene_raster(
        self,
        gene: str,
        *,
        mode: str = "normalised",
        bbox_yx: Sequence[float] | None = None,
        level: int = 0,
    ) -> tuple[np.ndarray, MapGrid]:
        """One gene's raster ``(h, w)`` float32 and its grid (see :class:`PredictionSource`).

        Refuses a mode other than ``"normalised"`` / ``"absolute"``; the raster comes from
        the source's ``_raster`` (see each source).
        """
        check_mode(mode)
        return self._raster(gene, mode, bbox_yx, level)

    def _footprint_sums(self, fps: list[Footprint], progress: Progress) -> np.ndarray:
        raise NotImplementedError

    def _raster(
        self, gene: str, mode: str, bbox_yx: Sequence[float] | None, level: int
    ) -> tuple[np.ndarray, MapGrid]:
        raise NotImplementedError


# =========================================================================== dense stores
class StoreSource(_Source):
    """A dense model's prediction: a store, with tiles predicted on demand.

    Parameters
    ----------
    source : Predictor, PredictionStore or path of a store
        With a :class:`~napari_stmap.core.predict.predictor.Predictor` its threads predict
        missing tiles; with a store (or path) a temporary predictor does (see
        :func:`~napari_stmap.core.predict.predictor.ensure_region`).
    model, device, batch_size
        For that temporary predictor (model: when the store does not record its file;
        ``batch_size`` None: chosen for the device, see
        :class:`~napari_stmap.core.predict.predictor.Predictor`).
    timeout : float, optional
        Seconds to wait for the tiles one block of regions needs.
    background : float
        Counts of tiles skipped as off-tissue: NaN (default, as the viewer shows them) or 0
        (``stmap aggregate``: no tissue, no transcripts).
    block_px : float
        Regions are summed in spatial blocks of this many level-0 px, so memory is bounded by
        one block's map.
    """

    def __init__(
        self,
        source: Any,
        *,
        model: Any = None,
        device: str = "cpu",
        batch_size: int | None = None,
        timeout: float | None = None,
        background: float = np.nan,
        block_px: float = 4096.0,
    ) -> None:
        self.store = as_store(source)
        self._target = source if isinstance(source, Predictor) else self.store
        self.model, self.device, self.batch_size = model, device, batch_size
        self.timeout, self.background, self.block_px = timeout, float(background), block_px

    def __repr__(self) -> str:
        return f"StoreSource({self.store.path}, {len(self.genes)} genes)"

    @property
    def genes(self) -> list[str]:
        """The model's G gene names, in output order."""
        return list(self.store.genes)

    @property
    def output_names(self) -> list[str]:
        """The G genes, then ``"total"``."""
        return list(self.store.output_names)

    def ensure_region(self, bbox_yx: Sequence[float]) -> tuple[np.ndarray, MapGrid]:
        """The dense map ``(G + 1, h, w)`` of a level-0 px box, predicting missing tiles first."""
        return ensure_region(
            self._target,
            bbox_yx,
            background=self.background,
            timeout=self.timeout,
            model=self.model,
            device=self.device,
            batch_size=self.batch_size,
        )

    def _footprint_sums(self, fps: list[Footprint], progress: Progress) -> np.ndarray:
        """Counts ``(n, G + 1)`` of footprints, summed block by block (``block_px``).

        Tiles a block needs are predicted first; a footprint on skipped tiles adds
        ``background``. ``progress(done, total)`` counts blocks.
        """
        out = np.zeros((len(fps), len(self.output_names)), dtype=np.float64)
        blocks = _spatial_blocks(fps, self.block_px)
        for k, idx in enumerate(blocks):
            part = [fps[i] for i in idx]
            dense, grid = self.ensure_region(_union_bbox(part))
            out[idx] = aggregate(dense, grid, weight_matrix(part, grid))
            if progress is not None:
                progress(k + 1, len(blocks))
        return out

    def _raster(
        self, gene: str, mode: str, bbox_yx: Sequence[float] | None, level: int
    ) -> tuple[np.ndarray, MapGrid]:
        """A gene's raster from the store as it is.

        The network never runs: NaN where tiles are not predicted yet, ``background`` on
        skipped ones. Levels as :func:`~napari_stmap.core.predict.views.gene_view`.
        """
        view = gene_view(self.store, gene, mode=mode, level=level, background=self.background)
        grid = view_grid(self.store, level)
        if bbox_yx is not None:
            box = tuple(float(v) for v in bbox_yx)
            rs, cs = grid.crop_slices(box)
            view, grid = view[rs, cs], grid.crop(box)
        return np.asarray(view.compute(scheduler="threads"), dtype=np.float32), grid

    def unit_predictions(
        self, measured: Measured, units: dict[str, Units], *, progress: Progress = None
    ) -> dict[str, np.ndarray]:
        """Counts of measured units from the store (see :class:`PredictionSource`).

        The map is summed over the units' footprints; units made of measured bins
        (``members``) are sums of the base bins' values (the additive rule), so the base bins
        are summed once. The network runs only for tiles the store lacks.
        """
        out: dict[str, np.ndarray] = {}
        base = None
        for key, u in units.items():
            if u.n == 0:
                out[key] = np.zeros((0, len(self.output_names)))
            elif u.members is not None:
                if base is None:
                    base = self.region_sums(spot_footprints(measured.spots), progress=progress)
                out[key] = np.asarray(u.members @ base)
            else:
                out[key] = self.region_sums(spot_footprints(u), progress=progress)
        return out


# =================================================================================== bins
class BinSource(_Source):
    """A bin model's prediction (MagNet): bins on a lattice, and the model for new centres.

    Parameters
    ----------
    prediction : BinPrediction, optional
        The bins predicted so far (None: none yet; sums are then NaN).
    model : MagNet, optional
        The bin model: needed by :meth:`unit_predictions` (which predicts at the units'
        centres, as ``stmap evaluate`` does) and for the genes without a prediction.
    slide : Slide, optional
        The slide ``model`` predicts on (for :meth:`unit_predictions`).
    device : str
        Where :meth:`unit_predictions` runs the model.
    """

    def __init__(
        self,
        prediction: BinPrediction | None = None,
        *,
        model: Any = None,
        slide: Any = None,
        device: str = "cpu",
    ) -> None:
        if prediction is None and model is None:
            msg = "BinSource needs a BinPrediction or the bin model (for its genes)"
            raise ValueError(msg)
        self.prediction, self.model, self.slide, self.device = prediction, model, slide, device

    def __repr__(self) -> str:
        n = 0 if self.prediction is None else self.prediction.n
        return f"BinSource({n} bins, {len(self.genes)} genes)"

    @property
    def genes(self) -> list[str]:
        """The model's G gene names, in output order."""
        if self.prediction is not None:
            return self.prediction.genes
        return list(self.model.genes)

    @property
    def output_names(self) -> list[str]:
        """The G genes, then ``"total"``."""
        if self.prediction is not None:
            return list(self.prediction.output_names)
        return list(getattr(self.model, "output_names", None) or [*self.model.genes, "total"])

    def _footprint_sums(self, fps: list[Footprint], progress: Progress) -> np.ndarray:
        """Counts ``(n, G + 1)`` of footprints from the predicted bins; no network run.

        Each bin partly inside a footprint adds that fraction of its counts
        (:meth:`~napari_stmap.core.predict.bins.BinPrediction.region_sums`); a footprint
        reaching lattice bins without a prediction inside the predicted bins' extent is NaN,
        one wholly outside that extent 0; without any prediction all are NaN. ``progress``
        gets ``(1, 1)``.
        """
        if self.prediction is None:
            return np.full((len(fps), len(self.output_names)), np.nan)
        out = self.prediction.region_sums(fps)
        if progress is not None:
            progress(1, 1)
        return out

    def _raster(
        self, gene: str, mode: str, bbox_yx: Sequence[float] | None, level: int
    ) -> tuple[np.ndarray, MapGrid]:
        """A gene's raster, one pixel per bin.

        Without a prediction: one NaN pixel of the model's bin size at the origin.
        """
        pred = self.prediction
        if pred is None:
            side = model_bin_um(self.model) / float(getattr(self.slide, "mpp", 1.0) or 1.0)
            return np.full((1, 1), np.nan, np.float32), MapGrid((0.0, 0.0), side, (1, 1))
        if bbox_yx is None and level == 0:
            raster, grid = pred.gene_raster(gene, mode)
            return raster.astype(np.float32, copy=False), grid
        pred.values(gene, "absolute")  # refuses an unknown gene by name
        cols = [pred.output_names.index(gene), len(pred.output_names) - 1]
        counts, grid = pred.raster(pred.counts[:, cols])
        return _crop_level(counts, grid, mode, bbox_yx, level)

    def unit_predictions(
        self, measured: Measured, units: dict[str, Units], *, progress: Progress = None
    ) -> dict[str, np.ndarray]:
        """Counts of measured units, the model run at their centres (see :class:`PredictionSource`).

        The same predictions as ``stmap evaluate``
        (:func:`~napari_stmap.core.predict.units.predict_units`), not sums of the lattice bins.
        """
        if self.model is None or self.slide is None:
            msg = "BinSource.unit_predictions needs the bin model and its slide (model=, slide=)"
            raise ValueError(msg)
        return predict_units(
            self.model,
            self.slide,
            measured,
            units,
            progress=progress,
            device=self.device,
            tile_px=None,
            batch_size=4,
            tta=False,
        )


def as_source(obj: Any, **options: Any) -> PredictionSource:
    """A :class:`PredictionSource` for ``obj``.

    ``obj``: a source (returned as it is); a
    :class:`~napari_stmap.core.predict.bins.BinPrediction` (-> :class:`BinSource`, options
    ``model``, ``slide``, ``device``); a :class:`~napari_stmap.core.predict.predictor.Predictor`,
    a :class:`~napari_stmap.core.store.PredictionStore` or a store's path (->
    :class:`StoreSource`, its options).
    """
    if isinstance(obj, BinPrediction):
        return BinSource(obj, **options)
    if not isinstance(obj, (Predictor, PredictionStore)) and isinstance(obj, PredictionSource):
        return obj
    return StoreSource(obj, **options)
