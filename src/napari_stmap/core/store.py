"""Zarr store of cached predictions: embeddings per tile, a done-map and everything to read them.

Layout of a store (a zarr v3 group, a folder ending in ``.zarr`` by convention)::

    embedding    (D, H_out, W_out) float16 (or float32), one chunk per tile's output region,
                 fill NaN: a tile not (yet) predicted reads as NaN
    done         (rows, cols) uint8 tile grid: 0 to do, 1 done, 2 skipped (off tissue);
                 one chunk per tile, so concurrent writers never share a chunk
    head_weight  (G + 1, D) float32 and head_bias (G + 1,) float32: the model's pointwise
                 head, so gene maps can be computed from the store without the model
    attrs["stmap"]  format version, package version, model identity (sha256 of its tensors,
                 arch, genes, mpp, stride, halo, model file path if known), slide identity
                 (path, file size, level-0 shape, µm/px, sha256 of the file's first and last
                 256 KiB), the TileSpec, the output MapGrid, the embedding dtype and a random
                 ``store_id``

Axis order is (C, H, W) for maps and (y, x) for grids; positions are level-0 px of the slide
(:attr:`PredictionStore.grid`). A tile is written embedding first, done flag second (zarr
writes each chunk file atomically), so a crash loses at most the tiles in flight and a resumed
run produces the same store as an uninterrupted one.

:class:`LRUCache` is the byte-limited cache used for decoded embedding chunks (shared by all
views of a store) and, in :mod:`~napari_stmap.core.predict.reader`, for decoded slide blocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import MapGrid
from napari_stmap.core.tiling import TileSpec

if TYPE_CHECKING:
    from .io.slide import Slide

__all__ = [
    "DONE",
    "SKIPPED",
    "STORE_FORMAT_VERSION",
    "TODO",
    "LRUCache",
    "PredictionStore",
    "model_hash",
    "open_store",
    "slide_identity",
    "store_path_for",
]

log = logging.getLogger(__name__)

#: Layout version written into every store.
STORE_FORMAT_VERSION = 1
#: Done-map values.
TODO, DONE, SKIPPED = 0, 1, 2
#: Default byte limit of the decoded-embedding cache of a store.
DEFAULT_EMBEDDING_CACHE_BYTES = 512 * 2**20
#: Default byte limit of the cache of computed gene-map chunks (views) of a store.
DEFAULT_VIEW_CACHE_BYTES = 128 * 2**20
_ATTR = "stmap"
_HEAD_BYTES = 256 * 1024
_DTYPES = ("float16", "float32")


# ---------------------------------------------------------------------------------- cache
class LRUCache:
    """Thread-safe least-recently-used cache limited by the bytes of its values.

    Parameters
    ----------
    max_bytes : int
        Upper bound of the summed ``nbytes`` of the cached values; a value larger than this
        is never cached.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(int(max_bytes), 0)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The cached value (marked as recently used), else ``default``."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return default

    def put(self, key: Hashable, value: Any) -> None:
        """Cache ``value`` (it must have ``nbytes``), evicting the least recently used."""
        size = int(getattr(value, "nbytes", 0))
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return
            self._items[key] = value
            self._sizes[key] = size
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                self._pop(next(iter(self._items)))

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """Cached value of ``key``, else ``compute()`` (run outside the lock) cached."""
        sentinel = object()
        value = self.get(key, sentinel)
        if value is sentinel:
            value = compute()
            self.put(key, value)
        return value

    def pop(self, key: Hashable) -> None:
        """Drop ``key`` if cached."""
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._sizes.clear()
            self.nbytes = 0

    def _pop(self, key: Hashable) -> None:
        if key in self._items:
            del self._items[key]
            self.nbytes -= self._sizes.pop(key)


# ------------------------------------------------------------------------------ identities
def model_hash(model: Any) -> str:
    """sha256 (hex) of a model's tensors and of what its outputs mean.

    Covers every tensor of the state dict (name, dtype, shape, bytes), the pixel mean/std and
    the genes, µm/px, stride and normalisation; a model and the same model saved and loaded
    again (:func:`~napari_stmap.core.model.save_model`) hash alike.
    """
    import torch

    h = hashlib.sha256()
    about = {k: getattr(model, k, None) for k in ("arch", "mpp", "stride", "normalisation")}
    about["genes"] = list(getattr(model, "genes", ()))
    h.update(json.dumps(about, sort_keys=True).encode())
    tensors = dict(model.state_dict())
    for name in ("pixel_mean", "pixel_std"):
        if isinstance(getattr(model, name, None), torch.Tensor):
            tensors[f"@{name}"] = getattr(model, name)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def slide_identity(slide: Slide) -> dict[str, Any]:
    """What identifies a slide: path, file size, level-0 shape (y, x), µm/px, content hash.

    The hash is the sha256 of the file's size and its first and last 256 KiB (cheap on a
    multi-GB slide, and different for any two scans).
    """
    path = Path(slide.path).resolve()
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_HEAD_BYTES))
        f.seek(max(size - _HEAD_BYTES, 0))
        h.update(f.read(_HEAD_BYTES))
    return {
        "path": str(path),
        "size_bytes": int(size),
        "shape_yx": [int(v) for v in slide.shape_yx],
        "mpp": float(slide.mpp),
        "sha256_ends": h.hexdigest(),
    }


def store_path_for(slide_path: str | Path, model_path: str | Path, root: str | Path) -> Path:
    """Where the viewer keeps the prediction store of a slide and a model file, under ``root``.

    ``ROOT/STEM-SLIDEKEY-MODELKEY.zarr``: the slide's file name up to its first dot, the first
    10 hex digits of the sha1 of its resolved path, and those of the sha1 of the model file's
    bytes (so a retrained model gets a new store). Reads the whole model file: not on a GUI
    thread. Creates nothing.
    """
    slide = Path(slide_path)
    slide_key = hashlib.sha1(str(slide.resolve()).encode()).hexdigest()[:10]
    digest = hashlib.sha1()
    with open(model_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stem = slide.name.split(".")[0]
    return Path(root) / f"{stem}-{slide_key}-{digest.hexdigest()[:10]}.zarr"


def _model_identity(model: Any, model_path: str | Path | None) -> dict[str, Any]:
    return {
        "sha256": model_hash(model),
        "arch": getattr(model, "arch", ""),
        "genes": list(model.genes),
        "output_names": list(model.output_names),
        "mpp": float(model.mpp),
        "stride": int(model.stride),
        "halo_px": int(model.halo_px),
        "normalisation": str(getattr(model, "normalisation", "")),
        "path": None if model_path is None else str(Path(model_path).resolve()),
    }


def _same_slide(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("size_bytes", "shape_yx", "sha256_ends")
    return all(a.get(k) == b.get(k) for k in keys) and math.isclose(a["mpp"], b["mpp"])


def _describe_model(m: dict[str, Any]) -> str:
    return f"model {m['sha256'][:12]} ({m.get('arch') or '?'}, {len(m['genes'])} genes)"


def _describe_slide(s: dict[str, Any]) -> str:
    h, w = s["shape_yx"]
    return f"slide {s['path']} ({h} x {w} px, {s['mpp']:g} µm/px)"


# ---------------------------------------------------------------------------------- store
class PredictionStore:
    """An open prediction store (see the module notes for the layout).

    Use :func:`open_store` to create or open one. The done-map is kept in memory and updated by
    :meth:`write_tile` / :meth:`mark_skipped`; :meth:`refresh` rereads it when other
    processes write to the same store.

    Attributes
    ----------
    path : Path
        The store folder.
    spec : TileSpec
        The tile plan the store was made with.
    meta : dict
        ``attrs["stmap"]``: model and slide identities, versions, grid.
    cache : LRUCache
        Decoded embedding chunks (float32 ``(D, h, w)``), shared by all views of this store.
    view_cache : LRUCache
        Gene-map chunks computed from them by the views (see :mod:`~napari_stmap.core.predict.views`).

    Notes
    -----
    *Previews* (:meth:`write_preview`) are embeddings of parts of tiles still to do, made by
    small tiles so that a viewer shows its first pixels sooner (see
    :mod:`~napari_stmap.core.predict.preview`). They live in memory only, are never read by
    :meth:`read_embedding` (so region sums, exports and whole-slide views never see them) and
    are dropped when the tile itself is written: the files on disk hold regular tiles only.
    """

    def __init__(self, group: Any, path: Path, *, cache_bytes: int, writable: bool) -> None:
        self.path = path
        self._group = group
        self.meta: dict[str, Any] = dict(group.attrs[_ATTR])
        self.spec = TileSpec.from_dict(self.meta["spec"])
        self._emb = group["embedding"]
        self._done_arr = group["done"]
        self.head_weight = np.asarray(group["head_weight"][...], dtype=np.float32)
        self.head_bias = np.asarray(group["head_bias"][...], dtype=np.float32)
        self.cache = LRUCache(cache_bytes)
        self.view_cache = LRUCache(DEFAULT_VIEW_CACHE_BYTES)
        self.writable = writable
        self._lock = threading.Lock()
        self.done = np.zeros(self.spec.grid_shape, dtype=np.uint8)
        self._previews: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        self.refresh()

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"PredictionStore({str(self.path)!r}, tiles {self.spec.grid_shape}, "
            f"done {c['done']}, skipped {c['skipped']}, todo {c['todo']})"
        )

    # --- description --------------------------------------------------------------------
    @property
    def grid(self) -> MapGrid:
        """Where the output map lies (level-0 px origin and pixel size)."""
        return self.spec.grid

    @property
    def output_names(self) -> tuple[str, ...]:
        """The G + 1 output channels: genes, then ``"total"``."""
        return tuple(self.meta["model"]["output_names"])

    @property
    def genes(self) -> tuple[str, ...]:
        """The G gene names."""
        return tuple(self.meta["model"]["genes"])

    @property
    def embed_dim(self) -> int:
        """D, channels of the embedding."""
        return int(self._emb.shape[0])

    @property
    def dtype(self) -> np.dtype:
        """dtype the embeddings are stored in."""
        return np.dtype(self._emb.dtype)

    def channel_index(self, name_or_index: str | int) -> int:
        """Output channel of a gene name, ``"total"`` or an integer index."""
        names = self.output_names
        if isinstance(name_or_index, (int, np.integer)) and -len(names) <= name_or_index < len(
            names
        ):
            return int(name_or_index) % len(names)
        if isinstance(name_or_index, str) and name_or_index in names:
            return names.index(name_or_index)
        msg = f"{name_or_index!r} is not an output of the model of {self.path} ({len(names)} channels: {', '.join(names[:5])}, ...)"
        raise StmapInputError(msg)

    # --- done-map -----------------------------------------------------------------------
    def refresh(self) -> None:
        """Reread the done-map from disk (after other processes wrote tiles)."""
        fresh = np.asarray(self._done_arr[...], dtype=np.uint8)
        with self._lock:  # states only move on from TODO: keep flags set meanwhile
            self.done = np.maximum(self.done, fresh) if self.done.shape == fresh.shape else fresh
            for tile in [t for t in self._previews if self.done[t] != TODO]:
                del self._previews[tile]

    def state(self, tile: tuple[int, int]) -> int:
        """:data:`TODO`, :data:`DONE` or :data:`SKIPPED` for ``tile``."""
        return int(self.done[tile[0], tile[1]])

    def counts(self) -> dict[str, int]:
        """Number of tiles to do, done and skipped."""
        d = self.done
        return {
            "todo": int((d == TODO).sum()),
            "done": int((d == DONE).sum()),
            "skipped": int((d == SKIPPED).sum()),
        }

    def mark_skipped(self, tiles: Iterable[tuple[int, int]]) -> int:
        """Flag tiles still to do as skipped (off tissue); returns how many were flagged."""
        ij = np.array([t for t in tiles if self.done[t[0], t[1]] == TODO], dtype=np.int64)
        if ij.size == 0:
            return 0
        self._check_writable()
        self._done_arr.vindex[ij[:, 0], ij[:, 1]] = np.full(len(ij), SKIPPED, dtype=np.uint8)
        with self._lock:
            self.done[ij[:, 0], ij[:, 1]] = SKIPPED
        return len(ij)

    def _set_done(self, i: int, j: int, value: int) -> None:
        self._check_writable()
        self._done_arr[i, j] = np.uint8(value)
        with self._lock:
            self.done[i, j] = value

    # --- embeddings ---------------------------------------------------------------------
    def write_tile(self, tile: tuple[int, int], embedding: np.ndarray) -> None:
        """Store a tile's embedding ``(D, h, w)`` (its core's output px), then flag it done.

        ``embedding`` may be larger than the tile's output region (a full tile at the
        region's edge); only the part inside the output map is written.
        """
        rows, cols = self.spec.output_slices(tile)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        data = np.asarray(embedding)[:, :h, :w].astype(self.dtype, copy=False)
        if data.shape != (self.embed_dim, h, w):
            msg = f"embedding of tile {tile} has shape {embedding.shape}; expected ({self.embed_dim}, >={h}, >={w})"
            raise ValueError(msg)
        self._check_writable()
        self._emb[:, rows, cols] = data
        if self.state(tile) != TODO:  # rewritten: drop what was decoded from the old data
            self.cache.pop((int(tile[0]), int(tile[1])))
            self.view_cache.clear()
        self._set_done(int(tile[0]), int(tile[1]), DONE)
        with self._lock:
            self._previews.pop((int(tile[0]), int(tile[1])), None)

    # --- previews (memory only) ---------------------------------------------------------
    def write_preview(self, tile: tuple[int, int], y0: int, x0: int, embedding: np.ndarray) -> bool:
        """Keep a preview of part of a tile still to do: embedding ``(D, h, w)`` float32 whose
        top-left output px is ``(y0, x0)`` relative to the tile's output region (clipped to it).

        Returns False (and keeps nothing) when the tile is no longer to do.
        """
        tile = (int(tile[0]), int(tile[1]))
        rows, cols = self.spec.output_slices(tile)
        h, w = rows.stop - rows.start - int(y0), cols.stop - cols.start - int(x0)
        emb = np.asarray(embedding, dtype=np.float32)
        if emb.ndim != 3 or emb.shape[0] != self.embed_dim:
            msg = f"preview of tile {tile} has shape {emb.shape}; expected ({self.embed_dim}, h, w)"
            raise ValueError(msg)
        emb = emb[:, : max(h, 0), : max(w, 0)]
        with self._lock:
            if self.done[tile] != TODO or emb.size == 0:
                return False
            self._previews.setdefault(tile, []).append((int(y0), int(x0), emb))
        return True

    def has_preview(self, tile: tuple[int, int]) -> bool:
        """Whether a tile still to do has a preview of some of its pixels."""
        return (int(tile[0]), int(tile[1])) in self._previews

    def preview_covers(self, tile: tuple[int, int], y0: int, x0: int, y1: int, x1: int) -> bool:
        """Whether previews of ``tile`` cover output px ``[y0, y1) × [x0, x1)`` of it."""
        with self._lock:
            parts = list(self._previews.get((int(tile[0]), int(tile[1])), ()))
        for py, px, emb in parts:
            if py <= y0 and px <= x0 and py + emb.shape[1] >= y1 and px + emb.shape[2] >= x1:
                return True
        return False

    def read_preview(self, tile: tuple[int, int]) -> np.ndarray | None:
        """A tile's previews as one ``(D, h, w)`` float32 embedding (NaN where none), else None."""
        tile = (int(tile[0]), int(tile[1]))
        with self._lock:
            parts = list(self._previews.get(tile, ()))
        if not parts:
            return None
        rows, cols = self.spec.output_slices(tile)
        out = np.full(
            (self.embed_dim, rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32
        )
        for py, px, emb in parts:
            out[:, py : py + emb.shape[1], px : px + emb.shape[2]] = emb
        return out

    def read_embedding(self, tile: tuple[int, int]) -> np.ndarray | None:
        """Decoded float32 embedding ``(D, h, w)`` of a done tile (cached), else None."""
        tile = (int(tile[0]), int(tile[1]))
        if self.state(tile) != DONE:
            return None
        return self.cache.get_or_compute(tile, lambda: self._read_chunk(tile))

    def _read_chunk(self, tile: tuple[int, int]) -> np.ndarray:
        rows, cols = self.spec.output_slices(tile)
        return np.asarray(self._emb[:, rows, cols], dtype=np.float32)

    def read_embedding_region(self, rows: slice, cols: slice) -> np.ndarray:
        """Embedding ``(D, h, w)`` float32 of an output-px window; NaN where not done."""
        out = np.full(
            (self.embed_dim, rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32
        )
        t = self.spec.out_tile_px
        for i in range(rows.start // t, -(-rows.stop // t)):
            for j in range(cols.start // t, -(-cols.stop // t)):
                emb = self.read_embedding((i, j))
                if emb is None:
                    continue
                r, c = self.spec.output_slices((i, j))
                ys, xs = max(r.start, rows.start), max(c.start, cols.start)
                ye, xe = min(r.stop, rows.stop), min(c.stop, cols.stop)
                out[:, ys - rows.start : ye - rows.start, xs - cols.start : xe - cols.start] = emb[
                    :, ys - r.start : ye - r.start, xs - c.start : xe - c.start
                ]
        return out

    def head_rows(self, channels: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
        """Head weights ``(k, D)`` and biases ``(k,)`` of some output channels, float32."""
        idx = [self.channel_index(c) for c in channels]
        return self.head_weight[idx], self.head_bias[idx]

    def _check_writable(self) -> None:
        if not self.writable:
            msg = f"{self.path} is open read-only; open it with mode='a' to write"
            raise StmapInputError(msg)


# ----------------------------------------------------------------------------------- open
def open_store(
    path: str | Path,
    model: Any = None,
    slide: Slide | None = None,
    spec: TileSpec | None = None,
    mode: str = "r",
    *,
    dtype: str = "float16",
    model_path: str | Path | None = None,
    cache_bytes: int = DEFAULT_EMBEDDING_CACHE_BYTES,
) -> PredictionStore:
    """Create or open a prediction store.

    Parameters
    ----------
    path : str or Path
        Store folder (``*.zarr``).
    model : StmapModel, optional
        The dense model; needed to create a store, and checked against an existing one.
    slide : Slide, optional
        The slide; needed to create, checked against an existing store.
    spec : TileSpec, optional
        Tile plan; needed to create, checked against an existing store.
    mode : {"r", "r+", "a", "w"}
        ``"r"`` read only; ``"r+"`` read/write an existing store; ``"a"`` open or create;
        ``"w"`` create, replacing an existing *store* (never another folder).
    dtype : {"float16", "float32"}
        Embedding dtype of a new store.
    model_path : path, optional
        Recorded in a new store (so it can be resumed from the store alone).
    cache_bytes : int
        Byte limit of the decoded-embedding cache.

    Returns
    -------
    PredictionStore

    Raises
    ------
    StmapInputError
        A missing store in mode ``"r"``/``"r+"``; a folder that is not a store; a store made by
        another model or from another slide, or with another tile plan (the message names both
        and says to pass another output path or delete the store).
    """
    import zarr

    if mode not in ("r", "r+", "a", "w"):
        msg = f"mode must be 'r', 'r+', 'a' or 'w', got {mode!r}"
        raise StmapInputError(msg)
    path = Path(path)
    exists = _is_store(path)
    if mode in ("r", "r+") and not exists:
        msg = f"{path} is not a napari-stmap prediction store; predict into it first (stmap predict --out {path})"
        raise StmapInputError(msg)
    if mode == "w" and exists:
        shutil.rmtree(path)
        exists = False
    if not exists:
        _check_free(path)
        _create(path, model, slide, spec, dtype, model_path)
    group = zarr.open_group(str(path), mode="r" if mode == "r" else "a")
    store = PredictionStore(group, path, cache_bytes=cache_bytes, writable=mode != "r")
    _check_matches(store, model, slide, spec)
    return store


def read_store_meta(path: str | Path) -> dict[str, Any] | None:
    """``attrs["stmap"]`` of the store at ``path``, or None when there is no store."""
    import zarr

    path = Path(path)
    if not _is_store(path):
        return None
    return dict(zarr.open_group(str(path), mode="r").attrs[_ATTR])


def _is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return _ATTR in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _check_free(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        msg = f"{path} exists and is not a napari-stmap prediction store; pass another output path"
        raise StmapInputError(msg)


def _create(
    path: Path, model: Any, slide: Slide | None, spec: TileSpec | None, dtype: str, model_path
) -> None:
    """Write an empty store: arrays, head weights and metadata."""
    import zarr

    import napari_stmap

    if model is None or slide is None or spec is None:
        msg = f"{path} does not exist yet: creating a store needs the model, the slide and the tile spec"
        raise StmapInputError(msg)
    if dtype not in _DTYPES:
        msg = f"embedding dtype must be one of {_DTYPES}, got {dtype!r}"
        raise StmapInputError(msg)
    weight, bias = model.head_rows(list(range(model.num_outputs)))
    h_out, w_out = spec.out_shape_hw
    t = spec.out_tile_px
    group = zarr.open_group(str(path), mode="w")
    group.create_array(
        "embedding",
        shape=(weight.shape[1], h_out, w_out),
        chunks=(weight.shape[1], min(t, h_out), min(t, w_out)),
        dtype=dtype,
        fill_value=np.nan,
        compressors=None,
        dimension_names=("c", "y", "x"),
    )
    group.create_array(
        "done", shape=spec.grid_shape, chunks=(1, 1), dtype="uint8", fill_value=0, compressors=None
    )
    group.create_array("head_weight", data=np.asarray(weight, dtype=np.float32))
    group.create_array("head_bias", data=np.asarray(bias, dtype=np.float32))
    grid = spec.grid
    group.attrs[_ATTR] = {
        "format_version": STORE_FORMAT_VERSION,
        "napari_stmap_version": napari_stmap.__version__,
        "model": _model_identity(model, model_path),
        "slide": slide_identity(slide),
        "spec": spec.to_dict(),
        "grid": {
            "origin_yx": list(grid.origin_yx),
            "pixel_px": grid.pixel_px,
            "shape_hw": list(grid.shape_hw),
        },
        "embedding_dtype": dtype,
        "store_id": uuid.uuid4().hex,
    }
    log.info("created prediction store %s: %d x %d tiles", path, *spec.grid_shape)


def _check_matches(
    store: PredictionStore, model: Any, slide: Slide | None, spec: TileSpec | None
) -> None:
    """Refuse a store made by another model, from another slide or with another tile plan."""
    old_m, old_s = store.meta["model"], store.meta["slide"]
    new_m = _model_identity(model, None) if model is not None else old_m
    new_s = slide_identity(slide) if slide is not None else old_s
    fix = f"pass another output path (--out) or delete {store.path} to start over"
    if new_m["sha256"] != old_m["sha256"] or not _same_slide(new_s, old_s):
        msg = (
            f"{store.path} holds predictions of {_describe_model(old_m)} on {_describe_slide(old_s)}; "
            f"you are predicting with {_describe_model(new_m)} on {_describe_slide(new_s)}: {fix}"
        )
        raise StmapInputError(msg)
    if new_s["path"] != old_s["path"]:
        log.info(
            "%s: slide moved from %s to %s (same content)", store.path, old_s["path"], new_s["path"]
        )
    if spec is not None and spec != store.spec:
        old, new = store.spec, spec
        msg = (
            f"{store.path} was made with tiles of {old.tile_px} model px, halo {old.halo_px} px over "
            f"region {old.origin_model_yx}+{old.size_model_hw}; you asked for {new.tile_px} px, halo "
            f"{new.halo_px} px over {new.origin_model_yx}+{new.size_model_hw}: leave tile_px/halo_px "
            f"unset to reuse the store's, or {fix}"
        )
        raise StmapInputError(msg)
