"""What the docks show, computed without Qt: core.display, region tables, store names."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_stmap.core.display import (
    RefreshPacer,
    colorbar_label,
    gene_layer_name,
    grid_placement,
    inputs_summary,
    is_bins_layer,
    is_gene_layer,
    match_gene,
    model_kind_warning,
    opened_spots_source,
    percentile_limits,
    stmap_kind,
    view_box_px,
)
from napari_stmap.core.geometry import MapGrid, Rectangle, Region


def _layer(**meta):
    return SimpleNamespace(metadata={"stmap": meta} if meta else {})


def test_layer_metadata_helpers():
    gene, raster = _layer(kind="gene", gene="A"), _layer(kind="gene", bins=True)
    assert gene_layer_name("ERBB2") == "stmap: ERBB2"
    assert is_gene_layer(gene) and not is_bins_layer(gene) and is_bins_layer(raster)
    assert stmap_kind(_layer()) is None and stmap_kind(object()) is None
    assert stmap_kind(_layer(kind="regions")) == "regions"


def test_placement_puts_pixel_centres_in_um():
    grid = MapGrid((10.0, 20.0), 4.0, (3, 5))
    place = grid_placement(grid, 0.5)
    assert place == {"scale": (2.0, 2.0), "translate": (6.0, 11.0)}


def test_view_box_is_clipped_to_the_slide():
    # a 100 × 60 µm view centred at (50, 30) µm on a 0.5 µm/px slide of 80 × 200 px
    assert view_box_px((50.0, 30.0), (100.0, 60.0), 0.5, (80, 200)) == (0.0, 0.0, 80.0, 120.0)
    assert view_box_px((20.0, 30.0), (20.0, 20.0), 0.5, (80, 200)) == (20.0, 40.0, 60.0, 80.0)
    assert view_box_px((50.0, 30.0), (20.0, 20.0), 0.5, (80, 200)) is None  # below the slide
    assert view_box_px((-500.0, 0.0), (10.0, 10.0), 1.0, (80, 200)) is None


def test_percentile_limits():
    assert percentile_limits(np.full((2, 2), np.nan)) is None
    lo, hi = percentile_limits(np.array([[np.nan, 1.0], [1.0, 1.0]]))
    assert lo == 1.0 and hi > lo
    data = np.arange(1001, dtype=float)
    assert percentile_limits(data) == pytest.approx((10.0, 995.0))


def test_colorbar_label_and_gene_matching():
    assert colorbar_label("A", "normalised", 2.0) == "A: log1p(10⁴ · A / total) per pixel"
    assert colorbar_label("A", "absolute", 2.0) == "A: expected counts per 2×2 µm pixel"
    assert match_gene("erbb2", ["ERBB2", "GATA3"]) == ("ERBB2", None)
    match, problem = match_gene("ERB", ["ERBB2", "GATA3"])
    assert match is None and "did you mean ERBB2" in problem
    assert "open a model" in match_gene("A", [])[1]


def test_refresh_pacer_coalesces():
    pacer = RefreshPacer(0.2)
    assert not pacer.due("a", 0.0, lambda: 0)  # nothing new
    pacer.mark("a", 0.0)
    pacer.mark("a", 0.1)  # still stale since 0.0
    assert not pacer.due("a", 0.1, lambda: 3)  # the worker still computes its blocks
    assert pacer.due("a", 0.1, lambda: 0)  # done: refresh now
    pacer.refreshed("a", 0.1)
    pacer.mark("a", 0.15)
    assert not pacer.due("a", 0.2, lambda: 0)  # too soon after the last refresh
    assert pacer.due("a", 0.4, lambda: 5)  # waited long enough for the worker
    pacer.mark("b", 1.0)
    pacer.forget("b")
    assert "b" not in pacer.stale


def test_inputs_summary_and_warnings(tmp_path):
    slide = SimpleNamespace(path=tmp_path / "s.ome.tif", shape_yx=(300, 400), mpp=0.5)
    slide.mpp_source = "fallback"
    spots = SimpleNamespace(
        library_id="lib", n_spots=1234, footprint="square", bin_um=8.0, n_genes=2, genes=["A", "B"]
    )
    meta = {"arch": "pixnet", "genes": ["A", "C"], "mpp": 1.0, "stride": 4}
    lines = inputs_summary(slide, spots, tmp_path / "m.safetensors", meta)
    assert "400×300 px" in lines[0] and "(unknown!)" in lines[0]
    assert "1,234 square 8 µm bins" in lines[1]
    assert "m.safetensors: pixnet, 2 genes" in lines[2] and "1 of 2" in lines[3]
    assert "none" in inputs_summary(None, None, None, {})[0]
    assert model_kind_warning({"arch": "spotnet", "input_kind": "spots"}, "m") is not None
    assert model_kind_warning({"arch": "magnet", "input_kind": "bins"}, "m") is None
    hd = {"kind": "spots", "source": "/r/outs"}  # the reader records the folder opened
    assert opened_spots_source(hd) == Path("/r/outs")
    assert opened_spots_source({"kind": "spots", "source": "/r/a.h5ad"}) == Path("/r/a.h5ad")
    assert opened_spots_source({"kind": "slide", "source": "x"}) is None


# ----------------------------------------------------------------------- region tables
def test_region_tables_and_spot_regions():
    from napari_stmap.core.regions import (
        build_export,
        compute_regions,
        make_names_unique,
        spot_regions,
    )

    class Bins:  # each part's value is its area (one gene + a total of twice that)
        genes = ["G"]

        def region_sums(self, fps):
            area = np.array([fp.area_px() for fp in fps])
            return np.stack([area, 2 * area], axis=1)

    spots = spot_regions(np.array([[5.0, 5.0], [5.0, 15.0]]), 4.0, "square")
    ring = Region("spot 1", [(Rectangle(0, 0, 10, 10), 1.0), (Rectangle(2, 2, 4, 4), -1.0)])
    regions = make_names_unique([ring, *spots])
    assert [r.name for r in regions] == ["spot 1", "spot 1 (2)", "spot 2"]
    table = compute_regions(Bins(), regions, 0.5)
    np.testing.assert_allclose(table.counts[:, 0], [96.0, 16.0, 16.0])
    np.testing.assert_allclose(table.area_um2, [24.0, 4.0, 4.0])
    np.testing.assert_allclose(table.normalised()[:, 0], np.log1p([5e3] * 3))
    adata = build_export(table, 0.5, "slide.tif")
    assert adata.n_obs == 3 and list(adata.var_names) == ["G"]


# ------------------------------------------------------------------------- store names
def test_store_path_for(tmp_path):
    from napari_stmap.core.store import store_path_for

    slide, model = tmp_path / "slide.ome.tif", tmp_path / "m.safetensors"
    slide.write_bytes(b"x")
    model.write_bytes(b"weights")
    path = store_path_for(slide, model, tmp_path / "stores")
    assert path.parent == tmp_path / "stores" and path.suffix == ".zarr"
    assert path.name.startswith("slide-") and not path.parent.exists()
    assert store_path_for(str(slide), str(model), tmp_path / "stores") == path
    model.write_bytes(b"retrained")
    assert store_path_for(slide, model, tmp_path / "stores") != path
