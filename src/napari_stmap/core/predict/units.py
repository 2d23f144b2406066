"""Predicted counts of measured units at every scale, as the evaluation scores them.

:func:`predict_units` runs any model on the units of
:meth:`~napari_stmap.core.measured.Measured.units` (spots, bins, sums of bins, Visium-like
disks; level-0 px, axis order (y, x)) through
:func:`~napari_stmap.core.predict.spots.predict_spots`. Dense models predict summed scales once,
on their base bins, and sum those predictions (the additive rule makes that exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..measured import Measured, Units
from . import spots as _spots

__all__ = ["predict_units", "unit_spots"]


def predict_units(
    model: Any,
    slide: Any,
    measured: Measured,
    units: dict[str, Units],
    *,
    progress: Callable[[int, int], None] | None = None,
    **kw: Any,
) -> dict[str, np.ndarray]:
    """Predicted counts of every scale's units, as the evaluation scores them.

    (:func:`~napari_stmap.core.evaluate.evaluate_measured` calls it unless given predictions.)

    Parameters
    ----------
    model
        Any registered model.
    slide
        The measured section's slide.
    measured, units
        :func:`~napari_stmap.core.measured.load_measured`'s result and its ``units`` per
        scale key (µm, :func:`~napari_stmap.core.measured.scale_key`).
    progress : callable, optional
        ``progress(done, total)`` in spots over every prediction this makes (the summed
        scales' base bins once, then each other scale's units), ``total`` known from the start.
    **kw
        :func:`~napari_stmap.core.predict.spots.predict_spots` options (``device``,
        ``tile_px``, ``batch_size``, ``tta``).

    Returns
    -------
    dict of str to numpy.ndarray
        Per scale key, (n_units, G_model + 1) expected counts (genes in ``model.genes``
        order, total last). Dense models predict summed scales once, on their base bins, and
        sum those predictions (the value rule makes that exact).
    """
    predict_spots = _spots.predict_spots  # looked up per call (tests replace it)
    out: dict[str, np.ndarray] = {}
    summed = {k: u for k, u in units.items() if u.members is not None}
    used = None
    if model.input_kind == "dense" and summed:
        used = np.unique(np.concatenate([u.members.indices for u in summed.values()]))
    rest = [k for k in units if used is None or k not in summed]
    steps = _Steps(progress, (0 if used is None else len(used)) + sum(units[k].n for k in rest))
    if used is not None:
        base = measured.spots.subset(used)
        pred_used = predict_spots(model, slide, base, progress=steps.part(len(used)), **kw)
        pred_base = np.zeros((measured.spots.n_spots, model.num_outputs))
        pred_base[used] = pred_used
        out = {k: np.asarray(u.members @ pred_base) for k, u in summed.items()}
    for k in rest:
        spots = unit_spots(units[k])
        out[k] = predict_spots(model, slide, spots, progress=steps.part(units[k].n), **kw)
    return out


class _Steps:
    """One running ``progress(done, total)`` over consecutive parts of known sizes (spots)."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.before = progress, int(total), 0
        if progress is not None:
            progress(0, self.total)  # the total is known before the first (slow) part

    def part(self, n: int) -> Callable[[int, int], None] | None:
        """Callback for the next part of ``n`` spots (its own ``(done, n)`` counts)."""
        if self.progress is None:
            return None
        before, self.before = self.before, self.before + int(n)

        def step(done: int, of: int) -> None:
            self.progress(before + min(done, n), self.total)

        return step


@dataclass
class _SpotsView:
    """Minimal Spots-like view (centres, footprint, size) for :func:`predict_spots`."""

    centers_yx: np.ndarray
    footprint: str
    size_px: float


def unit_spots(u: Units) -> _SpotsView:
    """A Spots-like view (centres level-0 px, footprint, size px) of measured units."""
    return _SpotsView(u.centers_yx, u.footprint, u.size_px)
