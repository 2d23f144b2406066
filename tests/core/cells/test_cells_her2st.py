"""Cells on a real H&E section (HER2ST C2, 0.687 µm/px): a crop, segmented and measured."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def c2(shared_data):
    from napari_stmap.core.io.slide import open_slide

    path = shared_data / "her2st" / "C2" / "he.ome.tif"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return open_slide(path)


def test_c2_crop_nuclei_and_cells(c2, tmp_path, make_model_file):
    from napari_stmap.core.cells import collect, expand_cells, iter_cells, segment_nuclei
    from napari_stmap.core.geometry import Rectangle, Region
    from napari_stmap.core.predict import StoreSource, predict_slide
    from napari_stmap.core.tiling import tissue_mask

    tissue = tissue_mask(c2)
    rows, cols = np.nonzero(tissue.mask)
    cy, cx = (np.median(rows) + 0.5) * tissue.px_yx[0], (np.median(cols) + 0.5) * tissue.px_yx[1]
    box = (int(cy) - 400, int(cx) - 400, int(cy) + 400, int(cx) + 400)  # 550 µm square on tissue
    nuclei = segment_nuclei(c2, bbox_yx=box, tissue=tissue)
    lab = np.asarray(nuclei.array)
    n = len(np.unique(lab)) - 1
    mpp = c2.mpp
    density = n / ((box[2] - box[0]) * (box[3] - box[1]) * mpp**2 / 1e6)  # per mm²
    assert 500 < density < 20000, density
    areas = np.bincount(lab.ravel())[1:] * mpp**2
    assert 10 <= np.median(areas[areas > 0]) <= 120
    store = predict_slide(c2, make_model_file(5), tmp_path / "c2.zarr", region=box, batch_size=1)
    source = StoreSource(store, background=0.0)
    cells = collect(iter_cells(expand_cells(nuclei, 4.0, mpp), source), source.output_names)
    assert cells.n == n and np.isfinite(cells.counts).all()
    # cells lie inside the box, so they sum to at most the box's value
    inside = source.region_sums([Region("box", [(Rectangle(*box), 1.0)])])[0]
    assert (cells.counts.sum(0) <= inside * (1 + 1e-6)).all()
