"""Training, dense prediction and the evaluation harness (tiny models, tiny synthetic sample)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from napari_stmap.core.errors import StmapInputError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"tile_px": 64, "batch_size": 2, "max_batches_per_epoch": 2, "num_threads": 1}


def _cli(argv):
    """``napari_stmap.cli.main(argv)`` (``stmap train`` / ``stmap evaluate``)."""
    from napari_stmap.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def pair(small_sample):
    return small_sample.slide, small_sample.outs


@pytest.fixture(scope="module")
def tiny_data(pair):
    """Training tables of the small sample at 2, 8 and 16 µm, 6 genes."""
    from napari_stmap.core.training import TrainConfig, load_training_data

    cfg = TrainConfig(
        arch="pixnet_tiny", genes="top:6", augment=False, bin_um=(2.0, 8.0, 16.0), **TINY
    )
    return load_training_data([pair], cfg)


# ------------------------------------------------------------------------------ end to end
def test_cli_train_evaluate_pixnet(tmp_path, pair, small_sample, capsys):
    model = tmp_path / "pix.safetensors"
    opts = "--arch pixnet_tiny --genes top:6 --epochs 1 --tile-px 64 --batch-size 2"
    opts += " --steps-per-epoch 2 --threads 1 --model-option context_channels=4 --bin-um 2,8,16"
    argv = ["train", "--slide", pair[0], "--spots", pair[1], "--out", model, *opts.split()]
    assert _cli(argv) == 0 and model.is_file()
    from napari_stmap.core.model import load_model, read_model_metadata

    meta = read_model_metadata(model)
    assert meta["arch"] == "pixnet" and len(meta["genes"]) == 6 and meta["mpp"] == 0.5
    assert load_model(model).embed_dim == 16 + 4  # the tiny decoder's 16 + the context branch
    training = meta["training"]
    assert training["epochs"] == 1 and training["seed"] == 0
    assert training["bin_um"] == [2.0, 8.0, 16.0]
    assert training["depth"]["reference_counts_per_um2"] > 0
    assert training["data"][0]["slide"] == str(pair[0])
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", model, "--slide", pair[0], "--spots", pair[1]]
    argv += ["--bin-um", "2,8,16,55", "--truth", small_sample.root, "--json", out]
    assert _cli(argv) == 0
    result = json.loads(out.read_text())
    _check_shape(result, ["2", "8", "16", "55"], truth=True)
    assert "| 16 |" in capsys.readouterr().out


def test_cli_train_stride_and_model_options(tmp_path, pair):
    from napari_stmap.core.model import load_model

    model = tmp_path / "s8.safetensors"
    opts = "--arch pixnet_tiny --genes top:4 --epochs 1 --tile-px 64 --batch-size 2"
    opts += " --steps-per-epoch 1 --threads 1 --bin-um 16 --stride 8"
    argv = ["train", "--slide", pair[0], "--spots", pair[1], "--out", model, *opts.split()]
    argv += ["--model-option", "decoder_channels=[16]", "--model-option", "attn_windows=[3]"]
    assert _cli(argv) == 0
    m = load_model(model)
    assert m.stride == 8 and m.config["decoder_channels"] == [16]
    assert m.metadata["training"]["epochs"] == 1


def _check_shape(result, keys, *, truth=False):
    from napari_stmap.core.evaluate import METRIC_KEYS

    top = {"scales", "genes", "absolute", "model", "data"} | ({"truth"} if truth else set())
    assert set(result) == top
    blocks = [result, result["absolute"]] + (
        [result["truth"], result["truth"]["absolute"]] if truth else []
    )
    for block in blocks:
        assert list(block["scales"]) == keys and list(block["genes"]) == keys
        for key in keys:
            assert set(block["scales"][key]) == set(METRIC_KEYS)
            assert block["scales"][key]["n_genes"] == len(block["genes"][key]) == 6
            assert all(v is None or -1 <= v <= 1 for v in block["genes"][key].values())
    assert set(result["absolute"]) == {"scales", "genes"}


def test_cli_train_evaluate_spotnet(tmp_path, pair):
    from dataclasses import replace

    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.model import load_model

    model = tmp_path / "spot.safetensors"
    opts = "--arch spotnet_tiny --genes top:6 --epochs 1 --batch-size 4 --steps-per-epoch 2"
    opts += " --bin-um 8,16 --threads 1"
    argv = ["train", "--slide", pair[0], "--spots", pair[1], "--out", model, *opts.split()]
    assert _cli(argv) == 0
    m = load_model(model)
    assert m.input_kind == "spot"
    assert m.metadata["training"]["spot_area_um2"] == pytest.approx(256.0)
    measured = load_measured(pair[1], scales_um=[16])
    keep = np.arange(40)  # a few spots keep the crops cheap
    measured = replace(measured, spots=measured.spots.subset(keep), total=measured.total[keep])
    result = evaluate_measured(m, open_slide(pair[0]), measured, [16], batch_size=40)
    _check_shape(result, ["16"])
    assert result["scales"]["16"]["n_spots"] == 40


def test_cli_bad_input_exits_2(tmp_path, pair, capsys):
    base = ["train", "--slide", pair[0], "--spots", pair[1], "--out", tmp_path / "m.safetensors"]
    assert _cli([*base, "--slide", pair[0]]) == 2
    assert "pairs" in capsys.readouterr().err
    assert _cli([*base, "--genes", "top:zero"]) == 2
    assert _cli([*base, "--genes", tmp_path / "nope.txt"]) == 2
    assert _cli([*base, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _cli([*base, "--model-option", "context_channels"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert _cli([*base, "--arch", "pixnet_tiny", "--model-option", "no_such_option=1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------- training
def test_loss_decreases_on_fixed_batch(tiny_data):
    from napari_stmap.core.aggregate import aggregate_torch
    from napari_stmap.core.training import build_model, expression_loss, make_tile_batch

    slides, genes, _, cfg = tiny_data
    model = build_model(cfg, genes, slides)
    rng = np.random.default_rng(0)
    images, weights, targets = make_tile_batch(
        slides, [(0, 0), (0, 5)], 8.0, cfg, model.stride, rng
    )
    assert targets.shape[0] >= 2 and weights.matrix.shape[0] == targets.shape[0]
    x, y = model.preprocess(images), torch.from_numpy(targets)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss, _ = expression_loss(aggregate_torch(model(x), weights), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_expression_loss_terms():
    from napari_stmap.core.training import expression_loss

    meas = torch.tensor([[1.0, 3.0, 10.0], [4.0, 1.0, 20.0], [2.0, 2.0, 8.0]])
    loss, parts = expression_loss(meas.clone(), meas)
    assert parts["mse"] == pytest.approx(0.0, abs=1e-9) and parts["pcc"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-4)
    _, parts = expression_loss(meas * 3, meas)  # same composition, 3x the depth
    assert parts["mse"] == pytest.approx(0.0, abs=1e-6)
    assert parts["total"] == pytest.approx(
        np.mean((np.log1p([30, 60, 24]) - np.log1p([10, 20, 8])) ** 2), rel=1e-5
    )


def test_resume_reproduces_uninterrupted_run(tmp_path, pair):
    from napari_stmap.core.model import load_model
    from napari_stmap.core.training import TrainConfig, read_state_info, train_model

    tiny = {**TINY, "max_batches_per_epoch": 1}
    cfg = TrainConfig(arch="pixnet_tiny", genes="top:4", epochs=2, bin_um=(8.0, 16.0), **tiny)
    full = train_model([pair], tmp_path / "full.safetensors", cfg)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    part = tmp_path / "part.safetensors"
    with pytest.raises(Stop):
        train_model([pair], part, cfg, on_epoch_end=stop)
    assert read_state_info(part)["epoch"] == 1
    resumed = train_model([pair], part, cfg, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert read_state_info(part)["epoch"] == 2
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(part).metadata["training"]["epochs"] == 2


# ------------------------------------------------------------------------------------ data
def test_depth_normalisation(small_sample, tmp_path):
    from napari_stmap.core.measured import depth_factors, spot_density
    from napari_stmap.core.synthetic import write_synthetic
    from napari_stmap.core.training import TrainConfig, load_training_data

    ref, factors = depth_factors([1.0, 2.0, 4.0])
    assert ref == pytest.approx(7 / 3) and factors == pytest.approx([7 / 3, 7 / 6, 7 / 12])
    with pytest.raises(StmapInputError):
        depth_factors([1.0, 0.0])
    shallow = write_synthetic(
        tmp_path / "shallow", size_um=(200.0, 200.0), n_genes=24, seed=3, depth=0.4
    )
    cfg = TrainConfig(arch="pixnet_tiny", genes="top:5", bin_um=(16.0,), **TINY)
    pairs = [(small_sample.slide, small_sample.outs), (shallow.slide, shallow.outs)]
    slides, _, depth, _ = load_training_data(pairs, cfg)
    assert depth["densities"][1] < 0.6 * depth["densities"][0]
    assert depth["reference_counts_per_um2"] == pytest.approx(np.mean(depth["densities"]))
    for ts in slides:
        table = ts.anchor
        assert np.median(table.total / table.area_um2) == pytest.approx(
            depth["reference_counts_per_um2"], rel=1e-5
        )
    assert spot_density.__doc__


def test_gene_selection(tmp_path, pair):
    from napari_stmap.core.io.spots import Spots
    from napari_stmap.core.measured import Measured, load_measured
    from napari_stmap.core.training import read_gene_spec, select_genes

    counts = sp.csr_matrix(np.array([[10, 0, 90, 5], [0, 1, 99, 5], [20, 0, 80, 0]], dtype=float))
    spots = Spots(
        np.zeros((3, 2)),
        "disk",
        10.0,
        55.0,
        5.5,
        counts,
        list("ABCD"),
        list("ABCD"),
        ["s1", "s2", "s3"],
        55.0,
        100.0,
        np.ones(3, bool),
        None,
        "x",
    )
    m = Measured(tmp_path, spots, np.asarray(counts.sum(axis=1)).ravel(), list("ABCD"), 55.0)
    assert select_genes([m], [m.units(55.0)], "top:2") == ["C", "A"]
    genes_file = tmp_path / "genes.txt"
    genes_file.write_text("# markers\nD\nB\n\n")
    assert read_gene_spec(str(genes_file)) == (None, ["D", "B"])
    assert select_genes([m], [m.units(55.0)], str(genes_file)) == ["D", "B"]
    genes_file.write_text("A\nNOPE1\nNOPE2\n")
    with pytest.raises(StmapInputError, match="NOPE1"):
        select_genes([m], [m.units(55.0)], str(genes_file))
    for bad in ("top:0", "top:many", str(tmp_path / "missing.txt")):
        with pytest.raises(StmapInputError):
            read_gene_spec(bad)
    real = load_measured(pair[1], scales_um=[16])
    assert len(select_genes([real], [real.units(16.0)], "top:5")) == 5


def test_coarser_scale_is_sum_of_bins(pair):
    from napari_stmap.core.io.spots import read_visium_hd
    from napari_stmap.core.measured import load_measured

    measured = load_measured(pair[1], scales_um=[2, 8])
    assert measured.base_um == 2.0
    units = measured.units(8.0)
    assert units.members is not None and np.all(np.diff(units.members.indptr) == 16)
    direct = read_visium_hd(pair[1], bin_um=8)
    lookup = {tuple(np.round(c, 3)): i for i, c in enumerate(direct.centers_yx)}
    rows = [lookup[tuple(np.round(c, 3))] for c in units.centers_yx]
    assert len(rows) == units.n > 100
    assert (units.counts != direct.counts[rows]).nnz == 0
    assert np.allclose(units.total, np.asarray(direct.counts[rows].sum(axis=1)).ravel())
    assert np.allclose(units.area_um2, 64.0)
    disks = measured.units(55.0)
    assert disks.footprint == "disk"
    assert np.all(np.abs(disks.area_um2 - math.pi * 27.5**2) < 0.05 * math.pi * 27.5**2)


def test_finer_scale_refused(pair, tmp_path):
    from napari_stmap.core.io.spots import Spots
    from napari_stmap.core.measured import Measured, load_measured

    with pytest.raises(StmapInputError, match="finer"):
        load_measured(pair[1], scales_um=[1.0])
    measured = load_measured(pair[1], scales_um=[8.0])
    assert measured.base_um == 8.0
    with pytest.raises(StmapInputError, match="finer"):
        measured.units(2.0)
    counts = sp.csr_matrix(np.ones((2, 2)))
    spots = Spots(
        np.zeros((2, 2)),
        "disk",
        10.0,
        55.0,
        5.5,
        counts,
        ["A", "B"],
        ["A", "B"],
        ["s1", "s2"],
        55.0,
        100.0,
        np.ones(2, bool),
        None,
        "x",
    )
    visium = Measured(tmp_path, spots, np.full(2, 2.0), ["A", "B"], 55.0)
    with pytest.raises(StmapInputError, match="cannot be built"):
        visium.units(110.0)


# ------------------------------------------------------------------------- dense prediction
def test_predict_map_tiles_match_single_pass(pair):
    from napari_stmap.core.io.slide import open_slide, read_at_mpp
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import predict_map, predict_spots

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=["a", "b"], mpp=0.5).eval()
    slide = open_slide(pair[0])
    bbox = (100.0, 150.0, 190.0, 260.0)  # level-0 px = model px (same µm/px)
    tiled, grid = predict_map(model, slide, bbox, tile_px=32, batch_size=8)
    assert tiled.shape[1:] == (96 // 4, 128 // 4)  # 6 tiles of 32 px, aligned to 16 px
    y0, x0 = (round(v / grid.pixel_px * model.stride) for v in grid.origin_yx)
    h, w = (n * model.stride for n in tiled.shape[1:])
    halo = model.halo_px
    image = read_at_mpp(slide, (y0 - halo, x0 - halo), (h + 2 * halo, w + 2 * halo), model.mpp)
    with torch.no_grad():
        whole = model(model.preprocess(image))[0].numpy()
    hs = halo // model.stride
    whole = whole[:, hs : hs + tiled.shape[1], hs : hs + tiled.shape[2]]
    assert grid.bbox_yx[0] <= bbox[0] and grid.bbox_yx[3] >= bbox[3]
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-4 * float(np.abs(whole).max()))
    from napari_stmap.core.geometry import Square

    square = Square((164.0, 232.0), 32.0)  # on map pixel edges
    value = predict_spots(model, slide, [square], tile_px=32)[0]
    sl = grid.crop_slices(square.bbox_yx())
    np.testing.assert_allclose(value, tiled[:, sl[0], sl[1]].sum(axis=(1, 2)), rtol=1e-4)


def test_read_at_mpp_resamples(pair):
    from napari_stmap.core.io.slide import open_slide, read_at_mpp

    slide = open_slide(pair[0])
    full = read_at_mpp(slide, (100, 100), (64, 64), 0.5)
    half = read_at_mpp(slide, (50, 50), (32, 32), 1.0)
    assert half.shape == (32, 32, 3) and half.dtype == np.uint8
    pooled = full.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - pooled).mean() < 6.0


# ------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_turns_spots_with_image(k, flip):
    from napari_stmap.core.geometry import turn_image, turn_points
    from napari_stmap.core.training import augment_tile

    size = 32
    image = np.zeros((size, size, 3), np.uint8)
    spot = np.array([[5.5, 20.5]])  # centre of pixel (5, 20)
    image[5, 20] = 255
    turned, (point,) = turn_image(image, k, flip), turn_points(spot, size, k, flip)
    assert np.unravel_index(np.argmax(turned[..., 0]), (size, size)) == (
        int(point[0]),
        int(point[1]),
    )
    rng = np.random.default_rng(k * 2 + flip)
    out, centres = augment_tile(image, spot, rng, colour=False)
    assert np.unravel_index(np.argmax(out[..., 0]), (size, size)) == tuple(
        int(c) for c in centres[0]
    )


def test_colour_augmentation_keeps_range():
    from napari_stmap.core.training import augment_tile

    rng = np.random.default_rng(1)
    image = np.empty((32, 32, 3), np.uint8)
    image[:] = (200, 120, 180)  # uniform pink: turns and blur leave it unchanged
    changed = []
    for _ in range(4):
        out, _ = augment_tile(image, np.zeros((0, 2)), rng)
        assert out.dtype == np.uint8 and out.shape == image.shape
        changed.append(np.abs(out.astype(int) - image).mean())
    assert 0 < max(changed) < 25


def test_spot_model_scales_by_area(pair):
    from napari_stmap.core.geometry import Disk, Square
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import predict_spots

    model = create_model("spotnet_tiny", genes=["a", "b"]).eval()
    model.metadata = {"training": {"spot_area_um2": 256.0}}  # trained on 16 µm bins
    slide = open_slide(pair[0])
    fps = [Square((300.0, 400.0), 32.0), Square((300.0, 400.0), 16.0), Disk((300.0, 400.0), 64.0)]
    out = predict_spots(model, slide, fps)  # 0.5 µm/px: 16 µm, 8 µm squares, 32 µm disk
    np.testing.assert_allclose(out[1], out[0] / 4, rtol=1e-6)
    np.testing.assert_allclose(out[2], out[0] * math.pi * 16**2 / 256, rtol=1e-6)


# ------------------------------------------------------------------ z-score, EMA, TTA
def test_zscore_loss_on_a_hand_example():
    from napari_stmap.core.training import expression_loss

    # two genes + total; the spots' totals are 1e4, so norm = log1p(counts)
    meas = torch.tensor([[0.0, 0.0, 1e4], [0.0, 0.0, 1e4]])
    pred = torch.tensor([[math.e - 1, 0.0, 1e4], [math.e - 1, math.e**2 - 1, 1e4]])
    # norm differences: gene 0 (1, 1), gene 1 (0, 2); σ = (0.5, 2)
    std = torch.tensor([0.5, 2.0])
    _, plain = expression_loss(pred, meas)
    _, z = expression_loss(pred, meas, gene_std=std)
    assert plain["mse"] == pytest.approx((1 + 1 + 0 + 4) / 4, rel=1e-5)
    assert z["mse"] == pytest.approx((4 + 4 + 0 + 1) / 4, rel=1e-5)
    assert z["pcc"] == plain["pcc"] and z["total"] == plain["total"]


def test_target_stats_match_numpy(tiny_data):
    from napari_stmap.core.training import target_stats

    slides = tiny_data[0]
    stats = target_stats(slides, floor=0.0)
    a = slides[0].anchor
    norm = np.log1p(1e4 * a.counts.toarray() / a.total[:, None])
    np.testing.assert_allclose(stats["mean"], norm.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["std"], norm.std(axis=0), rtol=1e-5)
    assert min(target_stats(slides, floor=10.0)["std"]) == 10.0
    # per scale: the 2 µm table's own numbers; sparse 2 µm bins spread more than 16 µm bins
    t2 = slides[0].table(2.0)
    total2 = np.maximum(t2.total.astype(np.float64), 1e-12)[:, None]
    norm2 = np.log1p(1e4 * t2.counts.toarray().astype(np.float64) / total2)
    fine = target_stats(slides, floor=0.0, bin_um=2.0)
    np.testing.assert_allclose(fine["std"], norm2.std(axis=0), rtol=1e-5)
    assert np.mean(fine["std"]) > 1.5 * np.mean(stats["std"])


def test_ema_update_follows_the_formula():
    from napari_stmap.core.training.state import _ema_init, _ema_update

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = _ema_init(model)
    start = {k: v.clone() for k, v in ema.items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # moves the batch-norm statistics and counter
    n = _ema_update(ema, model, 0.9, 0)
    d = min(0.9, 1 / 10)
    assert n == 1
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], d * start[k] + (1 - d) * v)
        else:
            assert torch.equal(ema[k], v)
    assert _ema_update(ema, model, 0.9, 1000) == 1001  # decay capped at 0.9 late in training


def test_training_keeps_the_averaged_weights(tmp_path, pair):
    from safetensors.torch import load_file

    from napari_stmap.core.model import load_model
    from napari_stmap.core.training import TrainConfig, state_paths, train_model

    tiny = {**TINY, "max_batches_per_epoch": 3}
    cfg = TrainConfig(
        arch="pixnet_tiny", genes="top:4", epochs=1, bin_um=(16.0,), ema_decay=0.5, **tiny
    )
    res = train_model([pair], tmp_path / "m.safetensors", cfg, val=pair)
    raw = load_file(str(state_paths(tmp_path / "m.safetensors")[0]))
    kept = load_model(tmp_path / "m.safetensors").state_dict()
    returned = res.model.state_dict()
    name = "head_.conv.weight"
    assert torch.equal(kept[name], returned[name])
    assert torch.equal(raw[f"ema.{name}"], kept[name])
    assert not torch.allclose(raw[f"model.{name}"], kept[name])
    assert res.history[0]["val_pcc_m"] is not None
    assert load_model(tmp_path / "m.safetensors").metadata["training"]["weights"].startswith("EMA")


@pytest.mark.parametrize("arch", ["pixnet_tiny", "spotnet_tiny"])
def test_dihedral_embedding_is_equivariant(arch):
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import dihedral_embed

    torch.manual_seed(0)
    model = create_model(arch, genes=["a", "b"]).eval()
    size = 64 if arch == "spotnet_tiny" else 48
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        e = dihedral_embed(model, x)
        for k, flip in [(1, False), (2, True), (3, True)]:
            xt = torch.rot90(x, k, dims=(2, 3))
            xt = torch.flip(xt, dims=(3,)) if flip else xt
            et = dihedral_embed(model, xt)
            if e.ndim == 4:  # the map turns with the image
                want = torch.rot90(e, k, dims=(2, 3))
                want = torch.flip(want, dims=(3,)) if flip else want
            else:  # one vector per crop: invariant
                want = e
            torch.testing.assert_close(et, want, rtol=1e-4, atol=1e-5)
        single = model.embed(x)
    assert not torch.allclose(e, single, atol=1e-5)


def test_tta_maps_are_still_seamless(pair):
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import predict_map

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=["a", "b"], mpp=0.5).eval()
    slide = open_slide(pair[0])
    bbox = (100.0, 150.0, 190.0, 260.0)
    small, grid_a = predict_map(model, slide, bbox, tile_px=32, batch_size=8, tta=True)
    big, grid_b = predict_map(model, slide, bbox, tile_px=128, batch_size=8, tta=True)
    plain, _ = predict_map(model, slide, bbox, tile_px=128, batch_size=8)
    assert grid_a == grid_b
    np.testing.assert_allclose(small, big, rtol=1e-4, atol=1e-4 * float(np.abs(big).max()))
    assert not np.allclose(big, plain)


def test_resume_with_ema_reproduces_uninterrupted_run(tmp_path, pair):
    from napari_stmap.core.training import TrainConfig, train_model

    tiny = {**TINY, "max_batches_per_epoch": 1}
    cfg = TrainConfig(
        arch="pixnet_tiny", genes="top:4", epochs=2, bin_um=(16.0,), ema_decay=0.9, **tiny
    )
    full = train_model([pair], tmp_path / "full.safetensors", cfg)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    part = tmp_path / "part.safetensors"
    with pytest.raises(Stop):
        train_model([pair], part, cfg, on_epoch_end=stop)
    resumed = train_model([pair], part, cfg, resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
