"""core.contrast: BH and Wilcoxon against hand-checked numbers and scipy, unit assignment,
and the known-truth ranking on the synthetic sample (its truth written as a prediction store)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from napari_stmap.core.contrast import (
    PSEUDOCOUNT_CP10K,
    bh_adjust,
    check_cells_match,
    contrast_cells,
    contrast_counts,
    contrast_grid,
    find_region,
    read_cells,
    region_fractions,
    split_units,
    wilcoxon,
)
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import Rectangle, Region
from napari_stmap.core.metrics import normalize_expression

TUMOUR = ["ERBB2", "GRB7", "STARD3"]  # the sample's first 15 genes hold 3 markers per type
STROMA = ["COL1A1", "COL1A2", "DCN"]  # fibroblast markers


# ---------------------------------------------------------------------------------- stats
def test_bh_hand_checked_example():
    # sorted p: .005 .01 .03 .04 .5 -> p·m/rank: .025 .025 .05 .05 .5 -> running min from the top
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, np.nan])
    q = bh_adjust(p)
    np.testing.assert_allclose(q[:5], [0.025, 0.05, 0.05, 0.025, 0.5])
    assert np.isnan(q[5])
    # step-up: a larger p can lower the q of smaller ones (0.02·3/2 = 0.03 > 0.021·3/3)
    np.testing.assert_allclose(bh_adjust([0.001, 0.02, 0.021]), [0.003, 0.021, 0.021])
    np.testing.assert_allclose(bh_adjust([0.9, 0.95]), [0.95, 0.95])  # capped by the largest


def test_bh_matches_scipy():
    p = np.random.default_rng(1).uniform(size=200) ** 3
    np.testing.assert_allclose(bh_adjust(p), st.false_discovery_control(p, method="bh"))


def test_wilcoxon_matches_scipy_gene_by_gene():
    rng = np.random.default_rng(0)
    a = rng.poisson(3.0, (25, 6)).astype(float)  # many ties
    b = rng.poisson(4.0, (40, 6)).astype(float)
    a[:, 5] = b[0, 5] = 2.0  # a gene with huge ties
    u, z, p = wilcoxon(a, b)
    for g in range(6):
        ref = st.mannwhitneyu(a[:, g], b[:, g], alternative="two-sided", method="asymptotic")
        assert u[g] == ref.statistic
        assert p[g] == pytest.approx(ref.pvalue, rel=1e-12)
        assert 2 * st.norm.sf(abs(z[g])) == pytest.approx(ref.pvalue, rel=1e-9)  # the same z
        assert np.sign(z[g]) == np.sign(u[g] - 25 * 40 / 2)


def test_wilcoxon_direction_and_constant_gene():
    a = np.array([[5.0, 1.0], [6.0, 1.0], [7.0, 1.0]])
    b = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]])
    u, z, _p = wilcoxon(a, b)
    assert u[0] == 12 and z[0] > 0  # every A above every B
    assert np.isnan(z[1])  # all values equal: no ranking


def test_contrast_counts_columns():
    rng = np.random.default_rng(2)
    genes = ["g0", "g1", "g2"]
    ca = rng.uniform(1, 50, (10, 4))
    cb = rng.uniform(1, 50, (12, 4))
    ca[:, 0] *= 4  # g0 up in A
    ca[:, 3] = cb[:, 3].mean() * 3 + ca[:, :3].sum(1)  # total >= genes
    cb[:, 3] = cb[:, 3] * 3 + cb[:, :3].sum(1)
    r = contrast_counts(ca, cb, genes, name_a="T", name_b="S")
    na, nb = normalize_expression(ca[:, :3], ca[:, 3]), normalize_expression(cb[:, :3], cb[:, 3])
    np.testing.assert_allclose(r.mean_a, na.mean(0))
    np.testing.assert_allclose(r.mean_b, nb.mean(0))
    cpa, cpb = ((1e4 * c[:, :3] / c[:, 3:]).mean(0) for c in (ca, cb))
    expected = np.log2((cpa + PSEUDOCOUNT_CP10K) / (cpb + PSEUDOCOUNT_CP10K))
    np.testing.assert_allclose(r.log2fc, expected)
    table = r.table()
    assert list(table.columns) == [
        "gene",
        "mean_a",
        "mean_b",
        "log2fc",
        "u",
        "z",
        "p",
        "q",
        "n_a",
        "n_b",
    ]
    assert table["gene"].iloc[0] == "g0" and (table["n_a"] == 10).all()
    assert np.all(np.diff(table["z"].to_numpy()) <= 0)  # ranked by z


def test_contrast_counts_refuses_too_few_units():
    c = np.ones((2, 3))
    with pytest.raises(StmapInputError, match=r"'A' holds 2 .* at least 3: use smaller units"):
        contrast_counts(c, np.ones((5, 3)), ["x", "y"], unit="55 µm squares")


# ------------------------------------------------------------------------------ regions
def test_region_fractions_and_holes():
    region = Region("r", [(Rectangle(0, 0, 100, 100), 1.0), (Rectangle(40, 40, 60, 60), -1.0)])
    centers = np.array([[50.0, 10.0], [50.0, 100.0], [50.0, 50.0], [200.0, 200.0], [0.0, 0.0]])
    frac = region_fractions(centers, 20.0, "square", region)
    # inside; straddling the edge by half; in the hole; outside; a quarter in the corner
    np.testing.assert_allclose(frac, [1.0, 0.5, 0.0, 0.0, 0.25])


def test_split_units_majority_rest_shared_tissue():
    fa = np.array([1.0, 0.5, 0.4, 0.0, 0.0, 0.9, 1.0])
    fb = np.array([0.0, 0.0, 0.6, 1.0, 0.0, 0.9, 0.0])
    tissue = np.array([True, True, True, True, True, True, False])
    s = split_units(fa, fb, tissue)
    assert s.in_a.tolist() == [0, 1] and s.in_b.tolist() == [2, 3]
    assert s.shared == 1 and s.off_tissue == 1  # unit 5 in both, unit 6 off tissue
    rest = split_units(fa, None, tissue)
    assert rest.in_a.tolist() == [0, 1, 5] and rest.in_b.tolist() == [2, 3, 4]


def test_find_region_by_name_case_and_index():
    regions = [Region(n, [(Rectangle(0, 0, 1, 1), 1.0)]) for n in ("Tumor", "Stroma 1")]
    assert find_region(regions, "Stroma 1").name == "Stroma 1"
    assert find_region(regions, "tumor").name == "Tumor"
    assert find_region(regions, "1").name == "Stroma 1"
    with pytest.raises(
        StmapInputError, match=r"no region 'Immune' in f\.geojson; .*'Tumor', 'Stroma 1'"
    ):
        find_region(regions, "Immune", source="f.geojson")


# --------------------------------------------------------------------------- known truth
@pytest.fixture(scope="module")
def truth(tmp_path_factory, small_sample, make_model_file, slide):
    """The sample's truth as a store of a 15-gene model, the tissue mask and truth regions."""
    from napari_stmap.core.predict import StoreSource
    from napari_stmap.core.tiling import tissue_mask
    from truth_store import truth_regions, write_truth_store

    path = write_truth_store(
        small_sample, make_model_file(15), tmp_path_factory.mktemp("truth") / "truth.zarr"
    )
    return {
        "source": StoreSource(path, background=0.0),
        "tissue": tissue_mask(slide),
        "tumour": truth_regions(small_sample, "tumour", 0.5),
        "stroma": truth_regions(small_sample, "fibroblast", 0.2),
    }


def _ranked(result) -> list[str]:
    return result.table()["gene"].tolist()


@pytest.mark.parametrize(("size_um", "kind"), [(16.0, "square"), (20.0, "visium")])
def test_tumour_vs_stroma_ranks_markers(truth, slide, size_um, kind):
    r = contrast_grid(
        truth["source"],
        truth["tumour"],
        truth["stroma"],
        mpp=slide.mpp,
        size_um=size_um,
        kind=kind,
        tissue=truth["tissue"],
        shape_yx=slide.shape_yx,
    )
    ranked = _ranked(r)
    assert set(ranked[:3]) == set(TUMOUR), ranked
    assert set(ranked[-3:]) == set(STROMA), ranked
    assert r.n_a >= 10 and r.n_b >= 5 and r.name_b == "fibroblast"
    top = r.table().iloc[0]
    assert top["log2fc"] > 2 and top["q"] < 0.01


def test_tumour_vs_rest_and_units_on_tissue(truth, slide):
    r = contrast_grid(
        truth["source"],
        truth["tumour"],
        None,
        mpp=slide.mpp,
        size_um=16.0,
        tissue=truth["tissue"],
        shape_yx=slide.shape_yx,
    )
    assert set(_ranked(r)[:3]) == set(TUMOUR) and r.name_b == "rest"
    # rest = the tissue units outside A: every B unit's centre on the mask, none in A
    mask, (py, px) = truth["tissue"].mask, truth["tissue"].px_yx
    cb = r.notes["centers_b_yx"]
    on = mask[(cb[:, 0] // py).astype(int), (cb[:, 1] // px).astype(int)]
    assert on.mean() > 0.9
    fa = region_fractions(cb, 16.0 / slide.mpp, "square", truth["tumour"])
    assert (fa < 0.5).all()
    n_lattice = (slide.shape_yx[0] // 32) * (slide.shape_yx[1] // 32)
    assert r.n_a + r.n_b < 0.75 * n_lattice  # glass left out (the tissue is about half)


def test_too_large_units_refused(truth, slide):
    with pytest.raises(
        StmapInputError,
        match=r"region 'tumour' holds [0-2] 100 µm squares on tissue; .* at least 3",
    ):
        contrast_grid(
            truth["source"],
            truth["tumour"],
            truth["stroma"],
            mpp=slide.mpp,
            size_um=100.0,
            tissue=truth["tissue"],
            shape_yx=slide.shape_yx,
        )


def test_cells_tumour_vs_stroma(truth, slide, tmp_path):
    from truth_store import write_cells

    path = write_cells(tmp_path / "cells.h5ad", truth["source"], slide, truth["tissue"])
    cells = read_cells(path)
    check_cells_match(cells, slide.path, slide.shape_yx)
    r = contrast_cells(cells, truth["tumour"], truth["stroma"])
    ranked = _ranked(r)
    assert set(ranked[:3]) == set(TUMOUR) and set(ranked[-3:]) == set(STROMA), ranked
    assert r.unit == "cells" and r.n_a > 50
    rest = contrast_cells(cells, truth["tumour"], None)
    assert rest.n_a == r.n_a and rest.n_b > r.n_b


def test_cells_of_another_slide_refused(truth, slide, tmp_path):
    from truth_store import write_cells

    path = write_cells(
        tmp_path / "other.h5ad", truth["source"], slide, truth["tissue"], slide_name="/x/C3.tif"
    )
    with pytest.raises(StmapInputError, match=r"holds cells of /x/C3\.tif"):
        check_cells_match(read_cells(path), slide.path, slide.shape_yx)
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(StmapInputError, match=r"bad\.h5ad is not an AnnData"):
        read_cells(tmp_path / "bad.h5ad")
