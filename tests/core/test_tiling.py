"""Tile plans (cores, halos, alignment, output grid) and the tissue mask."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import dask.array as da
import numpy as np
import pytest

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.io.slide import Slide, open_slide
from napari_stmap.core.tiling import (
    TileSpec,
    TissueMask,
    default_tile_px,
    plan_tiles,
    tissue_mask,
    tissue_tiles,
)

#: Stand-in for a dense model: what plan_tiles reads.
MODEL = SimpleNamespace(mpp=0.5, stride=4, halo_px=40, align_px=16, input_kind="dense")


def _slide(shape_yx=(1000, 1300), mpp=0.25, n_levels=2) -> Slide:
    levels = [da.zeros((*shape_yx, 3), dtype=np.uint8, chunks=(256, 256, 3))]
    for _ in range(n_levels - 1):
        h, w = levels[-1].shape[:2]
        levels.append(da.zeros((h // 2, w // 2, 3), dtype=np.uint8, chunks=(256, 256, 3)))
    return Slide(path=Path("fake.tif"), levels=tuple(levels), mpp=mpp, mpp_source="user")


def _cover_counts(spec: TileSpec) -> tuple[np.ndarray, np.ndarray]:
    """How often each model px of the region and each output px is covered by a core."""
    (oy, ox), (h, w) = spec.origin_model_yx, spec.size_model_hw
    model_px = np.zeros((h, w), dtype=int)
    out_px = np.zeros(spec.out_shape_hw, dtype=int)
    for tile in spec.tiles():
        y0, x0, y1, x1 = spec.core_model(tile)
        model_px[y0 - oy : y1 - oy, x0 - ox : x1 - ox] += 1
        out_px[spec.output_slices(tile)] += 1
    return model_px, out_px


@pytest.mark.parametrize(
    ("bbox", "tile_px"),
    [(None, 96), (None, 512), ((123.0, 77.0, 901.5, 1299.0), 64), ((0, 0, 10, 10), 64)],
)
def test_cores_cover_the_region_exactly_once(bbox, tile_px):
    spec = plan_tiles(_slide(), MODEL, tile_px=tile_px, bbox_yx=bbox)
    model_px, out_px = _cover_counts(spec)
    assert (model_px == 1).all() and (out_px == 1).all()
    assert spec.size_model_hw[0] % spec.stride == 0 and spec.size_model_hw[1] % spec.stride == 0
    assert spec.n_tiles == len(list(spec.tiles()))


def test_region_covers_the_slide_or_the_box():
    slide = _slide()
    spec = plan_tiles(slide, MODEL, tile_px=96)
    f = spec.f
    assert f == 2.0 and spec.origin_model_yx == (0, 0)
    y0, x0, y1, x1 = spec.grid.bbox_yx
    assert (y0, x0) == (0, 0) and y1 >= 1000 and x1 >= 1300 and y1 - 1000 < spec.stride * f
    box = (123.0, 77.0, 901.5, 1299.0)
    sub = plan_tiles(slide, MODEL, tile_px=64, bbox_yx=box)
    gy0, gx0, gy1, gx1 = sub.grid.bbox_yx
    assert gy0 <= box[0] and gx0 <= box[1] and gy1 >= box[2] and gx1 >= box[3]


def test_tiles_are_aligned_and_windows_add_the_halo():
    model = SimpleNamespace(mpp=0.5, stride=8, halo_px=40, align_px=16, input_kind="dense")
    spec = plan_tiles(_slide(), model, tile_px=100, halo_px=None, bbox_yx=(50, 90, 700, 999))
    assert spec.align == 16 and spec.tile_px == 112 and spec.halo_px == 48  # rounded up
    for tile in spec.tiles():
        y0, x0, _, _ = spec.core_model(tile)
        assert y0 % 16 == 0 and x0 % 16 == 0
        wy0, wx0, wy1, wx1 = spec.window_model(tile)
        assert (y0 - wy0, x0 - wx0) == (48, 48)
        assert wy1 - wy0 == wx1 - wx0 == spec.window_px == 112 + 2 * 48
        assert wy0 % 16 == 0 and wx0 % 16 == 0


def test_output_grid_and_tile_geometry_agree():
    spec = plan_tiles(_slide(), MODEL, tile_px=96, bbox_yx=(123.0, 77.0, 901.5, 1299.0))
    grid = spec.grid
    assert grid.pixel_px == spec.stride * spec.f == 8.0
    assert grid.origin_yx == (spec.origin_model_yx[0] * 2.0, spec.origin_model_yx[1] * 2.0)
    assert grid.shape_hw == spec.out_shape_hw
    for tile in spec.tiles():
        rows, cols = spec.output_slices(tile)
        assert grid.crop_slices(spec.core_level0(tile)) == (rows, cols)
        cy, cx = spec.tile_center_level0(tile)
        assert tile in spec.tiles_in_bbox((cy - 1, cx - 1, cy + 1, cx + 1))
    assert spec.tiles_in_bbox((-50, -50, 1e6, 1e6)) == list(spec.tiles())


def test_level_and_scale_follow_the_pyramid():
    spec = plan_tiles(_slide(mpp=0.25, n_levels=3), MODEL)
    assert (spec.level, spec.level_downsample, spec.scale) == (1, 2.0, 1.0)
    spec = plan_tiles(_slide(mpp=0.3, n_levels=3), MODEL)
    assert spec.level == 0 and spec.scale == pytest.approx(0.5 / 0.3)
    assert spec.tile_px == default_tile_px(MODEL) == 1024
    big_halo = SimpleNamespace(mpp=0.5, stride=4, halo_px=384, align_px=32, input_kind="dense")
    assert default_tile_px(big_halo) == 1152  # 3 × halo


def test_spec_is_frozen_and_round_trips():
    spec = plan_tiles(_slide(), MODEL, tile_px=96)
    assert TileSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tile_px = 1


def test_bad_inputs_are_refused(caplog):
    slide = _slide()
    with pytest.raises(StmapInputError, match="does not overlap"):
        plan_tiles(slide, MODEL, bbox_yx=(5000, 5000, 6000, 6000))
    with pytest.raises(StmapInputError, match="y1 > y0"):
        plan_tiles(slide, MODEL, bbox_yx=(10, 10, 5, 20))
    with pytest.raises(StmapInputError, match="dense model"):
        plan_tiles(slide, SimpleNamespace(**{**vars(MODEL), "input_kind": "spot"}))
    with pytest.raises(IndexError):
        plan_tiles(slide, MODEL).core_model((99, 0))
    with caplog.at_level(logging.WARNING):
        plan_tiles(slide, MODEL, halo_px=16)
    assert "seams" in caplog.text


# ------------------------------------------------------------------------------ tissue mask
@pytest.fixture(scope="module")
def synthetic_slide(small_sample):
    return open_slide(small_sample.slide)


def test_tissue_mask_skips_background_tiles(synthetic_slide):
    mask = tissue_mask(synthetic_slide)
    assert 0.3 < mask.fraction < 0.8  # an irregular tissue piece on glass
    spec = plan_tiles(synthetic_slide, MODEL, tile_px=128)
    on = tissue_tiles(mask, spec)
    assert on.shape == spec.grid_shape
    assert not on[0, 0] and not on[-1, -1] and not on[0, -1]  # corners are glass
    assert on[spec.grid_shape[0] // 2, spec.grid_shape[1] // 2]  # the centre is tissue
    grown = tissue_tiles(tissue_mask(synthetic_slide, dilate_um=60.0), spec)
    assert (grown >= on).all() and grown.sum() > on.sum()
    assert tissue_tiles(None, spec).all()


def test_blank_slide_has_no_tissue():
    white = Slide(
        path=Path("white.tif"),
        levels=(da.full((400, 600, 3), 245, dtype=np.uint8, chunks=(200, 200, 3)),),
        mpp=0.5,
        mpp_source="user",
    )
    mask = tissue_mask(white, dilate_um=50.0)
    assert mask.fraction == 0.0
    assert not tissue_tiles(mask, plan_tiles(white, MODEL, tile_px=128)).any()


def test_mask_any_in_uses_level0_boxes():
    m = np.zeros((10, 10), dtype=bool)
    m[4, 6] = True
    mask = TissueMask(mask=m, px_yx=(8.0, 8.0))  # mask px (4, 6) = level-0 [32, 40) x [48, 56)
    boxes = np.array([[32, 48, 40, 56], [0, 0, 32, 48], [39.5, 55.5, 100, 100], [40, 56, 80, 80]])
    assert mask.any_in(boxes).tolist() == [True, False, True, False]
