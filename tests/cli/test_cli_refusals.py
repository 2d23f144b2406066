"""``stmap`` run as a process, as a user runs it: refusals, warnings, set-up noise, progress.

- shapes / ``--region`` off the slide: exit 2 and one line naming the shape and the extent;
  partly off: clipped, one warning line;
- torchvision's set-up note only with ``-v``;
- ``stmap evaluate`` draws a progress bar on a terminal (with and without ``--tta``);
- ``stmap info STORE.zarr`` describes a prediction store.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

import pandas as pd
import pytest

from napari_stmap.cli import main

STMAP = [sys.executable, "-m", "napari_stmap.cli"]
H, W = 600, 800  # the small sample's slide, level-0 px (y, x)


def _stmap(*argv, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_sample, tiny_model):
    out = tmp_path_factory.mktemp("pred") / "pred.zarr"
    argv = ["predict", "--model", tiny_model, "--slide", small_sample.slide, "--out", out]
    assert main([str(a) for a in argv]) == 0
    return out


def _geojson(path, boxes: dict) -> None:
    """Rectangles ``{name: (x0, y0, x1, y1)}`` level-0 px as a FeatureCollection ([x, y])."""

    def ring(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    features = [
        {
            "type": "Feature",
            "properties": {"name": name},
            "geometry": {"type": "Polygon", "coordinates": [ring(*box)]},
        }
        for name, box in boxes.items()
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


# ------------------------------------------------------------------------------ aggregate
def test_aggregate_shape_outside_slide_exit_2(store, tmp_path):
    shapes = tmp_path / "shapes.geojson"
    _geojson(shapes, {"inside": (100, 100, 300, 300), "tumour": (12000, 5, 13000, 100)})
    out = tmp_path / "out.csv"
    proc = _stmap("aggregate", "--pred", store, "--shapes", shapes, "--out", out)
    assert proc.returncode == 2, proc.stderr
    (line,) = _lines(proc.stderr)
    assert "shapes.geojson" in line and "'tumour'" in line
    assert "x 12000–13000, y 5–100 px" in line  # the shape's extent
    assert f"x 0–{W}, y 0–{H} px" in line  # the slide's extent
    assert not out.exists()


def test_aggregate_shape_partly_outside_clipped_one_warning(store, tmp_path):
    shapes = tmp_path / "shapes.geojson"
    _geojson(
        shapes,
        {
            "inside": (100, 100, 300, 300),
            "edge": (700, 100, 900, 200),  # half past the right edge (x = 800)
            "edge_clipped": (700, 100, W, 200),  # its part on the slide
            "corner": (-50, 500, 50, 700),
        },
    )
    out = tmp_path / "out.csv"
    proc = _stmap("aggregate", "--pred", store, "--shapes", shapes, "--out", out)
    assert proc.returncode == 0, proc.stderr
    (line,) = _lines(proc.stderr)
    assert line.startswith("stmap: warning: ") and "2 of 4 regions" in line
    assert "'edge'" in line and "'corner'" in line and f"x 0–{W}, y 0–{H} px" in line
    table = pd.read_csv(out, index_col="region")
    genes = [*table.columns[table.columns.get_loc("total_counts") :]]
    # the map is empty outside the slide: the clipped shape sums what the whole one does
    pd.testing.assert_series_equal(
        table.loc["edge", genes], table.loc["edge_clipped", genes], check_names=False
    )


# -------------------------------------------------------------------------------- predict
def test_predict_region_outside_slide_exit_2(small_sample, tiny_model, tmp_path):
    out = tmp_path / "new" / "pred.zarr"
    proc = _stmap(
        "predict", "--model", tiny_model, "--slide", small_sample.slide, "--out", out,
        "--region", 5000, 12000, 5100, 13000,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = _lines(proc.stderr)
    assert "--region (y 5000–5100, x 12000–13000 px)" in line
    assert f"(y 0–{H}, x 0–{W} px)" in line and small_sample.slide.name in line
    assert not (tmp_path / "new").exists()  # nothing written


def test_predict_region_partly_outside_one_warning_no_setup_noise(
    small_sample, tiny_model, tmp_path
):
    out = tmp_path / "pred.zarr"
    proc = _stmap(
        "predict", "--model", tiny_model, "--slide", small_sample.slide, "--out", out,
        "--region", 100, 700, 500, 1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line, plan = _lines(proc.stderr)  # the warning, then the batch and memory of the run
    assert plan.startswith("stmap: batch 1 × ") and plan.endswith(" GB budget)")
    assert line.startswith("stmap: warning: --region (y 100–500, x 700–1200 px) reaches past")
    assert f"(y 100–500, x 700–{W} px)" in line
    assert "torchvision" not in proc.stderr
    assert "tiles done" in proc.stdout


def _placeholder_env() -> bool:
    from napari_stmap.core.model import _torchvision_compat as compat

    compat.import_timm()
    return compat.placeholder_ops_registered()


def test_torchvision_note_only_with_verbose(store, small_sample, tiny_model):
    if not _placeholder_env():
        pytest.skip("torchvision matches torch here: no placeholder note to hide or show")
    argv = ["predict", "--model", tiny_model, "--slide", small_sample.slide, "--out", store]
    quiet, verbose = _stmap(*argv), _stmap(*argv, "-v")  # -v after the subcommand
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "torchvision" not in quiet.stderr
    assert "torchvision's C++ extension does not match torch" in verbose.stderr


def test_verbose_before_the_subcommand_still_works(store):
    proc = _stmap("-v", "info", store)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- evaluate
def _run_in_terminal(argv: list, timeout: float = 180) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (40 × 120), as tqdm sees a user's terminal."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [*STMAP, *map(str, argv)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_evaluate_shows_progress_bar(small_sample, tiny_model, tmp_path, tta):
    argv = [
        "evaluate", "--model", tiny_model, "--slide", small_sample.slide,
        "--spots", small_sample.outs, "--bin-um", "16", "--json", tmp_path / "ev.json",
    ]  # fmt: skip
    code, out, err = _run_in_terminal(argv + (["--tta"] if tta else []))
    assert code == 0, err
    bars = [s for s in re.split(r"[\r\n]+", err) if s.startswith("evaluate")]
    assert bars, err
    assert ("TTA" in bars[-1]) == tta
    done = re.search(r"\| (\d+)/(\d+) \[", bars[-1])
    assert done and done.group(1) == done.group(2) and int(done.group(2)) > 0, bars[-1]
    assert "torchvision" not in err
    assert "PCC@M" in out


# ----------------------------------------------------------------------------------- info
def test_info_describes_prediction_store(store, small_sample):
    from napari_stmap.core.store import open_store

    proc = _stmap("info", store, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    counts = open_store(store).counts()
    assert info["kind"] == "prediction store"
    assert info["tiles"]["done"] == counts["done"] > 0
    assert info["tiles"]["off_tissue"] == counts["skipped"]
    assert info["tiles"]["todo"] == counts["todo"]
    assert info["shape_yx"] == [H, W] and info["mpp"] == pytest.approx(small_sample.mpp)
    assert info["genes"] == list(small_sample.genes[:5]) and info["stride"] >= 1
    assert info["slide"].endswith(small_sample.slide.name) and info["model"].endswith(
        ".safetensors"
    )
    text = _stmap("info", store)
    assert text.returncode == 0 and "prediction store" in text.stdout
    assert re.search(r"tiles +\d+ done, \d+ off tissue, \d+ to do", text.stdout), text.stdout


@pytest.mark.parametrize(
    ("arch", "scales"),
    [("pixnet_tiny", [8.0, 16.0]), ("spotnet_tiny", [16.0]), ("magnet_tiny", [8.0, 16.0])],
)
def test_evaluate_progress_counts_spots(small_sample, arch, scales):
    """Core side of the bar: ``progress(done, total)`` in spots, total first, rising to it."""
    import torch

    from napari_stmap.core.evaluate import evaluate_model
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    model = create_model(arch, genes=list(small_sample.genes[:4])).eval()
    calls = []
    evaluate_model(
        model,
        small_sample.slide,
        small_sample.outs,
        scales,
        progress=lambda done, total: calls.append((done, total)),
    )
    totals = {t for _, t in calls}
    assert len(totals) == 1 and calls[0][0] == 0, calls[:3]
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == totals.pop() > 0, calls
