"""LiveGeneView / ViewWorker: the non-blocking heatmaps the viewer reads (issue #5)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def predictor(small_sample, tmp_path_factory):
    """A predictor on the small sample, 64 px tiles, the left part of the slide predicted."""
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import Predictor

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:6]))
    store = tmp_path_factory.mktemp("live") / "store.zarr"
    with Predictor(small_sample.slide, model, store, tile_px=64, tissue=False) as pred:
        pred.request((0.0, 0.0, 600.0, 300.0))
        pred.wait()
        yield pred


@pytest.fixture
def worker():
    from napari_stmap.core.predict import ViewWorker

    with ViewWorker(name="stmap-views-test") as w:
        yield w


def _settled(view, worker, level=-1):
    """Read a whole level, let the worker compute what the read missed, read again."""
    arr = view.arrays[level]
    np.asarray(arr)
    assert worker.wait_idle(30)
    return np.asarray(arr)


@pytest.mark.parametrize("mode", ["normalised", "absolute"])
def test_live_view_equals_gene_pyramid_at_every_level(predictor, worker, small_sample, mode):
    from napari_stmap.core.predict import LiveGeneView, gene_pyramid

    gene = small_sample.genes[1]
    view = LiveGeneView(predictor, gene, mode, worker=worker, min_px=16)
    want = [np.asarray(a) for a in gene_pyramid(predictor, gene, mode, min_px=16)]
    assert len(view.arrays) == len(want) > 2
    for k, arr in enumerate(view.arrays):
        assert arr.shape == want[k].shape and arr.dtype == np.float32 and arr.ndim == 2
        got = _settled(view, worker, k)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want[k]))
        np.testing.assert_allclose(got, want[k], rtol=1e-6, equal_nan=True)
        assert np.isfinite(got).any() and np.isnan(got).any()  # part of the slide is predicted
    np.testing.assert_allclose(view.level_data(-1), want[-1], rtol=1e-6, equal_nan=True)


def test_reads_return_at_once_and_the_worker_computes(predictor, worker, small_sample):
    from napari_stmap.core.predict import live_view as engine

    threads = []
    real = engine._view_block

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    view = engine.LiveGeneView(predictor, small_sample.genes[2], worker=worker)
    try:
        engine._view_block = spy
        first = np.asarray(view.arrays[0])  # nothing computed yet: all transparent
        assert np.isnan(first).all()
        assert worker.wait_idle(30) and view.take_updated() and not view.take_updated()
        second = np.asarray(view.arrays[0])
    finally:
        engine._view_block = real
    assert np.isfinite(second).any()
    assert threads and set(threads) == {"stmap-views-test"}
    done = int((predictor.store.done == 1).sum())
    assert len(threads) == done  # one block per predicted tile, computed once


def test_numpy_indexing(predictor, worker, small_sample):
    from napari_stmap.core.predict import LiveGeneView, gene_view

    view = LiveGeneView(predictor, small_sample.genes[0], worker=worker)
    want = np.asarray(gene_view(predictor, small_sample.genes[0]))
    arr = view.arrays[0]
    _settled(view, worker, 0)
    for key in [
        (slice(3, 40), slice(5, 70)),
        (slice(None, None, 3), slice(10, 2, -2)),
        (7, slice(None)),
        (Ellipsis, 4),
        (slice(-20, None), -1),
        (slice(5, 5), slice(None)),
        np.s_[[1, 4, 9]],
    ]:
        np.testing.assert_allclose(arr[key], want[key], equal_nan=True, err_msg=str(key))
    assert len(arr) == want.shape[0] and arr.size == want.size


def test_tiles_done_recomputes_only_tiles_on_display(small_sample, tmp_path, worker):
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import LiveGeneView, Predictor, gene_view

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:6]))
    with Predictor(small_sample.slide, model, tmp_path / "s.zarr", tile_px=64, tissue=False) as p:
        view = LiveGeneView(p, small_sample.genes[0], worker=worker)
        spec = p.spec
        rows, cols = spec.output_slices((0, 0))
        view.arrays[0][rows, cols]  # on display: tile (0, 0) only
        assert worker.wait_idle(30) and not view.take_updated()  # nothing predicted yet
        p.request((0.0, 0.0, 600.0, 600.0))
        p.wait()
        done = list(zip(*np.nonzero(p.store.done == 1), strict=True))
        assert len(done) > 1
        assert view.tiles_done([t for t in done if t != (0, 0)]) == 0  # out of view: no work
        assert view.tiles_done(done) == 1
        assert worker.wait_idle(30) and view.take_updated()
        want = np.asarray(gene_view(p, small_sample.genes[0]))[rows, cols]
        np.testing.assert_allclose(view.arrays[0][rows, cols], want, rtol=1e-6)


def test_skipped_tiles_show_background(small_sample, tmp_path, worker):
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import LiveGeneView, Predictor
    from napari_stmap.core.store import SKIPPED

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:6]))
    with Predictor(small_sample.slide, model, tmp_path / "s.zarr", tile_px=64, tissue=False) as p:
        p.store.mark_skipped([(0, 0)])
        assert p.store.state((0, 0)) == SKIPPED
        view = LiveGeneView(p, small_sample.genes[0], worker=worker, background=0.0)
        rows, cols = p.spec.output_slices((0, 0))
        assert (view.arrays[0][rows, cols] == 0).all()
        assert np.isnan(view.arrays[0][rows.stop, cols.stop])  # not predicted: transparent


def test_a_failing_block_is_reported_and_close_joins(predictor, small_sample, monkeypatch):
    from napari_stmap.core.predict import live_view as engine

    def boom(*args, **kwargs):
        raise OSError("disk gone")

    w = engine.ViewWorker(name="stmap-views-boom")
    view = engine.LiveGeneView(predictor, small_sample.genes[0], worker=w)
    monkeypatch.setattr(engine, "_view_block", boom)
    np.asarray(view.arrays[0])
    assert w.wait_idle(30)
    assert isinstance(view.error, OSError)
    view.close()
    np.asarray(view.arrays[0])  # a closed view queues nothing
    assert w.pending == 0
    w.close()
    assert not any(t.name == "stmap-views-boom" for t in threading.enumerate())


def test_display_mask_hides_glass_and_keeps_tissue(predictor, worker, small_sample):
    """With a tissue mask, pixels whose centre is off tissue are NaN, the rest unchanged."""
    from napari_stmap.core.predict import LiveGeneView, gene_view, view_grid
    from napari_stmap.core.tiling import TissueMask

    h, w = predictor.slide.shape_yx
    mask = np.zeros((h // 10, w // 10), dtype=bool)  # mask px = 10 level-0 px
    mask[: mask.shape[0] // 2, : mask.shape[1] // 3] = True  # tissue: top-left block
    tissue = TissueMask(mask=mask, px_yx=(h / mask.shape[0], w / mask.shape[1]))
    gene = small_sample.genes[0]
    for level in (0, 1):
        view = LiveGeneView(predictor, gene, worker=worker, min_px=16, mask=tissue)
        got = _settled(view, worker, level)
        want = np.asarray(gene_view(predictor, gene, level=level))
        grid = view_grid(predictor.store, level)
        cy = grid.origin_yx[0] + (np.arange(got.shape[0]) + 0.5) * grid.pixel_px
        cx = grid.origin_yx[1] + (np.arange(got.shape[1]) + 0.5) * grid.pixel_px
        on = (cy[:, None] < tissue.px_yx[0] * mask.shape[0] // 2) & (
            cx[None, :] < tissue.px_yx[1] * (mask.shape[1] // 3)
        )
        on &= (cy[:, None] >= 0) & (cx[None, :] >= 0)
        np.testing.assert_allclose(got[on], want[on], rtol=1e-6, equal_nan=True)
        assert np.isnan(got[~on]).all()
        assert np.isfinite(got[on]).any()


def test_predictor_display_mask_follows_the_tissue_option(small_sample, tmp_path):
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import Predictor

    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:3]))
    with Predictor(small_sample.slide, model, tmp_path / "a.zarr", tissue=False) as pred:
        assert pred.display_mask() is None
    with Predictor(small_sample.slide, model, tmp_path / "b.zarr") as pred:
        m = pred.display_mask()
        assert m is pred.display_mask() and m.mask.dtype == bool and 0 < m.fraction <= 1
