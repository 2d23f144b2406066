"""``stmap cells`` run as a process on the small sample: --segment, --labels, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

STMAP = [sys.executable, "-m", "napari_stmap.cli"]


def _stmap(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_sample, tiny_model):
    from napari_stmap.core.predict import predict_slide

    out = tmp_path_factory.mktemp("cli_cells") / "pred.zarr"
    predict_slide(small_sample.slide, tiny_model, out, batch_size=4)
    return out


@pytest.fixture(scope="module")
def segmented(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "cells.h5ad"
    proc = _stmap("cells", "--pred", store, "--segment", "--expand-um", "3", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "cells ×" in proc.stdout and "cells.labels.zarr" in proc.stdout
    return out


def test_segment_writes_cells_and_outlines(segmented):
    a = ad.read_h5ad(segmented)
    assert a.n_obs > 300 and a.n_vars == 5
    assert a.uns["stmap"]["source"] == "segment" and a.uns["stmap"]["expand_um"] == 3.0
    assert np.isfinite(a.X).all() and (a.obs["total_counts"] > 0).all()
    # expanded by 3 µm: larger than the nuclei (tumour nuclei are ~50-100 µm²)
    assert 40 < np.median(a.obs["area_um2"]) < 400
    doc = json.loads(segmented.with_suffix(".geojson").read_text())
    ids = [f["properties"]["cell_id"] for f in doc["features"]]
    assert ids == a.obs["cell_id"].tolist()


def test_labels_at_half_resolution_match_segment(store, segmented, tmp_path):
    """The kept segmentation, saved as a 1/2 TIFF, gives the same cells through --labels."""
    import tifffile
    import zarr

    nuclei = np.asarray(zarr.open_array(str(segmented.with_suffix(".labels.zarr")), mode="r"))
    tifffile.imwrite(tmp_path / "half.tif", nuclei[1::2, 1::2])
    out = tmp_path / "from_labels.h5ad"
    proc = _stmap("cells", "--pred", store, "--labels", tmp_path / "half.tif", "--out", out)
    assert proc.returncode == 0, proc.stderr
    a = ad.read_h5ad(out)
    assert a.uns["stmap"]["source"] == "labels"
    full = tmp_path / "full.h5ad"
    tifffile.imwrite(tmp_path / "full.tif", nuclei)
    assert (
        _stmap(
            "cells", "--pred", store, "--labels", tmp_path / "full.tif", "--out", full
        ).returncode
        == 0
    )
    b = ad.read_h5ad(full)
    common = np.intersect1d(a.obs_names, b.obs_names)
    assert len(common) > 0.9 * b.n_obs
    ratio = a[common].obs["total_counts"].sum() / b[common].obs["total_counts"].sum()
    assert abs(ratio - 1) < 0.05


def test_refusals(store, segmented, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "wrong.tif", np.ones((333, 401), np.uint16))
    line = _one_error_line(
        _stmap(
            "cells",
            "--pred",
            store,
            "--labels",
            tmp_path / "wrong.tif",
            "--out",
            tmp_path / "a.h5ad",
        )
    )
    assert "333 × 401" in line and "600 × 800" in line and "(1/2)" in line
    (tmp_path / "notes.geojson").write_text("hello")
    line = _one_error_line(
        _stmap(
            "cells",
            "--pred",
            store,
            "--geojson",
            tmp_path / "notes.geojson",
            "--out",
            tmp_path / "b.h5ad",
        )
    )
    assert "notes.geojson" in line and "GeoJSON" in line
    tifffile.imwrite(tmp_path / "zeros.tif", np.zeros((600, 800), np.uint16))
    line = _one_error_line(
        _stmap(
            "cells",
            "--pred",
            store,
            "--labels",
            tmp_path / "zeros.tif",
            "--out",
            tmp_path / "c.h5ad",
        )
    )
    assert "no cells found" in line
    assert not (tmp_path / "c.h5ad").exists() and not (tmp_path / "c.geojson").exists()
    before = segmented.stat().st_mtime_ns
    line = _one_error_line(_stmap("cells", "--pred", store, "--segment", "--out", segmented))
    assert "already exists" in line and "--overwrite" in line
    assert segmented.stat().st_mtime_ns == before
