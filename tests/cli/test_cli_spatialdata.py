"""``stmap train/evaluate --spots data.zarr --table NAME``: measured data from a SpatialData store.

The store is the synthetic sample's bins written with spatialdata's models
(tests/spatialdata_samples.py): evaluating against it must give the very numbers evaluating
against the Space Ranger folder gives (same spots, same counts).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("spatialdata")
pytest.importorskip("torch")

from spatialdata_samples import synthetic_store  # noqa: E402, I001 (tests/ helper module)

from napari_stmap.cli import main  # noqa: E402

STMAP = [sys.executable, "-m", "napari_stmap.cli"]


def _stmap(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def store(small_sample, tmp_path_factory):
    return synthetic_store(small_sample, tmp_path_factory.mktemp("sd") / "sample.zarr")


def test_evaluate_store_table_equals_space_ranger_folder(small_sample, tiny_model, store, tmp_path):
    common = ["evaluate", "--model", tiny_model, "--slide", small_sample.slide, "--bin-um", "16"]
    proc = _stmap(
        *common, "--spots", store, "--table", "square_016um", "--json", tmp_path / "a.json"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        main(
            [str(a) for a in [*common, "--spots", small_sample.outs, "--json", tmp_path / "b.json"]]
        )
        == 0
    )
    got, want = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert got["data"]["units"] == want["data"]["units"]
    assert got["data"]["n_measured"] == want["data"]["n_measured"]
    assert got["scales"]["16"]["pcc_m"] == pytest.approx(want["scales"]["16"]["pcc_m"], abs=1e-9)
    assert got["data"]["spots"].endswith("sample.zarr/tables/square_016um")


def test_evaluate_store_without_table_picks_bins_the_scales_need(
    small_sample, tiny_model, store, tmp_path
):
    out = tmp_path / "r.json"
    argv = ["evaluate", "--model", tiny_model, "--slide", small_sample.slide, "--spots", store]
    assert main([str(a) for a in [*argv, "--bin-um", "16,32", "--json", out]]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["measured_um"] == 16 and result["data"]["available_um"] == [2, 8, 16]
    assert set(result["scales"]) == {"16", "32"}


def test_train_on_store_table(small_sample, store, tmp_path, one_thread):
    out = tmp_path / "m.safetensors"
    argv = [
        "train", "--slide", small_sample.slide, "--spots", store, "--table", "square_016um",
        "--arch", "pixnet", "--encoder", "resnet10t", "--genes", "top:4", "--epochs", "1",
        "--steps-per-epoch", "1", "--batch-size", "2", "--tile-px", "64", "--out", out,
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    from napari_stmap.core.model import read_model_metadata

    meta = read_model_metadata(out)
    assert "square_016um" in json.dumps(meta)


def test_bad_table_and_foreign_store_are_one_line(small_sample, tiny_model, store, tmp_path):
    base = [
        "evaluate",
        "--model",
        tiny_model,
        "--slide",
        small_sample.slide,
        "--json",
        tmp_path / "x.json",
    ]
    proc = _stmap(*base, "--spots", store, "--table", "cells")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "no table 'cells'; tables present: square_002um, square_008um, square_016um" in lines[0]
    proc = _stmap(*base, "--spots", small_sample.outs, "--table", "square_008um")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "needs a SpatialData .zarr store, but it is a folder holding binned_outputs" in lines[0]
