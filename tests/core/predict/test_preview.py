"""Small tiles first at the centre of a request, refined by the regular tiles (issue 14).

The store must stay consistent: what small tiles show equals what the regular tiles then store
(the seamless-tiling tolerance of test_predictor), and the store on disk is the same with or
without previews.
"""

from __future__ import annotations

import queue
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from napari_stmap.core.model import create_model
from napari_stmap.core.predict import Predictor, region_map
from napari_stmap.core.predict.live_view import LiveGeneView, ViewWorker
from napari_stmap.core.predict.preview import (
    plan_preview,
    preview_spec,
    preview_tile_px,
    run_preview,
)
from napari_stmap.core.predict.reader import SlideReader
from napari_stmap.core.store import DONE, TODO

GENES = [f"G{i}" for i in range(5)]
TILE = 128  # model px: 5 x 7 tiles on the 600 x 800 px sample; previews of 64 px


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


def _spec(tile_px: int, align: int) -> SimpleNamespace:
    return SimpleNamespace(tile_px=tile_px, align=align)


def test_preview_tile_is_the_aligned_divisor_nearest_192():
    assert preview_tile_px(_spec(1152, 32)) == 192  # the default PixNet: window 960 vs 1920
    assert preview_tile_px(_spec(1024, 32)) == 256
    assert preview_tile_px(_spec(128, 16)) == 64
    assert preview_tile_px(_spec(32, 32)) is None  # nothing smaller to run


def _predictor(slide, model, path, **kw) -> Predictor:
    return Predictor(slide, model, path, tile_px=TILE, dtype="float32", tissue=False, **kw)


def test_small_then_large_tiles_give_the_same_values_and_store(slide, model, tmp_path):
    box = (150.0, 200.0, 450.0, 600.0)  # level-0 px = model px here
    with _predictor(slide, model, tmp_path / "plain.zarr") as plain:
        plain.request(box)
        plain.wait()
    with _predictor(slide, model, tmp_path / "prev.zarr", paused=True) as pred:
        small = preview_spec(pred.spec, preview_tile_px(pred.spec))
        assert small.tile_px == 64 and small.window_px == 64 + 2 * model.halo_px
        plan = plan_preview(pred.store, small, box, n=6)
        assert len(plan) == 6 and len({p.small for p in plan}) == 6
        cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        d = [np.hypot(*np.subtract(small.tile_center_level0(p.small), (cy, cx))) for p in plan]
        assert d == sorted(d) and d[0] < small.tile_px  # nearest the centre first
        reader = SlideReader(slide, small)
        kept = run_preview(model, reader, pred.store, plan, device=pred.device)
        assert kept == 6
        tiles = {p.tile for p in plan}
        assert all(pred.store.state(t) == TODO and pred.store.has_preview(t) for t in tiles)
        assert plan_preview(pred.store, small, box, n=6)[0].small not in {p.small for p in plan}
        previews = {t: pred.store.read_preview(t) for t in tiles}
        # previews never reach what reads the store: region sums see tiles still to do
        vals, _ = region_map(pred.store, box)
        assert np.isnan(vals).all()
        pred.resume()
        pred.request(box)
        pred.wait()
        for t, prev in previews.items():
            assert pred.store.state(t) == DONE and not pred.store.has_preview(t)
            final = pred.store.read_embedding(t)
            seen = np.isfinite(prev)
            assert 0 < seen.mean() < 1  # part of the tile
            np.testing.assert_allclose(prev[seen], final[seen], atol=1e-4, rtol=1e-4)
    a = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "prev.zarr"), mode="r")
    for name in ("embedding", "done"):
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


class _Recorder(queue.Queue):
    """A done queue that notes, at each put, whether the tile was a preview then."""

    def __init__(self, store_of) -> None:
        super().__init__()
        self.store_of, self.seen = store_of, []

    def put(self, tile, *a, **kw) -> None:
        store = self.store_of()
        self.seen.append((tile, store.state(tile), store.has_preview(tile)))
        super().put(tile, *a, **kw)


def test_request_with_preview_shows_small_tiles_first_then_refines(slide, model, tmp_path):
    holder = {}
    rec = _Recorder(lambda: holder["p"].store)
    with _predictor(slide, model, tmp_path / "s.zarr", done_queue=rec, paused=True) as pred:
        holder["p"] = pred
        assert pred.preview_tiles == 4  # on by default on the CPU
        worker = ViewWorker()
        view = LiveGeneView(pred, GENES[0], worker=worker)
        box = (0.0, 0.0, *map(float, slide.shape_yx))
        pred.request(box, preview=True)
        assert pred.pending > pred.spec.n_tiles - 1  # the preview job counts as pending
        pred.resume()
        pred.wait()
        first = [s for s in rec.seen[:4]]
        assert all(state == TODO and prev for _, state, prev in first), first
        assert all(state == DONE for _, state, _ in rec.seen[4:])
        assert len(rec.seen) == 4 + pred.spec.n_tiles
        # the live view now shows the regular tiles (previews gone), equal to the dask view
        view.arrays[0][:, :]
        worker.wait_idle(30)
        got = view.arrays[0][:, :]
        want = np.asarray(pred.gene_view(GENES[0]))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        view.close()
        worker.close()


def test_live_view_shows_previews_of_tiles_still_to_do(slide, model, tmp_path):
    with _predictor(slide, model, tmp_path / "s.zarr", paused=True) as pred:
        small = preview_spec(pred.spec, preview_tile_px(pred.spec))
        box = (256.0, 256.0, 384.0, 384.0)  # one regular tile, four small ones
        plan = plan_preview(pred.store, small, box, n=1)
        run_preview(model, SlideReader(slide, small), pred.store, plan, device=pred.device)
        with ViewWorker() as worker:
            view = LiveGeneView(pred, GENES[1], worker=worker, mode="absolute")
            level = view.arrays[0]
            level[:, :]  # the first read hands the previewed block to the worker
            worker.wait_idle(30)
            got = level[:, :]
            r, c = small.output_slices(plan[0].small)
            assert np.isfinite(got[r, c]).all()
            assert np.isfinite(got).sum() == got[r, c].size  # nothing else yet
            coarse = view.arrays[-1][:, :]
            worker.wait_idle(30)
            coarse = view.arrays[-1][:, :]
            assert np.isfinite(coarse).any()  # coarser levels pool what is there
            view.close()


def test_no_preview_when_off_or_cancelled(slide, model, tmp_path):
    rec = queue.Queue()
    with _predictor(
        slide, model, tmp_path / "a.zarr", done_queue=rec, preview_tiles=0, paused=True
    ) as pred:
        pred.request((0, 0, 128, 128), preview=True)
        assert pred.pending == 1
        pred.resume()
        pred.wait()
        assert rec.qsize() == 1
    with _predictor(slide, model, tmp_path / "b.zarr", done_queue=rec, paused=True) as pred:
        pred.request((0, 0, 128, 128), preview=True)
        assert pred.pending == 2
        assert pred.cancel() == 1 and pred.pending == 0  # the preview job went with the tiles


def test_warm_up_stores_nothing(slide, model, tmp_path):
    with _predictor(slide, model, tmp_path / "w.zarr", num_threads=1) as pred:
        pred.warm_up()
        assert torch.get_num_threads() >= 1
        assert pred.store.counts()["done"] == 0 and not any(
            pred.store.has_preview(t) for t in pred.spec.tiles()
        )
    with _predictor(slide, model, tmp_path / "x.zarr", preview_tiles=0) as pred:
        pred.warm_up()  # no previews: nothing to warm, nothing stored
        assert pred.store.counts()["done"] == 0
