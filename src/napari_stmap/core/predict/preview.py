"""First pixels sooner: small tiles at the centre of a request, refined by the regular tiles.

On a CPU a regular tile of the default PixNet (core 1,152 model px, window 1,920 px with its
384 px halo) takes seconds, so "predict what I see" would show nothing for that long. A
*preview* runs a few small tiles first (core :func:`preview_tile_px`, about 192 model px, with
the same halo: window 960 px, a quarter of the work) at the on-tissue spot nearest the request's
centre. Their embeddings go to :meth:`~napari_stmap.core.store.PredictionStore.write_preview`
(memory only) and the live views show them until the regular tile replaces them.

Consistency: a small tile's core is the same network on the same pixels with the same halo as
the regular tile around it, so its values equal the regular tile's within the seamless-tiling
tolerance (tests check 1e-4); the store on disk only ever holds regular tiles.

Units: boxes are level-0 px ``(y0, x0, y1, x1)``; tiles ``(i, j)`` of a
:class:`~napari_stmap.core.tiling.TileSpec`; preview tiles ``(a, b)`` of the subdivided spec.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..store import TODO, PredictionStore
from ..tiling import TileSpec
from .pipeline import embed_windows
from .reader import SlideReader, Tile

__all__ = [
    "DEFAULT_PREVIEW_TILES",
    "PREVIEW_TILE_PX",
    "PreviewTile",
    "plan_preview",
    "preview_spec",
    "preview_tile_px",
    "run_preview",
]

log = logging.getLogger(__name__)

#: Target core side of a preview tile, model px (the nearest divisor of the tile is used). The
#: halo dominates a small window, so going smaller saves little: 192 + 2·384 = 960 px.
PREVIEW_TILE_PX = 192
#: Preview tiles per request: a 2 × 2 patch around the request's centre.
DEFAULT_PREVIEW_TILES = 4


class PreviewTile(NamedTuple):
    """One small tile: its index in the preview spec, the regular tile it lies in, and the
    output px ``(y0, x0)`` of its core relative to that tile's output region."""

    small: Tile
    tile: Tile
    y0: int
    x0: int


def preview_tile_px(spec: TileSpec, target: int = PREVIEW_TILE_PX) -> int | None:
    """Core side (model px) of preview tiles for ``spec``: the divisor of ``spec.tile_px`` that
    is a multiple of the alignment and nearest ``target``; None when no divisor is at most
    half the tile (previews would save nothing)."""
    align, t = spec.align, spec.tile_px
    sides = [d * align for d in range(1, t // align + 1) if t % (d * align) == 0]
    sides = [s for s in sides if 2 * s <= t]
    if not sides:
        return None
    return min(sides, key=lambda s: (abs(math.log(s / target)), -s))


def preview_spec(spec: TileSpec, tile_px: int) -> TileSpec:
    """``spec`` subdivided: cores of ``tile_px`` model px (a divisor of ``spec.tile_px``) on the
    same origin, halo, stride and level, so small cores nest in the regular ones."""
    if spec.tile_px % tile_px or tile_px % spec.align:
        msg = f"preview tiles of {tile_px} px do not divide tiles of {spec.tile_px} px"
        raise ValueError(msg)
    h, w = spec.size_model_hw
    grid = (-(-h // tile_px), -(-w // tile_px))
    return dataclasses.replace(spec, tile_px=int(tile_px), grid_shape=grid)


def plan_preview(
    store: PredictionStore,
    small: TileSpec,
    bbox_yx: Sequence[float],
    *,
    n: int = DEFAULT_PREVIEW_TILES,
    on_tissue: np.ndarray | None = None,
) -> list[PreviewTile]:
    """The ``n`` small tiles to run first for a request: inside ``bbox_yx`` (level-0 px), on
    tissue (``on_tissue``: bool grid of ``small``), in a regular tile still to do and not
    previewed yet, nearest the box's centre first."""
    spec, k = store.spec, small.tile_px
    per = spec.tile_px // k
    cy, cx = (bbox_yx[0] + bbox_yx[2]) / 2, (bbox_yx[1] + bbox_yx[3]) / 2
    cand = []
    for a, b in small.tiles_in_bbox(bbox_yx):
        if on_tissue is not None and not on_tissue[a, b]:
            continue
        tile = (a // per, b // per)
        if store.state(tile) != TODO:
            continue
        y0, x0 = (a % per) * k // spec.stride, (b % per) * k // spec.stride
        r, c = small.output_slices((a, b))
        if store.preview_covers(tile, y0, x0, y0 + r.stop - r.start, x0 + c.stop - c.start):
            continue
        d = math.dist(small.tile_center_level0((a, b)), (cy, cx))
        cand.append((d, PreviewTile((a, b), tile, y0, x0)))
    cand.sort(key=lambda item: item[0])
    return [p for _, p in cand[: max(0, int(n))]]


def run_preview(
    model: Any,
    reader: SlideReader,
    store: PredictionStore,
    tiles: Sequence[PreviewTile],
    *,
    device: Any,
    precision: str = "fp32",
    on_tile: Callable[[Tile], Any] | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Run the network on preview tiles one by one (nearest first) and keep each in the store.

    ``reader`` reads windows of the preview spec; ``on_tile(tile)`` is called with the regular
    tile after each preview is kept; ``stop()`` ends the run early. Returns previews kept.
    """
    kept = 0
    for p in tiles:
        if stop is not None and stop():
            break
        if store.state(p.tile) != TODO:
            continue
        image = reader.window(p.small)
        emb = embed_windows(model, image[None], reader.spec, device, precision)[0]
        r, c = reader.spec.output_slices(p.small)
        emb = emb[:, : r.stop - r.start, : c.stop - c.start]
        if store.write_preview(p.tile, p.y0, p.x0, emb):
            kept += 1
            if on_tile is not None:
                on_tile(p.tile)
    return kept
