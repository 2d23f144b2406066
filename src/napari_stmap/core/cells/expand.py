"""Grow nuclei into cells: each nucleus expanded by a distance without overlapping neighbours.

The convention of bin2cell and 10x Xenium: every background pixel within ``distance`` of a
nucleus joins the nearest one (:func:`skimage.segmentation.expand_labels`), so cells never
overlap and never reach further than ``distance`` from their nucleus. Done lazily, window by
window, each read with a halo wider than the distance, so a window's result is the one a
whole-slide expansion gives.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import StmapInputError
from .labels import LabelSource

__all__ = ["ExpandedLabels", "expand_cells"]


class ExpandedLabels(LabelSource):
    """A label source whose cells are another's, expanded by ``distance_px`` label px.

    Parameters
    ----------
    base
        The nuclei (any :class:`~napari_stmap.core.cells.labels.LabelSource`).
    distance_px
        Expansion in label px of ``base`` (µm / (µm per level-0 px · base.factor)).
    """

    def __init__(self, base: LabelSource, distance_px: float) -> None:
        self.base, self.distance_px = base, float(distance_px)
        self.halo = int(math.ceil(self.distance_px)) + 2
        self.shape_hw, self.factor, self.origin = base.shape_hw, base.factor, base.origin
        self.kind, self.name = base.kind, base.name

    def _read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        from skimage.segmentation import expand_labels

        oy, ox, h = self.origin[0], self.origin[1], self.halo
        big = self.base.read((oy + r0 - h, ox + c0 - h, oy + r1 + h, ox + c1 + h))
        grown = expand_labels(big, distance=self.distance_px)
        return grown[h : h + (r1 - r0), h : h + (c1 - c0)]


def expand_cells(base: LabelSource, distance_um: float, mpp: float) -> LabelSource:
    """Nuclei ``base`` expanded by ``distance_um`` µm (the slide has ``mpp`` µm per level-0 px).

    ``distance_um`` 0 returns ``base`` itself; a negative or non-finite one is refused.
    """
    d = float(distance_um)
    if not math.isfinite(d) or d < 0:
        msg = f"expansion {distance_um!r} µm is not valid: pass a distance >= 0 µm (e.g. 5)"
        raise StmapInputError(msg)
    if d == 0:
        return base
    return ExpandedLabels(base, d / (float(mpp) * base.factor))
