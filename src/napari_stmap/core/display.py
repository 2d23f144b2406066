"""What the viewer's docks show, computed without Qt or napari: names, placement, limits, text.

Layers the plugin owns are named ``stmap: …`` (:data:`LAYER_PREFIX`) and carry
``metadata["stmap"]`` (``kind``: ``"gene"``, ``"regions"``, ``"spot grid"``, …). A heatmap's
placement in the viewer's world (µm) comes from its :class:`~napari_stmap.core.geometry.MapGrid`
(level-0 px) and the slide's µm/px. The docks (``napari_stmap._widgets``) only display what
these functions return; they are tested here without a viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import MapGrid

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_KINDS",
    "LAYER_PREFIX",
    "MODES",
    "RefreshPacer",
    "colorbar_label",
    "contrast_from_view",
    "gene_layer_name",
    "grid_placement",
    "inputs_summary",
    "is_bins_layer",
    "is_gene_layer",
    "match_gene",
    "model_kind_warning",
    "opened_spots_source",
    "percentile_limits",
    "shared_genes",
    "stmap_kind",
    "stmap_meta",
    "view_box_px",
]

#: Prefix of every layer the plugin owns (updated in place, never duplicated).
LAYER_PREFIX = "stmap: "

#: Kinds (``metadata["stmap"]["kind"]``) of the plugin's annotation layers: drawn shapes and
#: spot grids stay above every other layer of the plugin so they are never hidden.
ANNOTATION_KINDS = ("regions", "spot grid")

#: Heatmap values: key -> what the Genes dock calls it.
MODES = {
    "normalised": "normalised  log1p(1e4·gene/total)",
    "absolute": "absolute (expected counts)",
}


# ------------------------------------------------------------------------ layer metadata
def stmap_meta(layer: Any) -> dict:
    """The plugin's metadata of ``layer`` (``metadata["stmap"]``; empty when it has none)."""
    meta = getattr(layer, "metadata", None) or {}
    return meta.get("stmap") or {}


def stmap_kind(layer: Any) -> str | None:
    """The plugin's kind of ``layer`` (``"gene"``, ``"regions"``, …), or None."""
    return stmap_meta(layer).get("kind")


def match_gene(gene: str, genes: Sequence[str]) -> tuple[str | None, str | None]:
    """The model's spelling of ``gene`` (any case) among ``genes``, and what is wrong if none.

    Returns ``(match, None)``, or ``(None, message)`` naming close genes when there are some.
    """
    if not genes:
        return None, "open a model in the 'Slide & data' dock first"
    match = {g.lower(): g for g in genes}.get(gene.lower())
    if match is not None:
        return match, None
    close = [g for g in genes if gene.lower() in g.lower()][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; type to see the model's genes"
    return None, f"{gene!r} is not one of the model's {len(genes)} genes{hint}"


def gene_layer_name(gene: str) -> str:
    """Name of the heatmap layer of ``gene``."""
    return f"{LAYER_PREFIX}{gene}"


def is_gene_layer(layer: Any) -> bool:
    """Whether ``layer`` is a heatmap made by the Genes dock."""
    return stmap_kind(layer) == "gene"


def is_bins_layer(layer: Any) -> bool:
    """Whether ``layer`` is a heatmap of a bin model (a plain raster, not a live view)."""
    return bool(stmap_meta(layer).get("bins"))


# ------------------------------------------------------------------------------ placement
def grid_placement(grid: MapGrid, mpp: float) -> dict[str, tuple[float, float]]:
    """napari ``scale`` and ``translate`` (µm, (y, x)) of an image on ``grid``.

    ``scale`` is the map pixel in µm and ``translate`` the centre of map pixel (0, 0) in µm,
    so each value sits over the slide area it describes; ``mpp``: µm per level-0 px.
    """
    return {
        "scale": (grid.pixel_px * mpp,) * 2,
        "translate": tuple(v * mpp for v in grid.translate_yx),
    }


def view_box_px(
    center_yx: Sequence[float],
    size_yx: Sequence[float],
    mpp: float,
    shape_yx: Sequence[int],
) -> tuple[float, float, float, float] | None:
    """The part of the slide in view, level-0 px ``(y0, x0, y1, x1)``, clipped to the slide.

    ``center_yx`` and ``size_yx`` are the view's centre and extent in world µm (y, x); ``mpp``
    is µm per level-0 px and ``shape_yx`` the slide's level-0 size. None when the view does not
    overlap the slide.
    """
    cy, cx = (float(v) for v in center_yx)
    hy, hx = float(size_yx[0]) / 2, float(size_yx[1]) / 2
    y0, x0 = max((cy - hy) / mpp, 0.0), max((cx - hx) / mpp, 0.0)
    y1, x1 = min((cy + hy) / mpp, float(shape_yx[0])), min((cx + hx) / mpp, float(shape_yx[1]))
    if y1 <= y0 or x1 <= x0:
        return None
    return (y0, x0, y1, x1)


# -------------------------------------------------------------------------------- contrast
def percentile_limits(data: Any) -> tuple[float, float] | None:
    """1st–99.5th percentile of the finite values of a raster (None when there is none)."""
    arr = np.asarray(data)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def contrast_from_view(view: Any) -> tuple[float, float] | None:
    """Limits of what a live gene view has predicted so far (its coarsest level).

    Blocks until the view's worker has computed that level: call it off the GUI thread.
    """
    return percentile_limits(view.level_data(-1))


def colorbar_label(gene: str, mode: str, pixel_um: float) -> str:
    """Unit line of a heatmap's colour bar (``pixel_um``: side of one heatmap pixel, µm)."""
    if mode == "normalised":
        return f"{gene}: log1p(10⁴ · {gene} / total) per pixel"
    return f"{gene}: expected counts per {pixel_um:.3g}×{pixel_um:.3g} µm pixel"


# --------------------------------------------------------------------------- refresh pace
class RefreshPacer:
    """When to read live heatmap layers again: coalesced, at most once every ``interval_s``.

    A layer becomes stale when new blocks arrive (:meth:`mark`); it is due once the worker has
    finished its queued blocks (or after ``interval_s`` of waiting for them), and never sooner
    than ``interval_s`` after its last refresh. Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = float(interval_s)
        self.stale: dict[str, float] = {}  # layer -> since when it has blocks not shown
        self.last: dict[str, float] = {}  # layer -> when it was last refreshed

    def mark(self, name: str, now: float) -> None:
        """``name`` has blocks not shown yet (since ``now``, unless it had some already)."""
        self.stale.setdefault(name, now)

    def forget(self, name: str, *, last: bool = False) -> None:
        """Stop tracking ``name`` (its pending refresh; ``last``: its last refresh time too)."""
        self.stale.pop(name, None)
        if last:
            self.last.pop(name, None)

    def due(self, name: str, now: float, pending: Callable[[], int]) -> bool:
        """Whether to refresh ``name`` now (then it is no longer stale).

        ``pending()``: blocks of its view the worker has queued or is computing.
        """
        since = self.stale.get(name)
        if since is None:
            return False
        waited = now - since >= self.interval_s
        if not waited and pending():
            return False
        if now - self.last.get(name, -1e9) < self.interval_s:
            return False
        del self.stale[name]
        return True

    def refreshed(self, name: str, now: float) -> None:
        """``name`` was read again at ``now``."""
        self.last[name] = now


# ------------------------------------------------------------------------------- summary
def inputs_summary(
    slide: Any, spots: Any, model_path: str | Path | None, model_meta: dict
) -> list[str]:
    """Lines (rich text) describing the slide, measured data and model of a session."""
    lines = []
    if slide is not None:
        h, w = slide.shape_yx
        mpp = slide.mpp
        src = " (unknown!)" if slide.mpp_source == "fallback" else ""
        lines.append(
            f"<b>Slide</b> {Path(slide.path).name}: {w}×{h} px, {mpp:.4g} µm/px{src}, "
            f"{w * mpp / 1000:.2f}×{h * mpp / 1000:.2f} mm"
        )
    else:
        lines.append("<b>Slide</b>: none — open one (File › Open or 'Open slide…')")
    if spots is not None:
        lines.append(
            f"<b>Measured</b> {spots.library_id}: {spots.n_spots:,} {spots.footprint} "
            f"{spots.bin_um:g} µm {'bins' if spots.footprint == 'square' else 'spots'}, "
            f"{spots.n_genes:,} genes"
        )
    if model_path is None:
        lines.append("<b>Model</b>: none — open a .safetensors model ('stmap train' makes one)")
        return lines
    m, genes = model_meta, list(model_meta.get("genes", []))
    lines.append(
        f"<b>Model</b> {Path(model_path).name}: {m.get('arch', '?')}, {len(genes)} genes, "
        f"{m.get('mpp', '?')} µm/px, stride {m.get('stride', '?')}"
    )
    if spots is not None:
        shared = len(shared_genes(genes, spots.genes))
        lines.append(f"<b>Overlap</b>: {shared} of {len(genes)} model genes are measured")
    return lines


def shared_genes(model_genes: Sequence[str], measured_genes: Sequence[Any]) -> set[str]:
    """Genes both predicted by the model and measured (names compared as text)."""
    return set(model_genes) & set(map(str, measured_genes))


def model_kind_warning(meta: dict, name: str) -> str | None:
    """Why the viewer cannot show the model file ``name`` (metadata ``meta``), or None."""
    kind = meta.get("input_kind", "dense")
    if kind not in ("dense", "bins") and meta.get("arch") not in (None, "pixnet"):
        return (
            f"{name} ({meta.get('arch')}) predicts one value per spot crop; the "
            "viewer needs a dense model such as pixnet"
        )
    return None


def opened_spots_source(meta: dict) -> Path | None:
    """What to read for a measured-spots layer napari's reader opened (its ``stmap`` metadata).

    A Visium HD bin folder (``…/binned_outputs/square_008um``) gives its run folder, so every
    bin size is offered; None when the layer has no source.
    """
    if meta.get("kind") != "spots" or not meta.get("source"):
        return None
    source = Path(meta["source"])
    if source.parent.name == "binned_outputs":
        source = source.parent.parent
    return source
