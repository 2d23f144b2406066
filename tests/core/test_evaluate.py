"""The evaluation harness (core/evaluate.py) through its public functions.

A tiny random-init PixNet on the small synthetic sample (conftest): the result's layout, its
metrics against :mod:`napari_stmap.core.metrics` computed by hand on the same units, genes
without variance, progress, depth factors, the truth block and the refusals.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_stmap.core.errors import StmapInputError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")

N_GENES = 5
SCALES = [8.0, 16.0]
KEYS = ["8", "16"]


@pytest.fixture(scope="module")
def model(small_sample):
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=list(small_sample.genes[:N_GENES])).eval()


@pytest.fixture(scope="module")
def measured(small_sample, slide):
    """The sample's bins at 8 µm (the base of the 8 and 16 µm scales), in tissue."""
    from napari_stmap.core.measured import load_measured

    return load_measured(small_sample.outs, scales_um=SCALES, slide=slide)


@pytest.fixture(scope="module")
def units(measured, model):
    from napari_stmap.core.measured import scale_key

    meas = measured.restrict(list(model.genes))
    return meas, {scale_key(b): meas.units(b) for b in SCALES}


@pytest.fixture(scope="module")
def preds(model, slide, units):
    """``predict_units`` on the evaluated units: what the harness scores."""
    from napari_stmap.core.predict import predict_units

    meas, u = units
    return predict_units(model, slide, meas, u, device="cpu", tile_px=None, batch_size=4)


@pytest.fixture(scope="module")
def result(model, slide, measured):
    from napari_stmap.core.evaluate import evaluate_measured

    steps: list[tuple[int, int]] = []
    out = evaluate_measured(
        model, slide, measured, SCALES, progress=lambda d, t: steps.append((d, t))
    )
    return out, steps


def _given(preds):
    """A ``predict`` callback returning fixed predictions (and counting its calls)."""
    calls = []

    def predict(meas, units):
        calls.append(sorted(units))
        return {k: np.array(v, copy=True) for k, v in preds.items()}

    return predict, calls


# ------------------------------------------------------------------------------ structure
def test_result_has_every_scale_gene_and_metric(result, model, units):
    from napari_stmap.core.evaluate import METRIC_KEYS

    res, _ = result
    _, u = units
    assert {"scales", "genes", "absolute", "model", "data"} <= set(res) and "truth" not in res
    for block in (res, res["absolute"]):
        assert list(block["scales"]) == KEYS and list(block["genes"]) == KEYS
        for key in KEYS:
            entry = block["scales"][key]
            assert tuple(entry) == METRIC_KEYS
            assert entry["n_spots"] == u[key].n > 0 and entry["n_genes"] == N_GENES
            assert list(block["genes"][key]) == list(model.genes)
            assert all(isinstance(r, float) and -1 <= r <= 1 for r in block["genes"][key].values())
    assert res["model"]["arch"] == model.arch and res["model"]["n_genes"] == N_GENES
    assert res["model"]["tta"] is False
    data = res["data"]
    assert data["measured_um"] == 8.0 and data["footprint"] == "square"
    assert data["n_genes_evaluated"] == N_GENES and data["n_genes_missing"] == 0
    assert data["depth_factor"] == 1.0  # a model without training depth
    assert {k: v["n"] for k, v in data["units"].items()} == {k: u[k].n for k in KEYS}
    assert data["units"]["16"] == {"footprint": "square", "size_um": 16.0, "n": u["16"].n}
    json.dumps(res, allow_nan=False)  # strict JSON: NaN written as None


def test_progress_counts_spots_up_to_the_total(result, units):
    _, steps = result
    _, u = units
    total = steps[0][1]
    assert steps[0] == (0, total) and steps[-1] == (total, total) and len(steps) > 2
    assert all(t == total for _, t in steps)
    done = [d for d, _ in steps]
    assert done == sorted(done)
    # 8 µm are the measured bins themselves; 16 µm are summed from their 8 µm bins, once each
    assert total == u["8"].n + len(np.unique(u["16"].members.indices))


def test_format_table_has_one_row_per_scale(result):
    from napari_stmap.core.evaluate import format_table

    res, _ = result
    lines = format_table(res).splitlines()
    assert lines[0].startswith("| scale µm | spots | genes | PCC@F")
    assert len(lines) == 2 + len(KEYS)
    assert lines[2].startswith(f"| 8 | {res['scales']['8']['n_spots']} | {N_GENES} |")
    assert f"{res['scales']['16']['pcc_m']:.3f}" in lines[3]


# -------------------------------------------------------------------------------- metrics
def test_metrics_equal_core_metrics_on_predict_units(result, preds, units, model):
    from napari_stmap.core.metrics import evaluate_expression

    res, _ = result
    _, u = units
    names = list(model.genes)
    for key in KEYS:
        want = evaluate_expression(
            preds[key], u[key].counts, u[key].total, genes=names, gene_list=names
        )
        for view, block in (("normalised", res), ("absolute", res["absolute"])):
            got, exp = block["scales"][key], want[view]
            for metric in ("pcc_f", "pcc_s", "pcc_m", "mse", "mae"):
                assert got[metric] == pytest.approx(exp[metric], rel=1e-9, abs=1e-12), (key, view)
            assert got["n_spots"] == exp["n_spots"] and got["n_genes"] == exp["n_genes"]
            assert block["genes"][key] == pytest.approx(exp["per_gene"], rel=1e-9)


def test_given_predictions_score_alike_without_running_the_model(
    result, preds, model, slide, measured
):
    from napari_stmap.core.evaluate import evaluate_measured

    res, _ = result
    predict, calls = _given(preds)
    steps = []
    got = evaluate_measured(
        model, slide, measured, SCALES, predict=predict, progress=lambda d, t: steps.append(d)
    )
    assert calls == [sorted(KEYS)] and steps == []  # progress is the model's, not called here
    assert got["scales"] == res["scales"] and got["absolute"] == res["absolute"]


def test_predicting_the_measurement_scores_perfectly(model, slide, measured, units):
    from napari_stmap.core.evaluate import evaluate_measured

    _, u = units
    exact = {k: np.column_stack([u[k].counts.toarray(), u[k].total]) for k in KEYS}
    res = evaluate_measured(model, slide, measured, SCALES, predict=_given(exact)[0])
    for block in (res, res["absolute"]):
        for key in KEYS:
            m = block["scales"][key]
            assert m["pcc_f"] == pytest.approx(1.0) and m["pcc_m"] == pytest.approx(1.0)
            assert m["mse"] == pytest.approx(0.0, abs=1e-20) and m["mae"] == 0.0


def test_gene_without_variance_is_nan_and_counted(preds, model, slide, measured):
    from napari_stmap.core.evaluate import evaluate_measured, format_table

    flat = model.genes[1]
    constant = {k: v.copy() for k, v in preds.items()}
    for v in constant.values():
        v[:, 1] = 0.0  # zero in counts and in log1p(1e4 · 0 / total)
    res = evaluate_measured(model, slide, measured, SCALES, predict=_given(constant)[0])
    for block in (res, res["absolute"]):
        for key in KEYS:
            genes, m = block["genes"][key], block["scales"][key]
            assert genes[flat] is None  # NaN, written as None
            assert m["n_genes"] == N_GENES  # counted, not dropped
            others = [r for g, r in genes.items() if g != flat]
            assert all(r is not None for r in others)
            assert m["pcc_m"] == pytest.approx(np.mean(others), rel=1e-12)
    json.dumps(res, allow_nan=False)
    assert "nan" not in format_table(res)  # the summaries stay defined


def test_top_k_keeps_the_most_expressed_genes(preds, model, slide, measured, units):
    from napari_stmap.core.evaluate import evaluate_measured

    _, u = units
    res = evaluate_measured(model, slide, measured, SCALES, top_k=3, predict=_given(preds)[0])
    for key in KEYS:
        mean = np.asarray(u[key].counts.mean(axis=0)).ravel()
        top = {model.genes[i] for i in np.argsort(-mean, kind="stable")[:3]}
        assert set(res["genes"][key]) == top and res["scales"][key]["n_genes"] == 3


def test_depth_factor_scales_absolute_values_only(preds, model, slide, measured, monkeypatch):
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.measured import spot_density

    base = evaluate_measured(model, slide, measured, SCALES, predict=_given(preds)[0])
    ref = 3.0 * spot_density(measured.restrict(list(model.genes)).units(16.0))
    training = {"depth": {"reference_counts_per_um2": ref}, "bin_um": [2.0, 16.0]}
    monkeypatch.setattr(model, "metadata", {"training": training})
    res = evaluate_measured(model, slide, measured, SCALES, predict=_given(preds)[0])
    assert res["data"]["depth_factor"] == pytest.approx(3.0)
    for key in KEYS:  # normalisation divides the factor out
        for metric in ("pcc_m", "mse", "mae"):
            assert res["scales"][key][metric] == pytest.approx(base["scales"][key][metric])
        assert res["absolute"]["scales"][key]["mse"] != pytest.approx(
            base["absolute"]["scales"][key]["mse"]
        )


def test_truth_block_has_the_same_layout(preds, model, slide, measured, small_sample):
    from napari_stmap.core.evaluate import METRIC_KEYS, evaluate_measured

    res = evaluate_measured(
        model, slide, measured, SCALES, truth=small_sample.root, predict=_given(preds)[0]
    )
    truth = res["truth"]
    assert set(truth) == {"scales", "genes", "absolute"}
    for block in (truth, truth["absolute"]):
        assert list(block["scales"]) == KEYS
        for key in KEYS:
            assert tuple(block["scales"][key]) == METRIC_KEYS
            assert block["scales"][key]["n_spots"] == res["scales"][key]["n_spots"]
            assert list(block["genes"][key]) == list(model.genes)
            assert math.isfinite(block["scales"][key]["pcc_m"])


def test_evaluate_model_opens_the_files(model, small_sample, tmp_path):
    from napari_stmap.core.evaluate import evaluate_model
    from napari_stmap.core.model import save_model

    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    res = evaluate_model(path, small_sample.slide, small_sample.outs, [16.0], batch_size=4)
    assert list(res["scales"]) == ["16"] and res["data"]["measured_um"] == 16.0
    assert res["data"]["slide"] == str(small_sample.slide)
    assert res["model"]["path"] == str(path)
    assert res["scales"]["16"]["n_genes"] == N_GENES


# ------------------------------------------------------------------------------ refusals
def test_a_scale_finer_than_the_bins_is_refused(model, slide, measured, preds, small_sample):
    from napari_stmap.core.evaluate import evaluate_measured, evaluate_model

    with pytest.raises(StmapInputError, match=r"a 2 µm scale is finer than the measured 8 µm"):
        evaluate_measured(model, slide, measured, [2.0, 8.0], predict=_given(preds)[0])
    with pytest.raises(StmapInputError, match=r"the 1 µm scale is finer than every measured"):
        evaluate_model(model, slide, small_sample.outs, [1.0])


def test_a_model_without_measured_genes_is_refused(slide, measured):
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.model import create_model

    stranger = create_model("pixnet_tiny", genes=["NOT_A_GENE", "NOR_THIS"])
    with pytest.raises(StmapInputError, match=r"none of the model's 2 genes is measured"):
        evaluate_measured(stranger, slide, measured, SCALES)


def test_missing_genes_are_reported_not_scored(slide, measured, preds, model):
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.model import create_model

    mixed = create_model("pixnet_tiny", genes=[*model.genes[:2], "NOT_A_GENE"])
    cut = {k: np.column_stack([v[:, :2], np.ones(len(v)), v[:, -1]]) for k, v in preds.items()}
    res = evaluate_measured(mixed, slide, measured, SCALES, predict=_given(cut)[0])
    assert res["data"]["n_genes_evaluated"] == 2 and res["data"]["n_genes_missing"] == 1
    assert list(res["genes"]["8"]) == list(model.genes[:2])
