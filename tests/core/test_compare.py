"""core.compare: what the Compare dock computes, called directly (no Qt, no viewer)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_stmap.core.compare import (
    EXTRA_SCALES_UM,
    CompareResult,
    pcc_table,
    residual_limits,
    scale_choices,
    summary_html,
    unit_spots,
    unit_values,
)


# ------------------------------------------------------------------------ no network
def test_scale_choices_of_visium_hd_bins(small_sample):
    from napari_stmap.core.io.spots import read_spots

    spots = read_spots(small_sample.outs, bin_um=8.0)
    choices = scale_choices(spots, small_sample.outs)
    sizes = [s for s, _ in choices]
    assert sizes == sorted(sizes) and 2.0 not in sizes  # never finer than the bins read
    assert {8.0, 16.0, *EXTRA_SCALES_UM} <= set(sizes)
    assert {s for s, on in choices if on} == {8.0, 16.0, 32.0}


def test_scale_choices_of_disk_spots_and_unreadable_sources():
    disks = SimpleNamespace(footprint="disk", bin_um=55.0, source="nowhere")
    assert scale_choices(disks) == [(55.0, True)]
    squares = SimpleNamespace(footprint="square", bin_um=8.0, source="/no/such/folder")
    assert [s for s, _ in scale_choices(squares)] == [8.0, *EXTRA_SCALES_UM]


def test_residual_limits_are_symmetric_and_never_empty():
    meas = np.array([0.0, 1.0, 2.0, np.nan])
    lo, hi = residual_limits(meas, meas + np.array([1.0, -3.0, 0.5, 1.0]))
    assert lo == -hi and hi == pytest.approx(np.nanpercentile([1.0, 3.0, 0.5], 99))
    assert residual_limits(meas, meas) == (-1e-6, 1e-6)
    assert residual_limits(np.array([np.nan]), np.array([1.0])) == (-1.0, 1.0)


def _result() -> dict:
    return {
        "scales": {
            "8": {"n_spots": 10, "pcc_f": 0.1, "pcc_s": 0.2, "pcc_m": None},
            "16": {"n_spots": 3, "pcc_f": 0.4, "pcc_s": 0.5, "pcc_m": 0.6},
        },
        "genes": {"8": {"A": 0.3, "B": None}, "16": {"B": 0.7, "A": 0.1}},
    }


def test_pcc_table_and_summary():
    keys, genes, values = pcc_table(_result())
    assert keys == ["8", "16"] and genes == ["A", "B"]
    np.testing.assert_allclose(values, [[0.3, 0.1], [np.nan, 0.7]])
    assert pcc_table({"scales": {}, "genes": {}})[1] == []
    html = summary_html(_result())
    assert html.startswith("<table>") and "<td>16</td><td>3</td><td>0.400</td>" in html
    assert "<td>8</td><td>10</td><td>0.100</td><td>0.200</td><td>nan</td>" in html


def test_unit_values_normalise_after_summing():
    counts = np.array([[1.0, 9.0], [0.0, 4.0]])  # gene A, and a second gene
    units = SimpleNamespace(counts=counts, total=np.array([10.0, 4.0]), members=None)
    res = CompareResult({}, ["A", "B"], {"8": units}, {"8": np.array([[2.0, 1.0, 20.0]] * 2)})
    meas, pred = unit_values(res, "8", "A")
    np.testing.assert_allclose(meas, np.log1p([1e3, 0.0]))
    np.testing.assert_allclose(pred, np.log1p([1e3, 1e3]))
    assert unit_spots(res, "8", 0.5) is None  # native units: the measured spots themselves


# --------------------------------------------------------------------------- network
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def predictor(small_sample, tmp_path_factory):
    """A predictor of a random-init pixnet_tiny on 6 genes of the small sample."""
    from napari_stmap.core.model import create_model, save_model
    from napari_stmap.core.predict import Predictor

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=list(small_sample.genes[:6]))
    root = tmp_path_factory.mktemp("compare")
    save_model(model, root / "tiny.safetensors")
    with Predictor(small_sample.slide, model, root / "store.zarr", tile_px=64) as pred:
        yield pred, root / "tiny.safetensors"


def test_run_compare_scores_the_store(small_sample, predictor):
    from napari_stmap.core.compare import run_compare, store_predictions
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.predict import StoreSource

    pred, model_path = predictor
    slide = open_slide(small_sample.slide)
    source = StoreSource(pred)
    res = run_compare(source, pred.model, model_path, slide, small_sample.outs, [8.0, 16.0])
    assert res.result["model"]["path"] == str(model_path)
    assert res.genes == list(small_sample.genes[:6]) and set(res.units) == {"8", "16"}
    measured = load_measured(small_sample.outs, scales_um=[8.0, 16.0], slide=slide)

    def from_store(meas, units):
        return store_predictions(pred, meas, units)

    want = evaluate_measured(pred.model, slide, measured, [8.0, 16.0], predict=from_store)
    assert res.result["scales"] == want["scales"]
    for key in ("8", "16"):
        n = res.units[key].n
        assert res.predicted[key].shape == (n, len(res.genes) + 1)
        meas, pred_values = unit_values(res, key, res.genes[0])
        assert meas.shape == pred_values.shape == (n,) and np.isfinite(pred_values).any()
    assert unit_spots(res, "8", slide.mpp) is res.base_spots
    summed = unit_spots(res, "16", slide.mpp)  # 16 µm units are sums of the 8 µm bins read
    assert summed.n_spots == res.units["16"].n and summed.bin_um == 16.0
    np.testing.assert_allclose(summed.centers_yx, res.units["16"].centers_yx)


def test_run_compare_of_a_bin_model_is_stmap_evaluate(small_sample, tmp_path):
    from napari_stmap.core.compare import run_compare
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import BinSource

    torch.manual_seed(0)
    model = create_model("magnet_tiny", genes=list(small_sample.genes[:4]))
    slide = open_slide(small_sample.slide)
    source = BinSource(model=model, slide=slide)  # no bins predicted: units at their centres
    res = run_compare(source, model, tmp_path / "m.safetensors", slide, small_sample.outs, [16.0])
    measured = load_measured(small_sample.outs, scales_um=[16.0], slide=slide)
    cli = evaluate_measured(model, slide, measured, [16.0])
    for key in ("pcc_f", "pcc_s", "pcc_m", "n_spots", "n_genes"):
        assert res.result["scales"]["16"][key] == pytest.approx(cli["scales"]["16"][key], rel=1e-4)
