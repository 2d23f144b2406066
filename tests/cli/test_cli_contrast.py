"""``stmap contrast`` run as a process: the known-truth ranking, cells, refusals, missing tiles,
and a smoke run on HER2ST C2 (skipped without ../shared)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

STMAP = [sys.executable, "-m", "napari_stmap.cli"]
TUMOUR = {"ERBB2", "GRB7", "STARD3"}
STROMA = {"COL1A1", "COL1A2", "DCN"}
COLUMNS = ["gene", "mean_a", "mean_b", "log2fc", "u", "z", "p", "q", "n_a", "n_b"]


def _stmap(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STMAP, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def truth(tmp_path_factory, small_sample, make_model_file):
    """The sample's truth as a store, and a GeoJSON of a tumour and a stroma region."""
    from napari_stmap.core.io.regions import write_geojson
    from truth_store import truth_regions, write_truth_store

    tmp = tmp_path_factory.mktemp("contrast")
    store = write_truth_store(small_sample, make_model_file(15), tmp / "truth.zarr")
    shapes = tmp / "regions.geojson"
    regions = [
        truth_regions(small_sample, "tumour", 0.5),
        truth_regions(small_sample, "fibroblast", 0.2),
    ]
    regions[1].name = "Stroma"
    write_geojson(shapes, regions)
    return {"store": store, "shapes": shapes}


def test_contrast_ranks_tumour_markers_first(truth, tmp_path):
    out = tmp_path / "t.csv"
    argv = ["contrast", "--pred", truth["store"], "--shapes", truth["shapes"]]
    proc = _stmap(
        *argv, "--a", "tumour", "--b", "stroma", "--unit-um", 16, "--top", 3, "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS and len(table) == 15
    assert set(table["gene"][:3]) == TUMOUR and set(table["gene"][-3:]) == STROMA
    assert (table["q"] >= table["p"]).all() and table["q"].max() <= 1
    text = proc.stdout
    assert "higher in tumour" in text and "higher in Stroma" in text
    printed = text.split("higher in Stroma")[0]
    assert all(g in printed for g in TUMOUR) and f"wrote {out}" in text
    # A against the rest of the tissue, regions by index
    rest = tmp_path / "rest.csv"
    proc = _stmap(*argv, "--a", 0, "--b", "rest", "--unit-um", 16, "--out", rest)
    assert proc.returncode == 0, proc.stderr
    t2 = pd.read_csv(rest)
    assert set(t2["gene"][:3]) == TUMOUR and t2["n_b"][0] > table["n_b"][0]


def test_contrast_visium_units_and_cells(truth, tmp_path, slide):
    from napari_stmap.core.predict import StoreSource
    from napari_stmap.core.tiling import tissue_mask
    from truth_store import write_cells

    argv = ["contrast", "--pred", truth["store"], "--shapes", truth["shapes"]]
    proc = _stmap(*argv, "--a", "tumour", "--b", "Stroma", "--units", "visium", "--unit-um", 20,
                  "--out", tmp_path / "v.csv")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "20 µm Visium-like spots" in proc.stdout
    cells = write_cells(
        tmp_path / "cells.h5ad", StoreSource(truth["store"]), slide, tissue_mask(slide)
    )
    out = tmp_path / "c.csv"
    proc = _stmap(*argv, "--a", "tumour", "--b", "Stroma", "--cells", cells, "--out", out)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert set(table["gene"][:3]) == TUMOUR and set(table["gene"][-3:]) == STROMA
    assert " cells" in proc.stdout


def test_contrast_refusals(truth, tmp_path):
    argv = ["contrast", "--pred", truth["store"], "--shapes", truth["shapes"]]
    out = tmp_path / "t.csv"
    proc = _stmap(*argv, "--a", "Tumor", "--b", "rest", "--out", out)
    assert proc.returncode == 2 and proc.stdout == ""
    assert _lines(proc.stderr) == [
        "stmap contrast: error: no region 'Tumor' in "
        f"{truth['shapes']}; the regions there are 'tumour', 'Stroma' (or pass an index 0..1)"
    ]
    proc = _stmap(*argv, "--a", "tumour", "--b", "Stroma", "--unit-um", 100, "--out", out)
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1
    assert "holds 2 100 µm squares on tissue" in proc.stderr
    assert "at least 3: use smaller units" in proc.stderr
    assert not out.exists()
    out.write_text("keep me")
    proc = _stmap(*argv, "--a", "tumour", "--b", "rest", "--unit-um", 16, "--out", out)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_text() == "keep me"
    proc = _stmap(*argv, "--a", "tumour", "--b", "rest", "--unit-um", 16, "--out", out,
                  "--overwrite")  # fmt: skip
    assert proc.returncode == 0 and out.read_text().startswith("gene,")
    proc = _stmap(*argv, "--a", "tumour", "--b", "0", "--out", tmp_path / "same.csv")
    assert proc.returncode == 2 and "the same region 'tumour'" in proc.stderr


def test_contrast_predicts_missing_tiles(small_sample, tiny_model, tmp_path, slide):
    """As stmap aggregate: tiles the units need and the store lacks are predicted first."""
    from napari_stmap.core.geometry import Rectangle, Region
    from napari_stmap.core.io.regions import write_geojson
    from napari_stmap.core.model import load_model
    from napari_stmap.core.store import open_store
    from napari_stmap.core.tiling import plan_tiles

    model = load_model(tiny_model)
    store = tmp_path / "empty.zarr"
    open_store(store, model, slide, plan_tiles(slide, model), "w", model_path=tiny_model)
    shapes = tmp_path / "boxes.geojson"
    write_geojson(
        shapes,
        [
            Region("left", [(Rectangle(150, 150, 450, 350), 1.0)]),
            Region("right", [(Rectangle(150, 450, 450, 650), 1.0)]),
        ],
    )
    out = tmp_path / "t.csv"
    proc = _stmap("contrast", "--pred", store, "--shapes", shapes, "--a", "left", "--b", "right",
                  "--unit-um", 16, "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert open_store(store).counts()["todo"] == 0
    table = pd.read_csv(out)
    assert len(table) == 5 and np.isfinite(table["log2fc"]).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_contrast_her2st_c2_smoke(shared_data, tiny_model, tmp_path):
    """HER2ST C2: two hand-drawn rectangles over the tissue, a random-init model (smoke)."""
    import anndata as ad

    from napari_stmap.core.geometry import Rectangle, Region
    from napari_stmap.core.io.regions import write_geojson

    section = shared_data / "her2st" / "C2"
    xy = ad.read_h5ad(section / "spots.h5ad").obsm["spatial"]
    cx, cy = np.median(xy, axis=0)
    s = 700.0  # level-0 px (~480 µm) squares left and right of the tissue's centre
    left = Rectangle(cy - s / 2, cx - 1.5 * s, cy + s / 2, cx - 0.5 * s)
    right = Rectangle(cy - s / 2, cx + 0.5 * s, cy + s / 2, cx + 1.5 * s)
    shapes = tmp_path / "c2.geojson"
    write_geojson(shapes, [Region("left", [(left, 1.0)]), Region("right", [(right, 1.0)])])
    store = tmp_path / "c2.zarr"
    box = (cy - s / 2, cx - 1.5 * s, cy + s / 2, cx + 1.5 * s)
    proc = _stmap("predict", "--model", tiny_model, "--slide", section / "he.ome.tif",
                  "--out", store, "--region", *box, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "c2.csv"
    proc = _stmap("contrast", "--pred", store, "--shapes", shapes, "--a", "left", "--b", "right",
                  "--unit-um", 55, "--out", out, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS and len(table) == 5
    assert (table["n_a"] >= 20).all() and np.isfinite(table["p"]).all()
