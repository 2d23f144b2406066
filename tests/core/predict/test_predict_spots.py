"""Predictions at spots: footprints of spots, dense sums over the tiled map, spot crops, areas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

GENES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def pixnet():
    from napari_stmap.core.model import create_model

    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES, mpp=0.5).eval()


def test_spot_footprints_from_spots_and_footprints():
    from napari_stmap.core.errors import StmapInputError
    from napari_stmap.core.geometry import Disk, Square
    from napari_stmap.core.predict import spot_footprints

    centres = np.array([[10.0, 20.0], [30.0, 40.0]])
    disks = spot_footprints(SimpleNamespace(centers_yx=centres, footprint="disk", size_px=8.0))
    assert [type(f) for f in disks] == [Disk, Disk]
    assert disks[1].center_yx == (30.0, 40.0) and disks[1].diameter_px == 8.0
    squares = spot_footprints(SimpleNamespace(centers_yx=centres, footprint="square", size_px=4))
    assert squares[0].bbox_yx() == pytest.approx((8.0, 18.0, 12.0, 22.0))
    one = Square((5.0, 5.0), 2.0)
    assert spot_footprints(one) == [one] and spot_footprints([one, one]) == [one, one]
    for bad in ("hexagon", None):
        with pytest.raises(StmapInputError, match="footprint"):
            spot_footprints(SimpleNamespace(centers_yx=centres, footprint=bad, size_px=4.0))
    with pytest.raises(StmapInputError, match="size"):
        spot_footprints(SimpleNamespace(centers_yx=centres, footprint="disk", size_px=math.nan))


def test_dense_spots_are_sums_of_the_map_whatever_the_chunks(pixnet, slide):
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.geometry import disks
    from napari_stmap.core.predict import predict_map, predict_spots

    centres = np.array([[60.0, 70.0], [130.0, 200.0], [250.0, 90.0], [300.0, 330.0]])
    fps = disks(centres, 40.0)
    calls = []
    one = predict_spots(pixnet, slide, fps, tile_px=64, progress=lambda d, t: calls.append((d, t)))
    many = predict_spots(pixnet, slide, fps, tile_px=32, chunk_px=64)  # a chunk per spot
    boxes = np.array([f.bbox_yx() for f in fps])
    dense, grid = predict_map(pixnet, slide, (*boxes[:, :2].min(0), *boxes[:, 2:].max(0)))
    want = aggregate(dense, grid, fps)
    assert one.shape == (4, len(GENES) + 1) and one.dtype == np.float64 and np.all(one > 0)
    np.testing.assert_allclose(one, want, rtol=1e-4)
    np.testing.assert_allclose(many, want, rtol=1e-4)
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (4, 4)
    assert predict_spots(pixnet, slide, []).shape == (0, len(GENES) + 1)


def test_predict_map_is_the_engine_path(pixnet, slide, tmp_path):
    """predict_map stitches the same tiles, read and embedded as the Predictor does."""
    from napari_stmap.core.predict import Predictor, ensure_region, predict_map, region_spec

    bbox = (37.0, 51.0, 261.0, 299.0)
    spec = region_spec(pixnet, slide, bbox, tile_px=64)
    assert spec.origin_model_yx == (32, 48) and spec.size_model_hw == (240, 256)
    got, grid = predict_map(pixnet, slide, bbox, tile_px=64)
    assert grid == spec.grid and got.shape == (len(GENES) + 1, *spec.out_shape_hw)
    with Predictor(
        slide, pixnet, tmp_path / "p.zarr", tile_px=128, dtype="float32", tissue=False
    ) as p:
        want, wgrid = ensure_region(p, bbox)
    rs, cs = grid.crop_slices(wgrid.bbox_yx)
    np.testing.assert_allclose(got[:, rs, cs], want, rtol=1e-4, atol=1e-5)


def test_progress_errors_reach_the_caller(pixnet, slide):
    from napari_stmap.core.predict import predict_map

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        predict_map(pixnet, slide, (0.0, 0.0, 200.0, 200.0), tile_px=32, progress=stop)


def test_spot_models_scale_by_area(slide):
    from napari_stmap.core.geometry import Square
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import predict_spots, spot_area_ratio

    model = create_model("spotnet_tiny", genes=GENES).eval()
    np.testing.assert_array_equal(spot_area_ratio(model, np.array([64.0, 256.0])), [1.0, 1.0])
    model.metadata = {"training": {"spot_area_um2": 64.0}}
    np.testing.assert_allclose(spot_area_ratio(model, np.array([64.0, 256.0])), [1.0, 4.0])
    fps = [Square((150.0, 150.0), 16.0), Square((150.0, 150.0), 32.0)]  # 8 µm and 16 µm
    out = predict_spots(model, slide, fps, batch_size=1)
    np.testing.assert_allclose(out[1], 4 * out[0], rtol=1e-6)
    tta = predict_spots(model, slide, fps, tta=True)
    assert not np.allclose(tta, out)


def test_bin_models_predict_at_footprint_centres(small_sample, slide):
    from napari_stmap.core.geometry import Square
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import predict_footprints, predict_spots

    torch.manual_seed(0)
    model = create_model("magnet_tiny", genes=GENES).eval()
    model.metadata = {"training": {"spot_area_um2": 256.0}}
    fps = [Square((100.0 + 32 * k, 140.0), 32.0) for k in range(4)]
    np.testing.assert_allclose(
        predict_spots(model, slide, fps), predict_footprints(model, slide, fps), rtol=1e-6
    )
