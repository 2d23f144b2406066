"""The engine: seamless tiles, the store, resume, schedulers, priorities, cancel, gene views."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.io.slide import open_slide, read_at_mpp
from napari_stmap.core.model import create_model, load_model, save_model
from napari_stmap.core.predict import (
    Predictor,
    SlideReader,
    ensure_region,
    gene_pyramid,
    gene_view,
    model_cache_info,
    predict_cohort,
    predict_map,
    predict_slide,
    region_map,
    view_grid,
)
from napari_stmap.core.store import DONE, SKIPPED, TODO, LRUCache, open_store
from napari_stmap.core.tiling import plan_tiles

GENES = [f"G{i}" for i in range(6)]
TILE = 128  # model px; the synthetic slide (600 x 800 px at 0.5 µm/px) has 5 x 7 tiles


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def clean(slide, model_file, tmp_path_factory):
    """A clean, uninterrupted whole-slide run (threaded scheduler)."""
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    return predict_slide(slide, model_file, path, tile_px=TILE, batch_size=4)


def _assert_same_store(a, b) -> None:
    ga, gb = zarr.open_group(str(a.path), mode="r"), zarr.open_group(str(b.path), mode="r")
    for name in ("embedding", "done", "head_weight", "head_bias"):
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)


# ------------------------------------------------------------------------------- seamless
def test_tiles_are_seamless_and_match_one_big_pass(slide, model, tmp_path):
    bbox = (96, 160, 352, 480)  # model px = level-0 px here; aligned to the encoder's 16 px
    with Predictor(
        slide, model, tmp_path / "s.zarr", tile_px=64, dtype="float32", tissue=False
    ) as p:
        got, grid = ensure_region(p, bbox)
        emb = p.store.read_embedding_region(*p.store.grid.crop_slices(bbox))
        assert p.spec.n_tiles > 100 and p.store.counts()["done"] == len(p.spec.tiles_in_bbox(bbox))
    h, s = model.halo_px, model.stride
    image = SlideReader(slide, p.spec).read_level(96 - h, 160 - h, 352 + h, 480 + h)
    with torch.inference_mode():
        e = model.embed(model.preprocess(image))[..., h // s : -h // s, h // s : -h // s]
        want = model.head(e)[0].numpy()
    assert grid.origin_yx == (96.0, 160.0) and got.shape == want.shape == (7, 64, 80)
    np.testing.assert_allclose(emb, e[0].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    ref, ref_grid = predict_map(model, slide, bbox, tile_px=128)  # the simple predictor agrees
    np.testing.assert_allclose(
        ref[:, ref_grid.crop_slices(bbox)[0], ref_grid.crop_slices(bbox)[1]], got, atol=1e-4
    )


def test_reader_matches_read_at_mpp_with_and_without_resizing(slide):
    for mpp in (0.5, 1.3):
        fake = SimpleNamespace(mpp=mpp, stride=4, halo_px=32, align_px=16, input_kind="dense")
        spec = plan_tiles(slide, fake, tile_px=64)
        reader = SlideReader(slide, spec, cache_bytes=2**20)  # the 1.4 MB level block is not kept
        for tile in [(0, 0), (1, 2), (spec.grid_shape[0] - 1, spec.grid_shape[1] - 1)]:
            y0, x0, y1, x1 = spec.window_model(tile)
            want = read_at_mpp(slide, (y0, x0), (y1 - y0, x1 - x0), mpp)
            np.testing.assert_array_equal(reader.window(tile), want)
        assert len(reader.cache) == 0


# ----------------------------------------------------------------------------------- store
def test_store_refuses_another_model_slide_or_plan(slide, model, model_file, clean, tmp_path):
    torch.manual_seed(5)
    other_model = create_model("pixnet_tiny", genes=GENES)
    pattern = r"holds predictions of model [0-9a-f]{12} .* with model [0-9a-f]{12} .*--out.*delete"
    with pytest.raises(StmapInputError, match=pattern):
        open_store(clean.path, other_model, slide, clean.spec, "a")
    rgb = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "other.tif", rgb)
    other_slide = open_slide(tmp_path / "other.tif", mpp=0.5)
    with pytest.raises(StmapInputError, match=r"other\.tif"):
        open_store(clean.path, model, other_slide, clean.spec, "a")
    with pytest.raises(StmapInputError, match="tiles of 128 model px"):
        Predictor(slide, model, clean.path, tile_px=64)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with pytest.raises(StmapInputError, match="not a napari-stmap prediction store"):
        open_store(tmp_path / "folder", model, slide, clean.spec, "a")
    with pytest.raises(StmapInputError, match="not a napari-stmap prediction store"):
        open_store(tmp_path / "missing.zarr")
    same = open_store(clean.path, load_model(model_file), slide, clean.spec, "r")  # same tensors
    assert same.meta["model"]["path"] == str(model_file.resolve())
    with pytest.raises(StmapInputError, match="read-only"):
        same.write_tile((0, 0), np.zeros((16, 32, 32)))


def test_killed_run_resumes_to_the_identical_store(slide, model_file, clean, tmp_path):
    path = tmp_path / "killed.zarr"
    seen = []

    def crash_after_five(tile):
        seen.append(tile)
        if len(seen) == 5:
            raise RuntimeError("killed")

    with Predictor(
        slide, model_file, path, tile_px=TILE, batch_size=2, on_tile_done=crash_after_five
    ) as p:
        p.request()
        with pytest.raises(RuntimeError, match="killed"):
            p.wait(60)
        assert p.wait(60)
    store = open_store(path)
    assert 5 <= store.counts()["done"] < clean.counts()["done"]
    # a crash between a chunk and its done flag: the chunk is there, the flag is not
    torn = next(t for t in store.spec.tiles() if store.state(t) == TODO and clean.state(t) == DONE)
    zarr.open_group(str(path), mode="a")["embedding"][
        (slice(None), *store.spec.output_slices(torn))
    ] = 7.0
    resumed = predict_slide(slide.path, model_file, path, batch_size=3)
    _assert_same_store(resumed, clean)
    assert resumed.counts() == clean.counts() and clean.counts()["skipped"] > 0


def test_distributed_equals_threaded(slide, model_file, clean, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        store = predict_slide(
            slide.path,
            model_file,
            tmp_path / "d.zarr",
            scheduler=cluster.scheduler_address,
            tile_px=TILE,
            tiles_per_task=4,
        )
    _assert_same_store(store, clean)


@pytest.mark.slow
def test_distributed_worker_processes_load_the_model_once(slide, model_file, clean, tmp_path):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        store = predict_slide(
            slide.path,
            model_file,
            tmp_path / "p.zarr",
            scheduler=client,
            tile_px=TILE,
            tiles_per_task=2,
        )
        loads = client.run(model_cache_info)
    assert [v["model_loads"] for v in loads.values()] == [1]  # 16 tasks, one load
    _assert_same_store(store, clean)


def test_cohort_runs_as_one_graph_and_loads_the_model_once(slide, model_file, clean, tmp_path):
    before = model_cache_info()["model_loads"]
    box = (0, 0, 300, 400)
    stores = predict_cohort(
        [(slide.path, tmp_path / "a.zarr"), (slide, tmp_path / "b.zarr")],
        model_file,
        tile_px=TILE,
        tiles_per_task=1,
        region=box,
    )
    assert model_cache_info()["model_loads"] - before <= 1  # 2 slides x 9 tasks
    want, _ = region_map(clean, box)
    for store in stores:
        got, _ = region_map(store, box)
        np.testing.assert_array_equal(got, want)
        assert store.counts()["done"] + store.counts()["skipped"] == len(
            store.spec.tiles_in_bbox(box)
        )


def test_ensure_region_from_a_store_path_predicts_what_is_missing(
    slide, model_file, clean, tmp_path
):
    path = tmp_path / "e.zarr"
    predict_slide(slide, model_file, path, tile_px=TILE, region=(0, 0, 100, 100))
    bbox = (200.0, 300.0, 420.0, 610.0)
    got, grid = ensure_region(path, bbox, channels=["G1", "total"])
    want, want_grid = region_map(clean, bbox, channels=["G1", "total"])
    assert grid == want_grid and got.shape == (2, *grid.shape_hw)
    np.testing.assert_array_equal(got, want)
    assert not np.isnan(got).any()


# ------------------------------------------------------------------------------ scheduling
def test_requests_run_centre_first_and_the_latest_first(slide, model, tmp_path):
    order = []
    a, b, c = (0, 0, 300, 300), (300, 400, 600, 800), (0, 600, 100, 800)
    with Predictor(
        slide,
        model,
        tmp_path / "p.zarr",
        tile_px=TILE,
        batch_size=1,
        tissue=False,
        paused=True,
        on_tile_done=order.append,
    ) as p:
        na, nb = p.request(a), p.request(b)
        nc = p.request(c, priority=-1)  # lower priority: after both
        p.resume()
        assert p.wait(60)
        spec = p.spec
    assert (na, nb, nc) == (9, 12, 3) and len(order) == len(set(order)) == 24
    assert set(order[:nb]) == set(spec.tiles_in_bbox(b))
    assert set(order[nb : nb + na]) == set(spec.tiles_in_bbox(a))
    for box, part in ((b, order[:nb]), (a, order[nb : nb + na])):
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        dists = [math.dist(spec.tile_center_level0(t), centre) for t in part]
        assert dists == sorted(dists)


def test_cancel_stops_cleanly_and_keeps_the_store_consistent(slide, model, tmp_path):
    done = []
    with Predictor(
        slide, model, tmp_path / "c.zarr", tile_px=TILE, batch_size=2, tissue=False
    ) as p:

        def cancel_at_first(tile):
            done.append(tile)
            if len(done) == 1:
                p.cancel()

        p.on_tile_done = cancel_at_first
        n = p.request()
        assert p.wait(60) and p.pending == 0
        assert 1 <= len(done) <= 8 < n  # the batches already inferred are still written
        store = p.store
        for tile in store.spec.tiles():
            chunk = store._read_chunk(tile)
            assert np.isnan(chunk).all() == (store.state(tile) == TODO)
            assert not np.isnan(chunk).any() or store.state(tile) == TODO
        assert p.request() == n - len(done)  # and it carries on
        assert p.wait(60) and store.counts()["done"] == n == len(done)


def test_queue_reports_finished_tiles_and_the_network_runs_off_thread(slide, model, tmp_path):
    import queue
    import threading

    threads = set()
    q: queue.Queue = queue.Queue()
    original = model.embed

    def spy(x):
        threads.add(threading.current_thread().name)
        return original(x)

    model.embed = spy
    try:
        with Predictor(slide, model, tmp_path / "q.zarr", tile_px=TILE, done_queue=q) as p:
            n = p.request((270, 280, 280, 290))
            assert n == 1 and p.wait(60)
    finally:
        del model.embed
    assert q.get_nowait() == (2, 2) and q.empty()
    assert threads == {"stmap-predictor"}


# ----------------------------------------------------------------------------------- views
def test_gene_views_apply_the_head_to_cached_embeddings(clean, model):
    store = open_store(clean.path)
    k = store.channel_index("G2")
    absolute = gene_view(store, "G2", mode="absolute").compute()
    normalised = gene_view(store, "G2").compute()
    e = store.read_embedding_region(slice(0, 150), slice(0, 200))
    with torch.inference_mode():
        y = model.head(torch.from_numpy(e)[None])[0].numpy()
    assert absolute.shape == normalised.shape == store.grid.shape_hw == (150, 200)
    np.testing.assert_allclose(absolute, y[k], rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(normalised, np.log1p(1e4 * y[k] / y[-1]), rtol=1e-5, equal_nan=True)
    states = np.zeros(store.grid.shape_hw, dtype=int)
    for tile in store.spec.tiles():
        states[store.spec.output_slices(tile)] = store.state(tile)
    assert (states == SKIPPED).any() and (states == DONE).any()
    assert np.isnan(absolute[states != DONE]).all() and not np.isnan(absolute[states == DONE]).any()
    filled = gene_view(store, "G2", mode="absolute", background=0.0).compute()
    assert (filled[states == SKIPPED] == 0).all()
    np.testing.assert_array_equal(
        store.head_rows(["G2", "total"])[0], model.head_rows(["G2", "total"])[0]
    )
    with pytest.raises(StmapInputError, match="not an output"):
        gene_view(store, "NOPE")


def test_views_show_nan_until_tiles_are_predicted(slide, model, tmp_path):
    with Predictor(slide, model, tmp_path / "v.zarr", tile_px=TILE, paused=True) as p:
        view = p.gene_view("G0")
        assert np.isnan(view.compute()).all()
        p.request((270, 280, 280, 290))
        p.resume()
        assert p.wait(60)
        now = p.gene_view("G0").compute()
    rows, cols = p.spec.output_slices((2, 2))
    assert (
        not np.isnan(now[rows, cols]).any()
        and np.isnan(now).sum() == now.size - now[rows, cols].size
    )


def test_pyramid_means_absolute_and_normalises_sums(clean):
    store = clean
    absolute = gene_pyramid(store, "G1", "absolute", min_px=16)
    normalised = gene_pyramid(store, "G1", min_px=16)
    assert [a.shape for a in absolute] == [(150, 200), (75, 100), (38, 50), (19, 25), (10, 13)]
    l0, l1 = absolute[0].compute(), absolute[1].compute()
    np.testing.assert_allclose(
        l1, l0.reshape(75, 2, 100, 2).mean(axis=(1, 3)), rtol=1e-5, equal_nan=True
    )
    total = gene_view(store, "total", mode="absolute").compute()
    gs, ts = (a.reshape(75, 2, 100, 2).sum(axis=(1, 3)) for a in (l0, total))
    np.testing.assert_allclose(
        normalised[1].compute(), np.log1p(1e4 * gs / ts), rtol=1e-5, equal_nan=True
    )
    assert view_grid(store, 2).pixel_px == 4 * store.grid.pixel_px
    assert view_grid(store, 2).shape_hw == absolute[2].shape


def test_lru_caches_respect_their_byte_limit(clean):
    cache = LRUCache(100)
    for key in "abc":
        cache.put(key, np.zeros(40, dtype=np.uint8))
    assert list(cache._items) == ["b", "c"] and cache.nbytes == 80
    cache.get("b")
    cache.put("d", np.zeros(40, dtype=np.uint8))
    assert list(cache._items) == ["b", "d"]
    cache.put("huge", np.zeros(101, dtype=np.uint8))
    assert "huge" not in cache and cache.nbytes <= 100
    chunk_bytes = 16 * 32 * 32 * 4  # D x tile output px, float32
    store = open_store(clean.path, cache_bytes=3 * chunk_bytes)
    gene_view(store, "G0").compute()
    assert 2 * chunk_bytes <= store.cache.nbytes <= 3 * chunk_bytes
    assert store.view_cache.nbytes <= store.view_cache.max_bytes
