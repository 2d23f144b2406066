"""The prediction store (core/store.py) on its own: no predictor, embeddings written by hand.

A tiny random-init PixNet and the small synthetic slide (conftest, 600 × 800 px at 0.5 µm/px)
planned in 128 model px tiles (5 × 7 tiles, the last row and column cut by the slide's edge).
"""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest

from napari_stmap.core.errors import StmapInputError

torch = pytest.importorskip("torch")
zarr = pytest.importorskip("zarr")

GENES = ["G0", "G1", "G2", "G3"]


@pytest.fixture(scope="module")
def model():
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


@pytest.fixture(scope="module")
def spec(slide, model):
    from napari_stmap.core.tiling import plan_tiles

    return plan_tiles(slide, model, tile_px=128)


@pytest.fixture
def new(tmp_path, model, slide, spec):
    """Create a fresh store: ``new(name, **open_store options)``."""
    from napari_stmap.core.store import open_store

    def make(name="s.zarr", **kw):
        return open_store(tmp_path / name, model, slide, spec, "a", **kw)

    return make


def _embedding(store, tile, seed=0):
    """Random (D, h, w) float32 for ``tile``'s output region."""
    rows, cols = store.spec.output_slices(tile)
    shape = (store.embed_dim, rows.stop - rows.start, cols.stop - cols.start)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------- a new store
def test_new_store_describes_model_slide_and_plan(new, model, slide, spec):
    from napari_stmap.core.store import (
        STORE_FORMAT_VERSION,
        TODO,
        model_hash,
        read_store_meta,
        slide_identity,
    )

    store = new()
    assert store.spec == spec and store.grid == spec.grid and spec.grid_shape == (5, 7)
    assert store.counts() == {"todo": spec.n_tiles, "done": 0, "skipped": 0}
    assert all(store.state(t) == TODO for t in spec.tiles())
    assert store.genes == tuple(GENES) and store.output_names == (*GENES, "total")
    assert store.dtype == np.float16 and store.writable
    meta = store.meta
    assert meta["format_version"] == STORE_FORMAT_VERSION and len(meta["store_id"]) == 32
    assert meta["model"]["sha256"] == model_hash(model) and meta["model"]["arch"] == model.arch
    assert meta["slide"] == slide_identity(slide)
    assert meta["slide"]["shape_yx"] == [600, 800] and meta["slide"]["mpp"] == 0.5
    assert read_store_meta(store.path) == meta
    group = zarr.open_group(str(store.path), mode="r")
    h, w = spec.out_shape_hw
    assert group["embedding"].shape == (store.embed_dim, h, w)
    assert group["done"].shape == spec.grid_shape and group["done"].chunks == (1, 1)
    assert "done 0" in repr(store) and f"todo {spec.n_tiles}" in repr(store)


def test_unwritten_tiles_read_as_nothing(new):
    store = new()
    assert store.read_embedding((0, 0)) is None
    region = store.read_embedding_region(slice(0, 40), slice(10, 50))
    assert region.shape == (store.embed_dim, 40, 40) and np.isnan(region).all()


def test_model_hash_ignores_a_save_and_load(model, tmp_path):
    from napari_stmap.core.model import create_model, load_model, save_model
    from napari_stmap.core.store import model_hash

    save_model(model, tmp_path / "m.safetensors")
    assert model_hash(load_model(tmp_path / "m.safetensors")) == model_hash(model)
    torch.manual_seed(1)
    assert model_hash(create_model("pixnet_tiny", genes=GENES)) != model_hash(model)


# ------------------------------------------------------------------------------ tile states
def test_tile_states_and_counts(new):
    from napari_stmap.core.store import DONE, SKIPPED, TODO

    store = new(dtype="float32")
    emb = _embedding(store, (1, 2))
    store.write_tile((1, 2), emb)
    assert store.state((1, 2)) == DONE
    np.testing.assert_array_equal(store.read_embedding((1, 2)), emb)  # float32: exact
    assert store.mark_skipped([(0, 0), (0, 1), (1, 2)]) == 2  # a done tile stays done
    assert store.mark_skipped([(0, 0)]) == 0  # already skipped
    assert [store.state(t) for t in [(0, 0), (0, 1), (1, 2), (2, 2)]] == [
        SKIPPED,
        SKIPPED,
        DONE,
        TODO,
    ]
    assert store.counts() == {"todo": 35 - 3, "done": 1, "skipped": 2}
    assert store.read_embedding((0, 0)) is None  # skipped: no data
    rewritten = _embedding(store, (1, 2), seed=1)
    store.write_tile((1, 2), rewritten)  # a rewrite replaces what was cached
    np.testing.assert_array_equal(store.read_embedding((1, 2)), rewritten)
    assert store.counts()["done"] == 1


def test_edge_tiles_and_regions_across_tiles(new):
    store = new(dtype="float32")
    last = (store.spec.grid_shape[0] - 1, store.spec.grid_shape[1] - 1)
    rows, cols = store.spec.output_slices(last)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    t = store.spec.out_tile_px
    assert (h, w) != (t, t)  # cut by the slide's edge
    full = np.random.default_rng(2).normal(size=(store.embed_dim, t, t)).astype(np.float32)
    store.write_tile(last, full)  # a full-size tile: only its part inside the map is kept
    np.testing.assert_array_equal(store.read_embedding(last), full[:, :h, :w])
    a, b = _embedding(store, (0, 0), 3), _embedding(store, (0, 1), 4)
    store.write_tile((0, 0), a)
    store.write_tile((0, 1), b)
    region = store.read_embedding_region(slice(t - 5, t + 3), slice(t - 4, t + 6))
    np.testing.assert_array_equal(region[:, :5, :4], a[:, t - 5 :, t - 4 :])
    np.testing.assert_array_equal(region[:, :5, 4:], b[:, t - 5 :, :6])
    assert np.isnan(region[:, 5:]).all()  # row 1 of tiles is not done
    with pytest.raises(ValueError, match=r"expected \("):
        store.write_tile((0, 0), np.zeros((store.embed_dim + 1, t, t), np.float32))


def test_float16_store_rounds_to_float16(new):
    store = new()
    emb = _embedding(store, (2, 3))
    store.write_tile((2, 3), emb)
    got = store.read_embedding((2, 3))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------------ reopen, crashes
def test_reopening_keeps_what_was_written(new, model, slide, spec):
    from napari_stmap.core.store import DONE, SKIPPED, open_store

    store = new(dtype="float32")
    path, store_id = store.path, store.meta["store_id"]
    written = {t: _embedding(store, t, seed=k) for k, t in enumerate([(0, 3), (2, 2), (4, 6)])}
    for tile, emb in written.items():
        store.write_tile(tile, emb)
    store.mark_skipped([(3, 0), (3, 1)])
    before = store.counts()
    del store  # a crash: nothing closed or flushed by hand
    gc.collect()
    again = open_store(path)  # read-only, from the path alone
    assert again.counts() == before == {"todo": 30, "done": 3, "skipped": 2}
    assert again.meta["store_id"] == store_id and not again.writable
    for tile, emb in written.items():
        assert again.state(tile) == DONE
        np.testing.assert_array_equal(again.read_embedding(tile), emb)
    assert again.state((3, 1)) == SKIPPED
    with pytest.raises(StmapInputError, match="read-only"):
        again.write_tile((0, 0), _embedding(again, (0, 0)))
    resumed = open_store(path, model, slide, spec, "a")  # resume: same store, more tiles
    resumed.write_tile((0, 0), _embedding(resumed, (0, 0)))
    assert resumed.meta["store_id"] == store_id and resumed.counts()["done"] == 4
    assert again.counts()["done"] == 3
    again.refresh()  # another writer's tiles become visible
    assert again.counts()["done"] == 4 and again.state((0, 0)) == DONE


def test_mode_w_replaces_a_store_and_r_plus_needs_one(new, model, slide, spec, tmp_path):
    from napari_stmap.core.store import open_store

    store = new()
    store.write_tile((0, 0), _embedding(store, (0, 0)))
    fresh = open_store(store.path, model, slide, spec, "w")
    assert fresh.counts()["done"] == 0 and fresh.meta["store_id"] != store.meta["store_id"]
    assert open_store(store.path, mode="r+").writable
    with pytest.raises(StmapInputError, match=r"missing\.zarr is not a napari-stmap"):
        open_store(tmp_path / "missing.zarr", mode="r+")


# ------------------------------------------------------------------------------- refusals
def test_a_folder_that_is_not_a_store_is_refused(tmp_path, model, slide, spec):
    from napari_stmap.core.store import open_store, read_store_meta

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for mode in ("a", "w"):  # never created over, never deleted
        with pytest.raises(StmapInputError, match=r"mine exists and is not a napari-stmap"):
            open_store(mine, model, slide, spec, mode)
    with pytest.raises(StmapInputError, match=r"mine is not a napari-stmap prediction store"):
        open_store(mine)
    assert (mine / "notes.txt").read_text() == "keep me" and read_store_meta(mine) is None
    other = tmp_path / "other.zarr"  # a zarr group, but not ours
    zarr.open_group(str(other), mode="w").attrs["something"] = 1
    with pytest.raises(StmapInputError, match=r"other\.zarr exists and is not a napari-stmap"):
        open_store(other, model, slide, spec, "w")
    assert zarr.open_group(str(other), mode="r").attrs["something"] == 1
    with pytest.raises(StmapInputError, match=r"other\.zarr is not a napari-stmap"):
        open_store(other)
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StmapInputError, match="not a napari-stmap"):
        open_store(tmp_path / "file.zarr", model, slide, spec, "a")


def test_bad_arguments_are_refused(tmp_path, model, slide, spec):
    from napari_stmap.core.store import open_store

    with pytest.raises(StmapInputError, match="mode must be .* got 'x'"):
        open_store(tmp_path / "s.zarr", model, slide, spec, "x")
    with pytest.raises(StmapInputError, match="needs the model, the slide and the tile spec"):
        open_store(tmp_path / "s.zarr", model, None, spec, "a")
    with pytest.raises(StmapInputError, match="got 'int8'"):
        open_store(tmp_path / "s.zarr", model, slide, spec, "a", dtype="int8")
    assert not (tmp_path / "s.zarr").exists()


def test_another_plan_is_refused(new, model, slide):
    from napari_stmap.core.store import open_store
    from napari_stmap.core.tiling import plan_tiles

    store = new()
    other = plan_tiles(slide, model, tile_px=64)
    with pytest.raises(StmapInputError, match="tiles of 128 model px.*you asked for 64 px"):
        open_store(store.path, model, slide, other, "a")


# ----------------------------------------------------------------------------- store names
def test_store_path_for_names_slide_and_model(tmp_path, small_sample):
    from napari_stmap.core.store import store_path_for

    root = tmp_path / "stores"
    m1, m2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    m1.write_bytes(b"weights one")
    m2.write_bytes(b"weights two")
    path = store_path_for(small_sample.slide, m1, root)
    assert path.parent == root and path.suffix == ".zarr" and path.name.startswith("he-")
    assert not root.exists()  # creates nothing
    assert store_path_for(str(small_sample.slide), str(m1), root) == path  # same slide + model
    assert store_path_for(small_sample.slide, m2, root) != path  # another model file
    copy = tmp_path / "copy" / "a.safetensors"  # the same bytes elsewhere: the same model
    copy.parent.mkdir()
    shutil.copy(m1, copy)
    assert store_path_for(small_sample.slide, copy, root) == path
    other_slide = tmp_path / small_sample.slide.name
    shutil.copy(small_sample.slide, other_slide)  # another slide file (by its path)
    assert store_path_for(other_slide, m1, root) != path
    slide_key, model_key = path.stem.split("-")[1:]
    assert len(slide_key) == len(model_key) == 10


# ---------------------------------------------------------------------------- head weights
def test_head_weights_round_trip(new, model):
    from napari_stmap.core.store import open_store

    store = new()
    weight, bias = model.head_rows(list(range(model.num_outputs)))
    again = open_store(store.path)
    for s in (store, again):
        assert s.head_weight.dtype == np.float32 and s.head_bias.dtype == np.float32
        assert s.head_weight.shape == (len(GENES) + 1, s.embed_dim)
        np.testing.assert_array_equal(s.head_weight, np.asarray(weight, np.float32))
        np.testing.assert_array_equal(s.head_bias, np.asarray(bias, np.float32))
    w, b = again.head_rows(["G2", "total", 0])
    np.testing.assert_array_equal(w, again.head_weight[[2, 4, 0]])
    np.testing.assert_array_equal(b, again.head_bias[[2, 4, 0]])
    emb = np.random.default_rng(0).normal(size=(again.embed_dim, 3, 5)).astype(np.float32)
    with torch.no_grad():
        want = model.head(torch.from_numpy(emb)[None])[0].numpy()
    z = np.einsum("kd,dhw->khw", w, emb) + b[:, None, None]
    got = np.logaddexp(0.0, z)  # softplus: the gene map from the store alone
    np.testing.assert_allclose(got, want[[2, 4, 0]], rtol=1e-4, atol=1e-6)


def test_channel_index_names_unknown_channels(new):
    store = new()
    assert store.channel_index("total") == 4 and store.channel_index(-1) == 4
    assert store.channel_index("G1") == 1
    with pytest.raises(StmapInputError, match="'NOPE' is not an output"):
        store.channel_index("NOPE")
    with pytest.raises(StmapInputError, match="7 is not an output"):
        store.channel_index(7)


# -------------------------------------------------------------------------------- LRU cache
def test_lru_cache_evicts_by_bytes():
    from napari_stmap.core.store import LRUCache

    cache = LRUCache(300)
    a, b, c = (np.zeros(100, np.uint8) for _ in range(3))
    cache.put("a", a)
    cache.put("b", b)
    cache.put("c", c)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("d", np.zeros(100, np.uint8))
    assert [k in cache for k in "abcd"] == [True, False, True, True]  # b was the oldest
    assert cache.nbytes == 300 and len(cache) == 3
    cache.put("big", np.zeros(301, np.uint8))  # larger than the limit: never kept
    assert "big" not in cache and cache.nbytes == 300
    calls = []
    value = cache.get_or_compute("e", lambda: calls.append(1) or np.ones(10, np.uint8))
    assert cache.get_or_compute("e", lambda: calls.append(2)) is value and calls == [1]
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
