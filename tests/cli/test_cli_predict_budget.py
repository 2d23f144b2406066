"""``stmap predict`` says its batch size and memory in one line; ``--max-memory`` bounds them."""

from __future__ import annotations

import re

from napari_stmap.cli import main

PLAN_LINE = re.compile(
    r"stmap: batch (\d+) × (\d+)² px windows on cpu \(≈\d+\.\d GB of a ([\d.]+) GB budget\)"
)


def _predict(model, slide, out, *extra: str) -> int:
    argv = ["predict", "--model", str(model), "--slide", str(slide), "--out", str(out)]
    return main([*argv, *extra])


def test_predict_logs_its_choice_in_one_line(tiny_model, small_sample, tmp_path, capsys):
    assert _predict(tiny_model, small_sample.slide, tmp_path / "a.zarr", "--max-memory", "3") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stmap: batch")]
    assert len(lines) == 1, err
    batch, _window, budget_gb = PLAN_LINE.fullmatch(lines[0]).groups()
    assert batch == "1" and budget_gb == "3.0"


def test_an_explicit_batch_size_is_kept(tiny_model, small_sample, tmp_path, capsys):
    assert _predict(tiny_model, small_sample.slide, tmp_path / "b.zarr", "--batch-size", "4") == 0
    assert PLAN_LINE.search(capsys.readouterr().err).group(1) == "4"


def test_a_tiny_budget_exits_2_with_one_line_and_writes_nothing(
    tiny_model, small_sample, tmp_path, capsys
):
    out = tmp_path / "c.zarr"
    assert _predict(tiny_model, small_sample.slide, out, "--max-memory", "0.0001") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("stmap predict: error: memory budget 0.0001 GB fits no tile window")
    assert re.search(r"raise the budget \(--max-memory / max_memory_gb\) to [\d.]+ GB or more", err)
    assert not out.exists()
