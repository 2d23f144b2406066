"""What the viewer's docks show, computed without Qt or napari: names, placement, limits, text.

Layers the plugin owns are named ``stmap: …`` (:data:`LAYER_PREFIX`) and carry
``metadata["stmap"]`` (``kind``: ``"gene"``, ``"regions"``, ``"spot grid"``, …). A heatmap's
placement in the viewer's world (µm) comes from its :class:`~napari_stmap.core.geometry.MapGrid`
(level-0 px) and the slide's µm/px. Measured data for the Slide & data dock is read here too,
its warnings kept as text (:func:`read_spots_checked`). The docks (``napari_stmap._widgets``)
only display what these functions return; they are tested here without a viewer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import MapGrid
from .io.spots import DEFAULT_HD_BIN_UM, Spots, available_bin_sizes, detect_spots_layout, read_spots

logger = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_KINDS",
    "COLORMAPS",
    "LAYER_PREFIX",
    "MODES",
    "RefreshPacer",
    "bin_size_choices",
    "colorbar_label",
    "contrast_from_view",
    "gene_layer_name",
    "gene_overlap_warning",
    "grid_placement",
    "inputs_summary",
    "is_bins_layer",
    "is_gene_layer",
    "match_gene",
    "model_kind_warning",
    "opened_spots",
    "opened_spots_source",
    "percentile_limits",
    "read_spots_checked",
    "shared_genes",
    "stmap_kind",
    "stmap_meta",
    "unknown_mpp_warning",
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

#: Colormaps the Genes dock offers, the default first.
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "red", "green", "blue", "gray")


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


def unknown_mpp_warning(slide: Any, name: str) -> str | None:
    """The warning for the slide file ``name`` if its µm/px is unknown (a fallback), else None."""
    if slide.mpp_source != "fallback":
        return None
    return (
        f"{name}: µm/px is unknown; the world is in pixels and spot sizes "
        "are wrong. Re-save the slide with its resolution (OME-TIFF) or pass --mpp."
    )


def shared_genes(model_genes: Sequence[str], measured_genes: Sequence[Any]) -> set[str]:
    """Genes both predicted by the model and measured (names compared as text)."""
    return set(model_genes) & set(map(str, measured_genes))


def gene_overlap_warning(model_genes: Sequence[str], measured_genes: Sequence[Any]) -> str | None:
    """The warning when none of the model's genes is measured, or None (also without genes)."""
    if not model_genes or shared_genes(model_genes, measured_genes):
        return None
    return (
        "none of the model's genes is measured in the loaded data: check that the gene "
        "names use the same convention (symbols vs Ensembl ids)"
    )


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

    The path the user opened (the reader records it as ``source``); None when there is none.
    """
    if meta.get("kind") != "spots" or not meta.get("source"):
        return None
    return Path(meta["source"])


def opened_spots(layers: Sequence[Any], *, skip: str) -> tuple[Path, float | None] | None:
    """The first measured-spots layer napari's reader opened: what to read and its bin size.

    ``(source, bin_um)`` (see :func:`opened_spots_source`; ``bin_um`` in µm, None if not
    recorded) of the first layer not named ``skip`` (the plugin's own layer), else None.
    """
    for layer in layers:
        source = opened_spots_source(stmap_meta(layer))
        if source is not None and layer.name != skip:
            return source, stmap_meta(layer).get("bin_um")
    return None


# -------------------------------------------------------------------- reading measured data
def bin_size_choices(
    path: str | Path, bin_um: float | None = None
) -> tuple[list[float], float | None]:
    """Visium HD bin sizes at ``path`` (µm; ``[]`` for other layouts) and the size to read.

    The size to read is ``bin_um`` when given, else 8 µm when present, else the first size
    (None for other layouts).
    """
    binned = detect_spots_layout(path) in ("visium_hd", "spatialdata")
    sizes = available_bin_sizes(path) if binned else []
    if sizes and bin_um is None:
        bin_um = DEFAULT_HD_BIN_UM if DEFAULT_HD_BIN_UM in sizes else sizes[0]
    return sizes, bin_um


def read_spots_checked(
    path: str | Path, bin_um: float | None = None, slide: Any = None
) -> tuple[Spots, list[str]]:
    """Read measured spots/bins and check them against ``slide``; the warnings as texts.

    Parameters
    ----------
    path : str or Path
        Space Ranger outs, a Visium HD run folder or a spatial .h5ad.
    bin_um : float, optional
        Visium HD bin size, µm.
    slide : Slide, optional
        The slide the spots lie on (``shape_yx`` level-0 px (H, W), ``path``, ``mpp``).

    Returns
    -------
    spots : Spots
        What :func:`~napari_stmap.core.io.spots.read_spots` read.
    texts : list of str
        napari-stmap's warnings while reading and checking (e.g. bins outside the slide), for
        a dock to show; other libraries' warnings are dropped.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spots = read_spots(path, bin_um=bin_um, mpp=None if slide is None else slide.mpp)
        if slide is not None:
            spots.check_against_image(slide.shape_yx, name=Path(slide.path).name, mpp=slide.mpp)
    return spots, [str(w.message) for w in caught if "napari_stmap" in str(w.category.__module__)]
