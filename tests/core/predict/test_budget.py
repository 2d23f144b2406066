"""Batch size and tile from the device and a memory budget (core/predict/budget.py)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.io.slide import open_slide
from napari_stmap.core.model import create_model
from napari_stmap.core.predict import Predictor, budget
from napari_stmap.core.predict.budget import (
    CPU_BATCH,
    CUDA_FRACTION,
    GB,
    GPU_MAX_BATCH,
    HOST_FRACTION,
    WindowCost,
    choose_batch,
    measure_window_cost,
    min_tile_px,
)
from napari_stmap.core.tiling import default_tile_px

GENES = [f"G{i}" for i in range(6)]
#: A made-up cost: 200 B per window px (a ResNet PixNet measures ≈200), nothing fixed.
COST = WindowCost(fixed_bytes=0.0, per_px_bytes=200.0, out_bytes_per_px=24.0, device="cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


def _window(model, tile: int | None = None) -> int:
    return (tile or default_tile_px(model)) + 2 * model.halo_px


def test_dry_run_cost_is_linear_in_window_area(model):
    cost = measure_window_cost(model, "cpu")
    assert cost.per_px_bytes > 12  # at least the float input (3 channels × 4 B)
    assert measure_window_cost(model, "cpu") is cost  # measured once per model and device
    w = 2 * 32 * 10  # a third size, larger than both dry runs
    peak, _dim = budget._dry_run(model, torch.device("cpu"), "fp32", w)
    assert peak == pytest.approx(cost.fixed_bytes + cost.per_px_bytes * w * w, rel=0.05)


def test_a_big_budget_on_the_cpu_runs_one_default_tile_per_pass(model):
    plan = choose_batch(model, "cpu", max_memory_gb=100, cost=COST)
    assert plan.batch_size == CPU_BATCH == 1
    assert plan.tile_px == default_tile_px(model) and plan.window_px == _window(model)
    assert plan.automatic and plan.budget_bytes == 100 * GB
    assert plan.estimate_bytes == pytest.approx(COST.window_bytes(plan.window_px, plan.tile_px))
    text = plan.describe()
    assert re.fullmatch(
        r"batch 1 × \d+² px windows on cpu \(≈\d+\.\d GB of a 100\.0 GB budget\)", text
    )


def test_a_budget_that_fits_no_window_names_the_smallest_that_works(model):
    with pytest.raises(StmapInputError, match="fits no tile window") as err:
        choose_batch(model, "cpu", max_memory_gb=1e-4, cost=COST)
    text = str(err.value)
    smallest = float(re.search(r"to ([\d.]+) GB or more", text).group(1))
    assert "--max-memory" in text and str(_window(model, min_tile_px(model))) in text
    plan = choose_batch(model, "cpu", max_memory_gb=smallest, cost=COST)  # the named budget works
    assert plan.batch_size == 1 and plan.estimate_bytes <= smallest * GB
    assert plan.tile_px <= default_tile_px(model)


def test_a_tight_budget_shrinks_the_tile_not_below_the_minimum(model):
    full = COST.window_bytes(_window(model), default_tile_px(model))
    plan = choose_batch(model, "cpu", max_memory_gb=0.6 * full / GB, cost=COST)
    assert min_tile_px(model) <= plan.tile_px < default_tile_px(model)
    assert plan.estimate_bytes <= 0.6 * full
    # a tile that is given (or a store's) is kept: refused rather than shrunk
    with pytest.raises(StmapInputError, match="fits no tile window"):
        choose_batch(
            model, "cpu", tile_px=default_tile_px(model), max_memory_gb=0.6 * full / GB, cost=COST
        )


def test_cuda_batch_follows_free_device_memory_and_the_budget_caps_it(model):
    one = COST.window_bytes(_window(model), default_tile_px(model))
    plan = choose_batch(model, "cuda", free_bytes=5.5 * one / CUDA_FRACTION, cost=COST)
    assert plan.batch_size == 5 and plan.device == "cuda"
    assert plan.budget_bytes == pytest.approx(5.5 * one)
    capped = choose_batch(model, "cuda", free_bytes=1e6 * one, cost=COST)
    assert capped.batch_size == GPU_MAX_BATCH
    given = choose_batch(
        model, "cuda", free_bytes=1e6 * one, max_memory_gb=2.5 * one / GB, cost=COST
    )
    assert given.batch_size == 2  # never more than the budget the user sets


def test_the_default_budget_is_a_fraction_of_free_host_memory(model, monkeypatch):
    plan = choose_batch(model, "cpu", free_bytes=8 * GB, cost=COST)
    assert plan.budget_bytes == pytest.approx(HOST_FRACTION * 8 * GB)
    assert budget.host_available_bytes() > 0  # /proc/meminfo or sysconf here
    monkeypatch.setattr(budget, "host_available_bytes", lambda: None)  # neither readable
    plan = choose_batch(model, "cpu", cost=COST)
    assert plan.budget_bytes == budget.FALLBACK_BUDGET_BYTES


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can read CUDA memory")
def test_cuda_without_a_readable_free_memory_needs_a_budget(model):
    with pytest.raises(StmapInputError, match="--max-memory"):
        choose_batch(model, "cuda", cost=COST)
    assert choose_batch(model, "cuda", cost=COST, batch_size=3).batch_size == 3


def test_a_given_batch_is_kept_and_warned_about_when_over_budget(model, caplog):
    with caplog.at_level(logging.WARNING, logger="napari_stmap.core.predict.budget"):
        plan = choose_batch(model, "cpu", batch_size=8, max_memory_gb=1e-4, cost=COST)
    assert plan.batch_size == 8 and not plan.automatic
    assert plan.tile_px == default_tile_px(model)
    assert "exceeds" in caplog.text


def test_a_non_positive_budget_is_refused(model):
    with pytest.raises(StmapInputError, match="positive number of GB, got 0"):
        choose_batch(model, "cpu", max_memory_gb=0, cost=COST)


def test_predictor_uses_the_same_choice(small_sample, model, tmp_path):
    slide = open_slide(small_sample.slide)
    with Predictor(slide, model, tmp_path / "a.zarr", paused=True) as pred:
        assert pred.plan.batch_size == CPU_BATCH and pred.plan.automatic
        assert pred._pipeline.batch_size == CPU_BATCH
        assert pred.spec.tile_px == pred.plan.tile_px == default_tile_px(model)
    with Predictor(slide, model, tmp_path / "b.zarr", batch_size=3, paused=True) as pred:
        assert pred._pipeline.batch_size == 3 and not pred.plan.automatic
    with pytest.raises(StmapInputError, match="fits no tile window"):
        Predictor(slide, model, tmp_path / "c.zarr", max_memory_gb=1e-5)
    assert not (tmp_path / "c.zarr").exists()
