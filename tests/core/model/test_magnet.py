"""MagNet: shapes, kNN graph, masking, model files, shared context, training and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")

GENES = [f"g{i}" for i in range(5)]


@pytest.fixture(scope="module")
def tiny():
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    return create_model("magnet_tiny", genes=GENES).eval()


def _batch(model, centres, groups=None, valid=None, seed=0):
    """A BinBatch of random images for bins at ``centres`` (px of the bin view)."""
    from napari_stmap.core.model.magnet import BinBatch, knn_graph

    g = torch.Generator().manual_seed(seed)
    n = len(centres)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    tiles, positions = [], []
    for level, p in enumerate(model.context_px):
        side = 3 * p
        tiles.append([torch.rand(3, side, side, generator=g) for _ in range(groups.max() + 1)])
        rel = np.asarray(centres, float) * model.mpp / model.context_mpp[level]
        for g_ in np.unique(groups):  # in each group's own tile
            rel[groups == g_] -= rel[groups == g_].min(0) - p
        positions.append(torch.as_tensor(rel, dtype=torch.float32))
    views = torch.rand(n, 3, model.view_px, model.view_px, generator=g)
    nbrs = np.full((n, model.k), -1, dtype=np.int64)
    for g_ in np.unique(groups):  # a graph per group, as in training
        idx = np.flatnonzero(groups == g_)
        ok = None if valid is None else np.asarray(valid)[idx]
        local = knn_graph(np.asarray(centres)[idx], model.k, ok)
        nbrs[idx] = np.where(local >= 0, idx[np.maximum(local, 0)], -1)
    nbrs = torch.from_numpy(nbrs)
    return BinBatch(views, tiles, positions, torch.from_numpy(groups), nbrs)


def _grid(n_side, pitch=10.0):
    yy, xx = np.mgrid[:n_side, :n_side] * pitch
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)


# ----------------------------------------------------------------------------- shapes
def test_shapes_and_contract(tiny):
    from napari_stmap.core.model import list_models

    assert {"magnet", "magnet_tiny"} <= set(list_models())
    assert (tiny.arch, tiny.input_kind, tiny.view_px, tiny.context_px) == (
        "magnet",
        "bins",
        32,
        [32, 32],
    )
    assert tiny.context_mpp == [1.0, 2.0]
    batch = _batch(tiny, _grid(3), groups=[0] * 5 + [1] * 4)
    with torch.no_grad():
        e = tiny.embed(batch)
        out = tiny.head(e)
        final, levels = tiny.forward_levels(batch)
    assert e.shape == (9, tiny.embed_dim) and out.shape == (9, len(GENES) + 1)
    assert len(levels) == 2 and all(lv.shape == out.shape for lv in levels)
    assert torch.all(out >= 0) and torch.allclose(final, out)
    assert torch.allclose(tiny(batch), out)
    w, b = tiny.head_rows(["g1", "total"])
    assert w.shape == (2, tiny.embed_dim) and b.shape == (2,)
    meta = tiny.describe()
    assert meta["view_px"] == [32, 32, 32] and meta["view_mpp"] == [0.5, 1.0, 2.0]
    assert meta["views_um"] == [16.0, 32.0, 64.0] and meta["k"] == 8


def test_bad_config_is_refused():
    from napari_stmap.core.errors import StmapInputError
    from napari_stmap.core.model import create_model

    with pytest.raises(StmapInputError, match="views_um"):
        create_model("magnet_tiny", genes=GENES, views_um=[16.0, 32.0])
    with pytest.raises(StmapInputError, match="context_encoder"):
        create_model("magnet_tiny", genes=GENES, context_encoder="mixed")


# ------------------------------------------------------------------------------ graph
def test_knn_graph_on_a_lattice():
    from napari_stmap.core.model.magnet import knn_graph

    c = _grid(5)
    nb = knn_graph(c, 8)
    assert nb.shape == (25, 8) and np.all(nb >= 0)
    assert not np.any(nb == np.arange(25)[:, None])  # no self-loops
    centre = 12  # interior bin: its 8 lattice neighbours (4 at 10 px, 4 at 14.1 px)
    d = np.hypot(*(c[nb[centre]] - c[centre]).T)
    np.testing.assert_allclose(np.sort(d), [10] * 4 + [10 * math.sqrt(2)] * 4)
    for i in (0, 4, 7):  # border bins: still 8 neighbours, the nearest ones, nearest first
        d = np.hypot(*(c[nb[i]] - c[i]).T)
        brute = np.sort(np.hypot(*(np.delete(c, i, axis=0) - c[i]).T))[:8]
        np.testing.assert_allclose(d, brute)


@pytest.mark.parametrize("n", [1, 3, 9])
def test_knn_graph_small_sets(n):
    from napari_stmap.core.model.magnet import knn_graph

    c = np.random.default_rng(n).uniform(0, 100, (n, 2))
    nb = knn_graph(c, 8)
    assert nb.shape == (n, 8)
    real = min(n - 1, 8)
    assert np.all(nb[:, :real] >= 0) and np.all(nb[:, real:] == -1)
    assert not np.any(nb == np.arange(n)[:, None])
    for i in range(n):  # each row holds every other bin when there are at most 8
        if n <= 9:
            assert set(nb[i, :real]) == set(range(n)) - {i}


def test_knn_graph_padding_and_duplicates():
    from napari_stmap.core.model.magnet import knn_graph

    c = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 10.0], [50.0, 50.0]])
    valid = np.array([True, True, True, False])
    nb = knn_graph(c, 2, valid)
    assert np.all(nb[3] == -1) and not np.any(nb[:3] == 3)
    assert not np.any(nb == np.arange(4)[:, None])  # duplicates do not make self-loops
    assert set(nb[0]) == {1, 2} and set(nb[1]) == {0, 2}
    assert np.all(knn_graph(c, 0) == np.zeros((4, 0)))


def test_padding_bins_do_not_affect_real_bins(tiny):
    c = _grid(3)
    c = np.concatenate([c, [[5.0, 5.0]]])  # a padding bin in the middle of them
    valid = np.array([True] * 9 + [False])
    batch = _batch(tiny, c, valid=valid)
    with torch.no_grad():
        ref = tiny(batch)
        batch.views[9] = torch.rand_like(batch.views[9])  # another image
        for level in range(2):
            batch.positions[level][9] += 7.0  # another place
        out = tiny(batch)
        assert torch.equal(out[:9], ref[:9]) and not torch.equal(out[9], ref[9])
        batch.views[4] = torch.rand_like(batch.views[4])  # a real bin: its neighbours change
        changed = tiny(batch)
    nbrs = batch.neighbours[0].tolist()
    assert 4 in nbrs and not torch.allclose(changed[0], out[0])


def test_one_bin_and_few_bins(tiny):
    for n in (1, 3):
        batch = _batch(tiny, _grid(2)[:n])
        with torch.no_grad():
            out = tiny(batch)
        assert out.shape == (n, len(GENES) + 1) and torch.isfinite(out).all()


def test_groups_do_not_see_each_other(tiny):
    c = np.concatenate([_grid(2), _grid(2) + 1000.0])
    groups = [0] * 4 + [1] * 4
    batch = _batch(tiny, c, groups=groups)
    with torch.no_grad():
        ref = tiny(batch)
        batch.tiles[0][1] = torch.rand_like(batch.tiles[0][1])
        out = tiny(batch)
    assert torch.equal(out[:4], ref[:4]) and not torch.equal(out[4:], ref[4:])


# ---------------------------------------------------------------------------- model files
@pytest.mark.parametrize("context", ["separate", "shared", "frozen"])
def test_model_file_round_trip(tmp_path, context):
    from napari_stmap.core.model import create_model, load_model, read_model_metadata, save_model

    torch.manual_seed(1)
    model = create_model("magnet_tiny", genes=GENES, context_encoder=context).eval()
    if context == "frozen":
        model.train()
        assert not model.context_encoder.training and model.encoder.training
        assert not any(p.requires_grad for p in model.context_encoder.parameters())
        model.eval()
    path = tmp_path / "magnet.safetensors"
    save_model(model, path, metadata={"training": {"spot_area_um2": 64.0}})
    meta = read_model_metadata(path)
    assert meta["arch"] == "magnet" and meta["input_kind"] == "bins"
    assert meta["config"]["context_encoder"] == context and meta["view_px"] == [32, 32, 32]
    again = load_model(path)
    batch = _batch(again, _grid(3))
    with torch.no_grad():
        assert torch.equal(model(batch), again(batch))
    assert again.metadata["training"]["spot_area_um2"] == 64.0


# ----------------------------------------------------------------------- shared context
def test_sample_tokens_are_cell_means():
    from napari_stmap.core.model.magnet import sample_tokens

    f = torch.randn(1, 3, 6, 8)
    # 64 px view at stride 16 around (48, 64): cells of 32 px = 2 × 2 feature pixels
    tok = sample_tokens(f, torch.tensor([[48.0, 64.0]]), 64, 16, 2)[0]
    cells = [(slice(1, 3), slice(2, 4)), (slice(1, 3), slice(4, 6))]
    cells += [(slice(3, 5), slice(2, 4)), (slice(3, 5), slice(4, 6))]
    expected = torch.stack([f[0, :, ys, xs].mean(dim=(1, 2)) for ys, xs in cells])
    torch.testing.assert_close(tok, expected, atol=1e-5, rtol=1e-5)
    half = sample_tokens(f, torch.tensor([[16.0, 16.0]]), 16, 16, 1)[0, 0]  # 4 quarter pixels
    torch.testing.assert_close(half, f[0, :, :2, :2].mean(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    ones = sample_tokens(torch.ones(1, 2, 4, 4), torch.tensor([[8.0, 8.0]]), 32, 16, 2)[0]
    torch.testing.assert_close(ones[3], torch.ones(2))  # inside the map
    torch.testing.assert_close(ones[0], torch.full((2,), 0.25))  # a quarter inside the map
    out = sample_tokens(torch.ones(1, 2, 4, 4), torch.tensor([[-40.0, 8.0]]), 32, 16, 1)
    torch.testing.assert_close(out[0, 0], torch.zeros(2))  # outside the map: zero padding


class _CellEncoder(torch.nn.Module):
    """Each 16 px cell's features from that cell's pixels only (receptive field = the cell)."""

    def __init__(self, channels: int, n_out: int) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, 1)
        self.n_out = n_out

    def forward(self, x):
        return [self.proj(torch.nn.functional.avg_pool2d(x, 16))] * self.n_out


def _cell_model():
    from napari_stmap.core.model import create_model

    torch.manual_seed(2)
    model = create_model("magnet_tiny", genes=GENES).eval()
    model.context_encoder = _CellEncoder(model.context_channels, max(model._context_idx) + 1)
    return model.eval()


def test_shared_context_equals_per_bin_crops(slide):
    """With a cell-local encoder, views aligned to the stride read the same cells both ways."""
    from napari_stmap.core.predict import predict_bins

    model = _cell_model()
    # level-0 px at 0.5 µm/px; context levels at 1 and 2 µm/px, 32 px views, stride 16:
    # crop origins are multiples of 16 level px when centres are multiples of 64 level-0 px
    yy, xx = np.mgrid[128:513:64, 128:705:64]
    centres = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)
    shared = predict_bins(model, slide, centres)
    crops = predict_bins(model, slide, centres, shared_context=False)
    np.testing.assert_allclose(shared, crops, rtol=2e-5)


def test_chunking_does_not_change_predictions(slide):
    """Pass 2 runs on the global graph; with a cell-local encoder tiles are exact too."""
    from napari_stmap.core.predict import predict_bins

    model = _cell_model()
    rng = np.random.default_rng(0)
    centres = rng.uniform([100, 100], [500, 700], (60, 2))
    one = predict_bins(model, slide, centres, chunk_um=1000.0)
    many = predict_bins(model, slide, centres, chunk_um=40.0, batch_size=7)
    np.testing.assert_allclose(many, one, rtol=2e-5)


def test_shared_context_approximates_crops_with_a_cnn(slide, tiny):
    """A CNN sees real tissue (tile) or zero padding (crop) around a view: close, not equal."""
    from napari_stmap.core.predict import bins as mg

    yy, xx = np.mgrid[96:520:64, 96:740:64]
    c = np.stack([yy.ravel(), xx.ravel()], axis=1) + 3.3
    with torch.no_grad():
        opts = {"device": "cpu", "batch_size": 64, "tta": False}
        za = mg._level_features(tiny, slide, c, shared=True, **opts)
        zb = mg._level_features(tiny, slide, c, shared=False, **opts)
    for a, b in zip(za, zb, strict=True):  # closer than bins are to each other
        assert float((a - b).norm() / (a - a.mean(0)).norm()) < 0.8


def test_predict_bins_scales_by_area_and_tta(slide, tiny):
    from napari_stmap.core.geometry import Square
    from napari_stmap.core.predict import predict_bins, predict_spots

    tiny.metadata = {"training": {"spot_area_um2": 64.0}}  # trained on 8 µm bins
    try:
        c = np.array([[300.0, 400.0], [300.0, 432.0], [332.0, 400.0]])
        base = predict_bins(tiny, slide, c)
        fps = [Square(tuple(p), 32.0) for p in c]  # 16 µm squares: 4 × the area
        np.testing.assert_allclose(predict_spots(tiny, slide, fps), 4 * base, rtol=1e-5)
        tta = predict_bins(tiny, slide, c, tta=True)
        assert tta.shape == base.shape and np.all(tta >= 0)
        assert predict_bins(tiny, slide, np.zeros((0, 2))).shape == (0, len(GENES) + 1)
    finally:
        tiny.metadata = {}


def test_bin_raster():
    from napari_stmap.core.predict import bin_raster

    c = np.array([[10.0, 10.0], [10.0, 26.0], [42.0, 10.0]])
    raster, grid = bin_raster(c, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 16.0)
    assert raster.shape == (2, 3, 2) and grid.pixel_px == 16.0
    assert grid.origin_yx == (2.0, 2.0)
    assert raster[0, 0, 1] == 3.0 and raster[1, 2, 0] == 6.0 and np.isnan(raster[0, 1, 1])
    flat, _ = bin_raster(c, np.array([1.0, 2.0, 3.0]), 16.0)
    assert flat.shape == (3, 2)


# ------------------------------------------------------------------------------ training
def test_group_batches(small_sample):
    from napari_stmap.core.model import create_model
    from napari_stmap.core.training import TrainConfig, load_training_data, plan_epoch
    from napari_stmap.core.training.magnet import GroupData, make_group_batch

    cfg = TrainConfig(arch="magnet_tiny", genes="top:5", bin_um=(8.0, 16.0), batch_size=2)
    slides, genes, _, cfg = load_training_data([(small_sample.slide, small_sample.outs)], cfg)
    model = create_model("magnet_tiny", genes=genes, group_bins=12)
    batches = plan_epoch(slides, cfg, np.random.default_rng(0), dense=False, group_bins=12)
    anchors = slides[0].anchor.n
    assert sum(len(b) for b in batches) == math.ceil(anchors / 12)
    rng = np.random.default_rng(1)
    batch, targets = make_group_batch(slides, batches[0], 8.0, cfg, model, 256.0, rng, GroupData())
    assert batch.n == 24 and targets.shape == (24, len(genes) + 1)
    assert batch.views.shape == (24, 3, 32, 32) and len(batch.tiles) == 2
    assert [len(t) for t in batch.tiles] == [2, 2] and batch.group.tolist() == [0] * 12 + [1] * 12
    nb = batch.neighbours.numpy()
    assert np.all((nb[:12] < 12) & (nb[:12] >= 0)) and np.all(nb[12:] >= 12)
    table, (s, i) = slides[0].table(8.0), batches[0][0]
    idx = GroupData().group(s, table, slides[s].anchor.centers[i], 12)  # anchor's nearest bins
    d = np.hypot(*(table.centers[idx] - slides[s].anchor.centers[i]).T)
    assert np.all(np.diff(d) >= 0) and d[-1] < 3 * 16  # 8 µm bins = 16 px
    np.testing.assert_allclose(targets[:12], table.targets(idx) * 4.0, rtol=1e-6)  # 256 / 64
    for level, tiles in enumerate(batch.tiles):  # every view lies inside its tile
        p = model.context_px[level] / 2
        pos = batch.positions[level]
        side = torch.tensor([tiles[g].shape[-1] for g in batch.group.tolist()])
        assert torch.all(pos >= p) and torch.all(pos[:, 0] <= side - p)


def _cli(argv):
    from napari_stmap.cli import main

    return main([str(a) for a in argv])


def test_cli_train_evaluate_magnet(tmp_path, small_sample, capsys):
    from napari_stmap.core.model import load_model

    pair = (small_sample.slide, small_sample.outs)
    model = tmp_path / "magnet.safetensors"
    opts = "--arch magnet_tiny --genes top:6 --epochs 1 --batch-size 2 --steps-per-epoch 2"
    opts += " --bin-um 8,16 --threads 1"
    argv = ["train", "--slide", pair[0], "--spots", pair[1], "--out", model, *opts.split()]
    assert _cli(argv) == 0 and model.is_file()
    m = load_model(model)
    assert m.arch == "magnet" and m.input_kind == "bins" and len(m.genes) == 6
    training = m.metadata["training"]
    assert training["spot_area_um2"] == pytest.approx(256.0) and training["epochs"] == 1
    assert m.config["init_counts_per_bin"] is not None
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", model, "--slide", pair[0], "--spots", pair[1]]
    argv += ["--bin-um", "16", "--truth", small_sample.root, "--json", out]
    assert _cli(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["scales"]) == ["16"] and result["model"]["input_kind"] == "bins"
    assert result["scales"]["16"]["n_genes"] == 6 and result["scales"]["16"]["n_spots"] > 100
    assert "truth" in result and "| 16 |" in capsys.readouterr().out
