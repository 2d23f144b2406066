"""Bin models (MagNet) at bin centres: the prediction object, its raster, sums and merges.

(The lattice and ``predict_bin_region`` on the synthetic slide are also checked in
tests/test_widgets_magnet.py, next to the viewer that shows them.)
"""

from __future__ import annotations

import numpy as np
import pytest

GENES = ["a", "b"]


def _prediction(centres, counts, bin_px=10.0):
    from napari_stmap.core.predict import BinPrediction

    return BinPrediction(
        np.asarray(centres, float), np.asarray(counts, float), [*GENES, "total"], bin_px, 0.5
    )


def test_raster_places_bins_and_leaves_gaps_nan():
    from napari_stmap.core.predict import bin_raster

    centres = [[5.0, 5.0], [5.0, 25.0], [15.0, 15.0]]
    raster, grid = bin_raster(np.array(centres), np.array([1.0, 2.0, 3.0]), 10.0)
    want = np.array([[1.0, np.nan, 2.0], [np.nan, 3.0, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(raster, want)
    assert grid.origin_yx == (0.0, 0.0) and grid.pixel_px == 10.0 and grid.shape_hw == (2, 3)
    multi, _ = bin_raster(np.array(centres), np.ones((3, 4)), 10.0)
    assert multi.shape == (4, 2, 3)


def test_region_sums_add_fractions_of_bins():
    from napari_stmap.core.geometry import Rectangle

    counts = np.arange(12.0).reshape(4, 3) + 1
    pred = _prediction([[5, 5], [5, 15], [15, 5], [15, 15]], counts)
    sums = pred.region_sums(
        [Rectangle(0.0, 0.0, 20.0, 20.0), Rectangle(0.0, 0.0, 10.0, 5.0), Rectangle(0, 0, 10, 20)]
    )
    np.testing.assert_allclose(sums[0], counts.sum(axis=0))
    np.testing.assert_allclose(sums[1], counts[0] / 2)  # half of the first bin
    np.testing.assert_allclose(sums[2], counts[:2].sum(axis=0))
    gap = _prediction([[5, 5], [15, 15]], counts[[0, 3]])  # (0, 1) and (1, 0) not predicted
    assert np.isnan(gap.region_sums([Rectangle(0.0, 0.0, 20.0, 20.0)])).all()


def test_merged_keeps_the_newer_bin_and_refuses_other_lattices():
    old = _prediction([[5, 5], [5, 15]], [[1, 1, 2], [1, 1, 2]])
    new = _prediction([[5, 15], [15, 15]], [[7, 7, 14], [8, 8, 16]])
    both = old.merged(new)
    assert both.n == 3
    by_centre = {tuple(c): v[0] for c, v in zip(both.centers_yx, both.counts, strict=True)}
    assert by_centre == {(5.0, 15.0): 7.0, (15.0, 15.0): 8.0, (5.0, 5.0): 1.0}
    other = _prediction([[10, 10]], [[3, 3, 6]], bin_px=20.0)
    assert old.merged(other) is other  # another lattice: the newer prediction only


def test_values_normalise_after_summing_and_refuse_unknown_genes():
    from napari_stmap.core.errors import StmapInputError

    pred = _prediction([[5, 5]], [[1.0, 3.0, 1e4]])
    np.testing.assert_allclose(pred.values("a"), np.log1p([1.0]))
    np.testing.assert_allclose(pred.values("b", "absolute"), [3.0])
    assert pred.genes == GENES and pred.bin_um == 5.0
    with pytest.raises(StmapInputError, match="not one of the model's outputs"):
        pred.values("zzz")
    with pytest.raises(StmapInputError, match="mode"):
        pred.values("a", "log")


def test_predict_bin_centres_refuses_dense_models_and_honours_cancel(small_sample):
    torch = pytest.importorskip("torch")
    from napari_stmap.core.errors import StmapInputError
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import PredictionCancelled, predict_bin_centres

    slide = open_slide(small_sample.slide)
    dense = create_model("pixnet_tiny", genes=GENES)
    with pytest.raises(StmapInputError, match="not a bin model"):
        predict_bin_centres(dense, slide, np.array([[50.0, 50.0]]))
    torch.manual_seed(0)
    magnet = create_model("magnet_tiny", genes=GENES).eval()
    centres = np.array([[48.0, 48.0], [48.0, 80.0], [80.0, 48.0]])
    pred = predict_bin_centres(magnet, slide, centres, bin_um=16.0, areas_um2=np.full(3, 256.0))
    assert pred.n == 3 and pred.bin_px == 32.0 and pred.output_names == [*GENES, "total"]
    assert np.all(np.isfinite(pred.counts)) and np.all(pred.counts >= 0)
    with pytest.raises(PredictionCancelled):
        predict_bin_centres(magnet, slide, centres, cancelled=lambda: True)
