"""Gene maps from cached embeddings: lazy dask views, their pyramid, and region crops.

Every gene map is a pointwise function of a store's embeddings (``softplus(w·e + b)``, the
model's head row for that gene), computed with numpy per tile; the network never runs here.
Maps are (H, W) or (C, h, w) in output px of the store's grid (axis order (y, x));
:func:`view_grid` and :class:`~napari_stmap.core.geometry.MapGrid` place them in level-0 px.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StmapInputError
from ..geometry import MapGrid
from ..store import SKIPPED, PredictionStore, open_store
from ..tiling import TileSpec
from .reader import Tile

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["MODES", "as_store", "gene_pyramid", "gene_view", "region_map", "view_grid"]

#: Value modes of a gene map: normalised ``log1p(1e4 · gene / total)`` or absolute counts.
MODES = ("normalised", "absolute")


def as_store(source: Any) -> PredictionStore:
    """The :class:`~napari_stmap.core.store.PredictionStore` of ``source``.

    ``source``: a store, anything with a ``store`` attribute holding one (a
    :class:`~.predictor.Predictor`, a :class:`~.source.StoreSource`), or a store's path
    (opened read-only).
    """
    if isinstance(source, PredictionStore):
        return source
    store = getattr(source, "store", None)
    if isinstance(store, PredictionStore):
        return store
    return open_store(source, mode="r")


def check_mode(mode: str) -> None:
    """Refuse a value mode other than :data:`MODES`."""
    if mode not in MODES:
        msg = f"mode must be one of {MODES}, got {mode!r}"
        raise StmapInputError(msg)


# ================================================================================ numerics
def _softplus_rows(emb: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``softplus(w @ e + b)``: (k, D) rows on a (D, h, w) embedding -> (k, h, w) float32.

    A few rows go through ``einsum`` (several times faster than BLAS for such skinny
    products); softplus is torch's (linear above 20).
    """
    d, h, wd = emb.shape
    flat = emb.reshape(d, -1)
    z = np.einsum("kd,dp->kp", w, flat) if len(w) <= 8 else w @ flat
    z += b[:, None]
    return _softplus(z).reshape(-1, h, wd)


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log1p(exp(z))``, and ``z`` where ``z > 20`` (as ``torch.nn.functional.softplus``)."""
    out = _log1p(np.exp(np.minimum(z, np.float32(20.0))))
    np.copyto(out, z, where=z > 20)
    return out


def _log1p(x: np.ndarray) -> np.ndarray:
    """``log1p`` of float32 ``x >= 0`` to a few ulps, ~5x faster than numpy's (not SIMD).

    Goldberg's trick: ``log(u) · x / (u - 1)`` with ``u = 1 + x`` rounded; ``x`` where
    ``u == 1``.
    """
    x = np.asarray(x, dtype=np.float32)
    u = 1 + x
    d = u - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(u) * (x / d)
    np.copyto(out, x, where=d == 0)
    return out


def pool_blocks(a: np.ndarray, k: int, how: str) -> np.ndarray:
    """(c, h, w) -> (c, ceil(h/k), ceil(w/k)) by mean or sum of k × k blocks (NaN-padded)."""
    c, h, w = a.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    if (hp, wp) != (h, w):
        a = np.pad(a, ((0, 0), (0, hp - h), (0, wp - w)), constant_values=np.nan)
    blocks = a.reshape(c, hp // k, k, wp // k, k)
    total = np.nansum(blocks, axis=(2, 4))
    if how == "mean":  # NaN where a block has no value at all (e.g. a preview's edge)
        n = np.isfinite(blocks).sum(axis=(2, 4))
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / n
    return total.astype(np.float32)


def normalised_map(gene: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``log1p(1e4 · gene / total)`` per pixel, float32 (NaN where ``total`` is NaN or 0/0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.float32(1e4) * gene / total
    return _log1p(ratio)


# ================================================================================== tiles
def _channel_tile(
    store: PredictionStore,
    rows: tuple[int, ...],
    tile: Tile,
    cached: bool = True,
    preview: bool = False,
) -> np.ndarray | None:
    """Expected counts (k, h, w) of output channels ``rows`` on a done tile, else None.

    ``preview``: a tile still to do gives its previews (NaN elsewhere; never cached).
    """
    key = (rows, tile)
    vals = store.view_cache.get(key) if cached else None
    if vals is None:
        emb = store.read_embedding(tile)
        if emb is None and preview:
            emb = store.read_preview(tile)
            cached = False
        if emb is None:
            return None
        vals = _softplus_rows(emb, store.head_weight[list(rows)], store.head_bias[list(rows)])
        if cached:
            store.view_cache.put(key, vals)
    return vals


def _view_block(
    store: PredictionStore,
    rows: tuple[int, ...],
    mode: str,
    level: int,
    background: float,
    i: int,
    j: int,
    preview: bool = False,
) -> np.ndarray:
    """One chunk of a gene view: tile (i, j) at pyramid ``level``, (h, w) float32.

    Each channel's tile is computed and cached on its own, so the total channel of the
    normalised view is computed once per tile and shared by every gene. ``preview``: a tile
    still to do shows its previews (live views only).
    """
    tile = (i, j)
    vals = [_channel_tile(store, (r,), tile, preview=preview) for r in rows]
    k = 2**level
    if any(v is None for v in vals):
        r, c = store.spec.output_slices(tile)
        shape = (-(-(r.stop - r.start) // k), -(-(c.stop - c.start) // k))
        fill = background if store.state(tile) == SKIPPED else np.nan
        return np.full(shape, fill, dtype=np.float32)
    if level:
        vals = [pool_blocks(v, k, "mean" if mode == "absolute" else "sum") for v in vals]
    if mode == "absolute":
        return vals[0][0]
    return normalised_map(vals[0][0], vals[1][0])


def view_rows(store: PredictionStore, gene: str | int, mode: str) -> tuple[int, ...]:
    """Output channels a view of ``gene`` reads: the gene (and the total when normalised)."""
    g = store.channel_index(gene)
    return (g,) if mode == "absolute" else (g, len(store.output_names) - 1)


# ================================================================================== views
def gene_view(
    source: Any,
    gene: str | int,
    *,
    mode: str = "normalised",
    level: int = 0,
    background: float = np.nan,
) -> da.Array:
    """Lazy map of one gene from cached embeddings (the network never runs).

    Parameters
    ----------
    source : Predictor, PredictionStore or path of a store
        Where the embeddings are.
    gene : str or int
        Gene name (or ``"total"``) or output channel index.
    mode : {"normalised", "absolute"}
        ``"absolute"``: expected counts per output pixel, ``softplus(w·e + b)``.
        ``"normalised"``: ``log1p(1e4 · gene / total)`` per pixel (the total channel's row
        gives the denominator).
    level : int
        Pyramid level: output pixels are ``2**level`` × ``2**level`` level-0 output pixels.
        Absolute values are the *mean* over the block (units stay counts per level-0 output
        pixel, so one colour scale serves all levels); normalised values are computed after
        *summing* gene and total over the block (as for any spot, see ``DESIGN.md``).
    background : float
        Value of tiles skipped as off-tissue (default NaN, like tiles not yet predicted).

    Returns
    -------
    dask.array.Array
        ``(H_out, W_out)`` float32 (ceil-divided by ``2**level``), one chunk per tile; NaN
        where the tile is not yet predicted. Chunks read embeddings through the store's LRU
        cache and the computed gene chunks through its view cache. :func:`view_grid` gives
        where it lies.

    Notes
    -----
    The graph holds the open store, so compute views in this process: with a
    ``dask.distributed`` Client as the default scheduler, use ``.compute(scheduler="threads")``.
    """
    import dask.array as da

    store = as_store(source)
    check_mode(mode)
    _check_level(store.spec, level)
    rows = view_rows(store, gene, mode)
    spec, k = store.spec, 2**level
    ys = [spec.output_slices((i, 0))[0] for i in range(spec.grid_shape[0])]
    xs = [spec.output_slices((0, j))[1] for j in range(spec.grid_shape[1])]
    chunks = tuple(tuple(-(-(s.stop - s.start) // k) for s in sl) for sl in (ys, xs))
    name = f"stmap-{mode}-{rows[0]}-L{level}-{uuid.uuid4().hex[:12]}"
    fn = functools.partial(_view_block, store, rows, mode, level, float(background))
    dsk = {(name, i, j): (fn, i, j) for i, j in spec.tiles()}
    return da.Array(dsk, name, chunks, dtype=np.float32)


def _check_level(spec: TileSpec, level: int) -> None:
    top = _max_level(spec)
    if not (isinstance(level, (int, np.integer)) and 0 <= level <= top):
        msg = f"level must be an integer in 0..{top} for tiles of {spec.out_tile_px} output px, got {level!r}"
        raise StmapInputError(msg)


def _max_level(spec: TileSpec) -> int:
    """Deepest level whose 2**level divides a tile's output side."""
    t, n = spec.out_tile_px, 0
    while t % 2 == 0 and t > 1:
        t //= 2
        n += 1
    return n


def gene_pyramid(
    source: Any,
    gene: str | int,
    mode: str = "normalised",
    *,
    background: float = np.nan,
    min_px: int = 256,
) -> list[da.Array]:
    """Multiscale lazy views of one gene for napari (``multiscale=True``), finest first.

    Levels halve the map (2 × 2 blocks: mean for ``"absolute"``, sum-then-normalise for
    ``"normalised"``, see :func:`gene_view`) until its longest side is at most ``min_px`` or a
    tile's output can be halved no more. Level ``k`` has pixels ``2**k`` times larger
    (:func:`view_grid`).
    """
    store = as_store(source)
    levels = pyramid_levels(store.spec, min_px)
    return [gene_view(store, gene, mode=mode, level=k, background=background) for k in levels]


def pyramid_levels(spec: TileSpec, min_px: int) -> list[int]:
    """Levels 0, 1, … until the longest side is at most ``min_px`` or tiles halve no more."""
    top, levels = _max_level(spec), [0]
    while levels[-1] < top and max(spec.out_shape_hw) / 2 ** levels[-1] > min_px:
        levels.append(levels[-1] + 1)
    return levels


def view_grid(source: Any, level: int = 0) -> MapGrid:
    """Where level ``level`` of a gene view lies: origin and pixel size in level-0 px."""
    store = as_store(source)
    grid, k = store.grid, 2**level
    h, w = grid.shape_hw
    return MapGrid(grid.origin_yx, grid.pixel_px * k, (-(-h // k), -(-w // k)))


def level_bounds(spec: TileSpec, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Block edges (rows, columns) of a gene view's level: one block per tile, ceil-divided."""
    k = 2**level
    ys = [spec.output_slices((i, 0))[0] for i in range(spec.grid_shape[0])]
    xs = [spec.output_slices((0, j))[1] for j in range(spec.grid_shape[1])]
    return tuple(
        np.cumsum([0, *(-(-(s.stop - s.start) // k) for s in sl)]).astype(np.int64)
        for sl in (ys, xs)
    )


# ================================================================================ regions
def region_map(
    source: Any,
    bbox_yx: Sequence[float],
    *,
    channels: Sequence[str | int] | None = None,
    background: float = np.nan,
) -> tuple[np.ndarray, MapGrid]:
    """Dense map ``(C, h, w)`` float32 of a region from the store as it is (NaN where not done).

    ``bbox_yx`` is level-0 px ``(y0, x0, y1, x1)``; the map covers the whole output pixels
    that overlap it. Skipped (off-tissue) tiles read as ``background``. See
    :func:`~napari_stmap.core.predict.predictor.ensure_region` (which predicts missing tiles
    first).
    """
    store = as_store(source)
    names = store.output_names if channels is None else channels
    rows = tuple(store.channel_index(c) for c in names)
    box = tuple(float(v) for v in bbox_yx)
    grid = store.grid.crop(box)
    rs, cs = store.grid.crop_slices(box)
    out = np.full((len(rows), rs.stop - rs.start, cs.stop - cs.start), np.nan, dtype=np.float32)
    for tile in store.spec.tiles_in_bbox(bbox_yx):
        r, c = store.spec.output_slices(tile)
        ys, ye = max(r.start, rs.start), min(r.stop, rs.stop)
        xs, xe = max(c.start, cs.start), min(c.stop, cs.stop)
        if ye <= ys or xe <= xs:
            continue
        dst = (
            slice(None),
            slice(ys - rs.start, ye - rs.start),
            slice(xs - cs.start, xe - cs.start),
        )
        vals = _channel_tile(store, rows, tile, cached=False)
        if vals is not None:
            out[dst] = vals[:, ys - r.start : ye - r.start, xs - c.start : xe - c.start]
        elif store.state(tile) == SKIPPED:
            out[dst] = background
    return out, grid
