"""Precision by device: ``resolve_precision`` ("auto"), bf16 autocast on the CPU, fp32 unchanged.

- ``"auto"`` is bf16 on CPUs with avx512_bf16 / amx_bf16 and on CUDA with bf16 support, only
  for measured networks and only while :data:`AUTO_BF16` is on; fp32 anywhere else;
- ``precision="fp32"`` (and ``stmap predict --precision fp32``) gives bit-identical output to
  the run without autocast (the code before precision existed);
- bf16 is close to fp32 on a tiny model; ``stmap evaluate`` records the precision it ran at.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import zarr

from napari_stmap.cli import main
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import disks
from napari_stmap.core.model import create_model, save_model
from napari_stmap.core.predict import Predictor, predict_map, predict_slide, predict_spots
from napari_stmap.core.predict import device as device_mod
from napari_stmap.core.predict import pipeline as pipeline_mod
from napari_stmap.core.predict.device import (
    AUTO_BF16,
    autocast,
    cpu_flags,
    resolve_precision,
)

GENES = [f"G{i}" for i in range(6)]
BF16_CPU = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
PLAIN_CPU = frozenset({"fpu", "sse4_2", "avx2"})
BOX = (64, 64, 320, 448)  # level-0 px of the synthetic slide (0.5 µm/px = the model's)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


# ----------------------------------------------------------------------- resolve_precision
@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (BF16_CPU, "bf16"),
        (frozenset({"avx512_bf16"}), "bf16"),
        (frozenset({"amx_bf16"}), "bf16"),
        (PLAIN_CPU, "fp32"),
        (frozenset(), "fp32"),
    ],
)
def test_auto_on_the_cpu_follows_its_flags(flags, want, model):
    assert resolve_precision("cpu", model, flags=flags, auto_bf16=True) == want
    assert resolve_precision(torch.device("cpu"), None, "auto", flags=flags, auto_bf16=True) == want


def test_auto_is_fp32_when_switched_off_or_for_unmeasured_networks(model):
    assert resolve_precision("cpu", model, flags=BF16_CPU, auto_bf16=False) == "fp32"
    spot = create_model("spotnet_tiny", genes=GENES)
    assert resolve_precision("cpu", spot, flags=BF16_CPU, auto_bf16=True) == "fp32"
    assert resolve_precision("mps", model, flags=BF16_CPU, auto_bf16=True) == "fp32"


def test_auto_default_follows_the_switch(model):
    got = resolve_precision("cpu", model, flags=BF16_CPU)
    assert got == ("bf16" if AUTO_BF16 else "fp32")
    assert resolve_precision("cpu", model, flags=PLAIN_CPU) == "fp32"


def test_auto_on_cuda_needs_bf16_support(monkeypatch, model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("cuda", model, auto_bf16=True) == "bf16"
    assert resolve_precision(torch.device("cuda:1"), model, auto_bf16=True) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("cuda", model, auto_bf16=True) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("cuda", model, auto_bf16=True) == "fp32"


def test_explicit_precisions_pass_and_others_are_refused(model):
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision("cpu", model, p, flags=PLAIN_CPU, auto_bf16=True) == p
    with pytest.raises(StmapInputError, match=r"precision must be one of .*'half'"):
        resolve_precision("cpu", model, "half")


def test_cpu_flags_read_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n"
    )
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_autocast_runs_bf16_on_the_cpu_and_nothing_for_fp32():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "fp16"):  # the CPU runs fp16 as fp32
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        assert y.dtype == torch.bfloat16


# ------------------------------------------------------------------------ the dense paths
def test_fp32_map_is_bit_identical_to_before(slide, model, monkeypatch):
    now, grid = predict_map(model, slide, BOX, tile_px=128, precision="fp32")
    monkeypatch.setattr(pipeline_mod, "autocast", lambda dev, p: contextlib.nullcontext())
    then, grid0 = predict_map(model, slide, BOX, tile_px=128, precision="fp32")
    assert grid == grid0
    np.testing.assert_array_equal(now, then)


def test_bf16_map_is_close_to_fp32(slide, model):
    fp32, _ = predict_map(model, slide, BOX, tile_px=128, precision="fp32")
    bf16, _ = predict_map(model, slide, BOX, tile_px=128, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # autocast ran
    rel = np.abs(bf16 - fp32).max() / np.abs(fp32).max()
    assert rel < 0.05, rel
    r = np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1]
    assert r > 0.999, r


def test_predict_spots_passes_precision(slide, model, monkeypatch):
    seen = []
    real = device_mod.autocast

    def spy(dev, p):
        seen.append(p)
        return real(dev, p)

    monkeypatch.setattr(pipeline_mod, "autocast", spy)
    centres = np.array([[150.0, 200.0], [250.0, 300.0]])
    predict_spots(model, slide, disks(centres, 40.0), precision="bf16")
    assert seen and set(seen) == {"bf16"}
    seen.clear()
    predict_spots(model, slide, disks(centres, 40.0), precision="fp32")
    assert set(seen) == {"fp32"}


def test_predictor_resolves_auto(slide, model, tmp_path, monkeypatch):
    monkeypatch.setattr(device_mod, "AUTO_BF16", True)
    monkeypatch.setattr(device_mod, "cpu_flags", lambda *a: BF16_CPU)
    with Predictor(slide, model, tmp_path / "a.zarr", tile_px=128, paused=True) as p:
        assert p.precision == "bf16"
    monkeypatch.setattr(device_mod, "cpu_flags", lambda *a: PLAIN_CPU)
    with Predictor(slide, model, tmp_path / "b.zarr", tile_px=128, paused=True) as p:
        assert p.precision == "fp32"
    with Predictor(
        slide, model, tmp_path / "c.zarr", tile_px=128, paused=True, precision="bf16"
    ) as p:
        assert p.precision == "bf16"


def _store_arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][...] for k in ("embedding", "done")}


def test_cli_predict_fp32_store_is_bit_identical_to_before(
    slide, model, small_sample, tmp_path, monkeypatch
):
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    assert (
        main(
            [
                *("predict", "--model", str(path), "--slide", str(small_sample.slide)),
                *("--out", str(tmp_path / "now.zarr"), "--tile-px", "128"),
                *("--batch-size", "2", "--precision", "fp32"),
            ]
        )
        == 0
    )
    monkeypatch.setattr(pipeline_mod, "autocast", lambda dev, p: contextlib.nullcontext())
    predict_slide(slide, path, tmp_path / "then.zarr", tile_px=128, batch_size=2)
    now, then = _store_arrays(tmp_path / "now.zarr"), _store_arrays(tmp_path / "then.zarr")
    for k in now:
        np.testing.assert_array_equal(now[k], then[k], err_msg=k)


def test_cli_evaluate_records_its_precision(small_sample, model, tmp_path):
    path = tmp_path / "tiny.safetensors"
    genes = list(small_sample.genes[:5])
    torch.manual_seed(0)
    save_model(create_model("pixnet_tiny", genes=genes).eval(), path)
    out = {}
    for p in ("fp32", "bf16"):
        js = tmp_path / f"{p}.json"
        argv = [
            *("evaluate", "--model", str(path), "--slide", str(small_sample.slide)),
            *("--spots", str(small_sample.outs), "--bin-um", "16", "--json", str(js)),
            *("--precision", p),
        ]
        assert main(argv) == 0
        out[p] = json.loads(js.read_text())
    assert out["fp32"]["model"]["precision"] == "fp32"
    assert out["bf16"]["model"]["precision"] == "bf16"
    a, b = out["fp32"]["genes"]["16"], out["bf16"]["genes"]["16"]
    assert set(a) == set(b)
    assert max(abs(a[g] - b[g]) for g in a) < 0.05
