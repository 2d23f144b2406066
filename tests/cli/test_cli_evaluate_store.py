"""``stmap evaluate --pred STORE.zarr``: scoring from a prediction store.

- the metrics equal a plain ``stmap evaluate``'s up to the store's float16 embeddings;
- a missing store is created, a partly done one completed (only its missing tiles run);
- a complete store: the network does not run (tile windows embedded, counted
  in-process);
- a folder of stores (the viewer's) finds the store named by ``store_path_for``;
- refusals, exit 2 and one line: another model's or slide's store, ``--tta``, a spot model,
  units on tiles the store skipped as off tissue.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_stmap.cli import main

STMAP = [sys.executable, "-m", "napari_stmap.cli"]
METRICS = ("pcc_f", "pcc_s", "pcc_m", "mse", "mae")


def _stmap(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def _str(argv) -> list[str]:
    return [str(a) for a in argv]


def _save_tiny(path, genes, seed: int, arch: str = "pixnet_tiny"):
    import torch

    from napari_stmap.core.model import create_model, save_model

    torch.manual_seed(seed)
    save_model(create_model(arch, genes=list(genes)).eval(), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_sample):
    """Two tiny random-init PixNets of the same genes (different weights) and a SpotNet."""
    root = tmp_path_factory.mktemp("models")
    genes = small_sample.genes[:5]
    return {
        "tiny": _save_tiny(root / "tiny.safetensors", genes, 0),
        "other": _save_tiny(root / "other.safetensors", genes, 1),
        "spot": _save_tiny(root / "spot.safetensors", genes, 0, "spotnet_tiny"),
    }


def _argv(sample, model, out, *extra) -> list[str]:
    return [
        "evaluate", "--model", model, "--slide", sample.slide, "--spots", sample.outs,
        "--json", out, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def plain(tmp_path_factory, small_sample, models):
    """A plain ``stmap evaluate`` (its own tiled pass), run as a process."""
    out = tmp_path_factory.mktemp("plain") / "plain.json"
    proc = _stmap(*_argv(small_sample, models["tiny"], out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@pytest.fixture
def embedded(monkeypatch):
    """Tiles that go through the network from now on (sizes of the batches of tile windows).

    Every tiled pass (store or in-memory map) runs its batches through
    :func:`~napari_stmap.core.predict.pipeline.embed_windows`; model construction's
    receptive-field probe does not count.
    """
    from napari_stmap.core.predict import pipeline

    seen: list[int] = []
    real = pipeline.embed_windows

    def embed_windows(model, images, *args, **kwargs):
        seen.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "embed_windows", embed_windows)
    return seen


def _assert_same_metrics(got: dict, want: dict) -> None:
    """Equal up to float16 embeddings (as Compare vs evaluate in tests/viewer)."""
    assert list(got["scales"]) == list(want["scales"])
    for g, w in ((got, want), (got["absolute"], want["absolute"])):
        for key, metrics in w["scales"].items():
            mine = g["scales"][key]
            assert (mine["n_spots"], mine["n_genes"]) == (metrics["n_spots"], metrics["n_genes"])
            for name in METRICS:
                want_value = pytest.approx(metrics[name], rel=1e-3, abs=1e-4)
                assert mine[name] == want_value, (key, name)


def _done(store) -> int:
    from napari_stmap.core.store import open_store

    return open_store(store).counts()["done"]


# ------------------------------------------------------------------------------ the store
def test_pred_creates_store_and_matches_plain_evaluate(small_sample, models, plain, tmp_path):
    store, out = tmp_path / "pred.zarr", tmp_path / "store.json"
    proc = _stmap(*_argv(small_sample, models["tiny"], out, "--pred", store))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    _assert_same_metrics(got, plain)
    assert got["data"]["store"] == str(store) and "store" not in plain["data"]
    assert got["model"]["tta"] is False
    assert "PCC@M" in proc.stdout and _done(store) > 0
    info = json.loads(_stmap("info", store, "--json").stdout)  # the store names its model
    assert info["model"] == str(models["tiny"].resolve())


def test_partly_done_store_is_completed(small_sample, models, plain, tmp_path, embedded):
    from napari_stmap.core.store import TODO, open_store

    store = tmp_path / "part.zarr"
    argv = ["predict", "--model", models["tiny"], "--slide", small_sample.slide, "--out", store]
    argv += ["--tile-px", "256", "--region", "0", "0", "250", "250"]
    assert main(_str(argv)) == 0
    before = open_store(store)
    todo = {tuple(t) for t in zip(*(before.done == TODO).nonzero(), strict=True)}
    assert before.counts()["done"] >= 1 and todo
    embedded.clear()
    out = tmp_path / "part.json"
    assert main(_str(_argv(small_sample, models["tiny"], out, "--pred", store))) == 0
    _assert_same_metrics(json.loads(out.read_text()), plain)
    after = open_store(store)
    newly = {t for t in todo if after.state(t) != TODO}
    assert newly, "no missing tile was predicted"
    assert sum(embedded) == len(newly), "the network ran on tiles the store already had"
    assert after.spec.tile_px == 256  # the store's tiles, not the command's default


def test_complete_store_does_not_run_network(small_sample, models, tmp_path, embedded, monkeypatch):
    from napari_stmap.core.predict import spots as predict_dense

    store, out = tmp_path / "pred.zarr", tmp_path / "a.json"
    assert main(_str(_argv(small_sample, models["tiny"], out, "--pred", store))) == 0
    assert sum(embedded) == _done(store) > 0
    first = json.loads(out.read_text())

    def no_plain_pass(*args, **kwargs):
        raise AssertionError("evaluate --pred predicted the spots outside the store")

    embedded.clear()
    done = _done(store)
    monkeypatch.setattr(predict_dense, "predict_spots", no_plain_pass)
    out2 = tmp_path / "b.json"
    assert main(_str(_argv(small_sample, models["tiny"], out2, "--pred", store))) == 0
    assert embedded == [], f"{sum(embedded)} tiles went through the network again"
    assert _done(store) == done
    assert json.loads(out2.read_text())["scales"] == first["scales"]


def test_folder_of_stores_finds_the_viewers_store(small_sample, models, tmp_path, embedded):
    from napari_stmap.core.store import store_path_for

    root = tmp_path / "stores"
    root.mkdir()
    out = tmp_path / "a.json"
    assert main(_str(_argv(small_sample, models["tiny"], out, "--pred", root))) == 0
    named = store_path_for(small_sample.slide, models["tiny"], root)
    assert json.loads(out.read_text())["data"]["store"] == str(named) and _done(named) > 0
    embedded.clear()
    assert main(_str(_argv(small_sample, models["tiny"], out, "--pred", root))) == 0
    assert embedded == []


# ------------------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def made_store(tmp_path_factory, small_sample, models):
    """A complete store of the ``tiny`` model on the small sample."""
    store = tmp_path_factory.mktemp("made") / "pred.zarr"
    argv = ["predict", "--model", models["tiny"], "--slide", small_sample.slide, "--out", store]
    assert main(_str(argv)) == 0
    return store


def test_store_of_another_model_exit_2_one_line(small_sample, models, made_store, tmp_path):
    proc = _stmap(*_argv(small_sample, models["other"], tmp_path / "x.json", "--pred", made_store))
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("stmap evaluate: error:"), proc.stderr
    assert str(made_store) in lines[0]
    assert str(models["tiny"].resolve()) in lines[0] and str(models["other"]) in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()


def test_store_of_another_slide_refused(small_sample, models, made_store, tmp_path, capsys):
    argv = _argv(small_sample, models["tiny"], tmp_path / "x.json", "--pred", made_store)
    assert main(_str([*argv, "--mpp", "0.25"])) == 2  # the same file read at another µm/px
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "0.5 µm/px" in err[0] and "0.25 µm/px" in err[0], err


def test_tta_with_pred_exit_2_one_line(small_sample, models, made_store, tmp_path):
    argv = _argv(small_sample, models["tiny"], tmp_path / "x.json", "--pred", made_store)
    proc = _stmap(*argv, "--tta")
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and "--tta" in lines[0] and "single-pass" in lines[0], proc.stderr


def test_spot_model_with_pred_refused(small_sample, models, tmp_path, capsys):
    argv = _argv(small_sample, models["spot"], tmp_path / "x.json", "--pred", tmp_path / "s.zarr")
    assert main(_str(argv)) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "dense map" in err[0], err
    assert not (tmp_path / "s.zarr").exists()


def test_units_on_skipped_tiles_refused(small_sample, models, made_store, tmp_path, capsys):
    from napari_stmap.core.store import open_store

    store = tmp_path / "skipped.zarr"
    argv = ["predict", "--model", models["tiny"], "--slide", small_sample.slide, "--out", store]
    assert main(_str([*argv, "--tile-px", "256", "--region", "0", "0", "10", "10"])) == 0
    capsys.readouterr()  # stmap predict's own line (batch and memory)
    assert open_store(store, mode="r+").mark_skipped([(1, 1)]) == 1
    assert (
        main(_str(_argv(small_sample, models["tiny"], tmp_path / "x.json", "--pred", store))) == 2
    )
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "skipped as off tissue" in err[0], err


def test_help_documents_pred(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pred STORE.zarr" in text and "not with --tta" in text
