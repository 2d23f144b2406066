"""The ``stmap`` command line: JSON output, and bad input -> exit 2 with one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile

from napari_stmap.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ome_slide(tmp_path):
    path = tmp_path / "slide.ome.tif"
    data = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    tifffile.imwrite(
        path,
        data,
        tile=(256, 256),
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    return path


def test_info_slide_json(capsys, ome_slide):
    code, out, _ = _run(capsys, "info", ome_slide, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "slide"
    assert info["shape_yx"] == [600, 800]
    assert info["mpp"] == pytest.approx(0.25)
    assert info["levels"] >= 1


def test_info_slide_text(capsys, ome_slide):
    code, out, _ = _run(capsys, "info", ome_slide)
    assert code == 0 and "shape_yx" in out and "0.25" in out


def test_info_spots_json(capsys, small_sample):
    code, out, _ = _run(capsys, "info", small_sample.outs, "--json", "--bin-um", "16")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "spots"
    assert info["bin_um"] == 16 and info["footprint"] == "square"
    assert info["n_genes"] == len(small_sample.genes)
    assert info["mpp"] == pytest.approx(small_sample.mpp)
    assert info["n_spots"] > 0


def test_synth_refuses_overwrite(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    code, _, err = _run(capsys, "synth", tmp_path / "out", "--size-um", "100", "100")
    assert code == 2
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing.svs"
    truncated = tmp_path / "cut.tif"
    tifffile.imwrite(truncated, np.zeros((512, 512, 3), np.uint8), tile=(128, 128))
    truncated.write_bytes(truncated.read_bytes()[:2000])
    folder = tmp_path / "not_spaceranger"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    h5ad = tmp_path / "nocoords.h5ad"
    _write_h5ad_without_spatial(h5ad)
    return {"missing": missing, "truncated": truncated, "folder": folder, "h5ad": h5ad}


def _write_h5ad_without_spatial(path):
    import anndata as ad

    ad.AnnData(X=np.ones((3, 2), np.float32)).write_h5ad(path)
    with h5py.File(path, "r") as f:
        assert "obsm" not in f or "spatial" not in f["obsm"]


@pytest.mark.parametrize("case", ["missing", "truncated", "folder", "h5ad"])
def test_bad_input_exit_2_one_line(capsys, tmp_path, case):
    path = _bad_inputs(tmp_path)[case]
    code, out, err = _run(capsys, "info", path)
    lines = [line for line in err.strip().splitlines() if not line.startswith("stmap: warning")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert path.name in lines[0]
    assert "Traceback" not in err


def test_bad_input_process_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "napari_stmap.cli", "info", str(tmp_path / "nope.tif")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope.tif" in proc.stderr


def test_info_into_a_closed_pipe_is_quiet(ome_slide):
    """`stmap info SLIDE | head`: the reader leaves early; no traceback, exit code 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_stmap.cli", "info", str(ome_slide)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `head` exiting before stmap writes
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
