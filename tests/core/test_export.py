"""AnnData / CSV export: conventions, the additive values, atomic no-overwrite writes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.export import build_anndata, write_anndata, write_csv, write_regions


@pytest.fixture
def adata():
    rng = np.random.default_rng(0)
    counts = rng.gamma(2.0, 3.0, (5, 3))
    total = counts.sum(1) * 4
    centers = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 5.0], [7.0, 8.0], [9.0, 1.0]])
    thumb = np.full((40, 60, 3), 230, np.uint8)
    return build_anndata(
        counts,
        total,
        ["A", "B", "C"],
        centers,
        mpp=0.5,
        area_um2=np.full(5, 64.0),
        footprint="square",
        library_id="lib",
        image=thumb,
        image_scale=0.1,
        uns_meta={"model": "m.safetensors"},
    )


def test_conventions(adata):
    np.testing.assert_allclose(adata.obsm["spatial"], [[20, 10], [40, 30], [5, 50], [8, 7], [1, 9]])
    sf = adata.uns["spatial"]["lib"]["scalefactors"]
    assert sf["microns_per_pixel"] == 0.5 and sf["tissue_hires_scalef"] == 0.1
    assert sf["spot_diameter_fullres"] == pytest.approx(np.sqrt(4 * 64 / 0.25 / np.pi))
    assert adata.uns["spatial"]["lib"]["images"]["hires"].shape == (40, 60, 3)
    expected = np.log1p(1e4 * adata.X / adata.obs["total_counts"].to_numpy()[:, None])
    np.testing.assert_allclose(adata.layers["lognorm"], expected, rtol=1e-5)


def test_roundtrip_and_refuse_overwrite(adata, tmp_path):
    path = write_anndata(adata, tmp_path / "out.h5ad")
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(back.X, adata.X)
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
    assert list(back.var_names) == ["A", "B", "C"]
    before = path.read_bytes()
    with pytest.raises(StmapInputError, match="--overwrite"):
        write_anndata(adata, path)
    assert path.read_bytes() == before  # untouched
    write_anndata(adata, path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_csv(adata, tmp_path):
    path = write_regions(adata, tmp_path / "out.csv")
    table = pd.read_csv(path, index_col="region")
    np.testing.assert_allclose(table[["A", "B", "C"]].to_numpy(), adata.X, rtol=1e-5)
    np.testing.assert_allclose(table["total_counts"], adata.obs["total_counts"])
    with pytest.raises(StmapInputError, match="already exists"):
        write_csv(adata, path)


def test_bad_target(adata, tmp_path):
    with pytest.raises(StmapInputError, match="unsupported"):
        write_anndata(adata, tmp_path / "out.txt")
    with pytest.raises(StmapInputError, match="does not exist"):
        write_anndata(adata, tmp_path / "missing" / "out.h5ad")
