"""The built-in nucleus segmentation and the expansion of nuclei into cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from napari_stmap.core.cells import ArrayLabels, NucleusParams, expand_cells, segment_nuclei


def _objects(lab: np.ndarray) -> set:
    """Each object as the frozen set of its pixels' flat indices (ids ignored)."""
    order = np.argsort(lab.ravel(), kind="stable")
    sorted_ids = lab.ravel()[order]
    cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
    return {
        frozenset(part.tolist())
        for part, ids in zip(np.split(order, cuts), np.split(sorted_ids, cuts), strict=True)
        if ids[0] != 0
    }


def test_segmentation_is_the_same_whatever_the_tiling(slide, nuclei):
    tiled = np.asarray(segment_nuclei(slide, params=NucleusParams(tile_px=96)).array)
    assert len(np.unique(tiled)) - 1 > 300  # many nuclei lie across the 96 px tile borders
    assert _objects(tiled) == _objects(nuclei)
    ids = np.unique(tiled[tiled > 0])
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # unique global ids
    # every nucleus is one connected piece (none split at a tile border)
    for k, sl in enumerate(ndimage.find_objects(tiled), start=1):
        assert ndimage.label(tiled[sl] == k)[1] == 1


def test_segmentation_finds_the_true_nuclei(small_sample, slide, nuclei):
    from napari_stmap.core.synthetic import _make_world
    from napari_stmap.core.synthetic._cells import _cells_near

    mpp = small_sample.mpp
    h_um, w_um = slide.shape_yx[0] * mpp, slide.shape_yx[1] * mpp
    world = _make_world(small_sample.seed, mpp, small_sample.metadata["size_um"])
    truth = _cells_near(world, (0, 0, h_um, w_um), 0)
    ids = np.arange(1, nuclei.max() + 1)
    yy, xx = np.indices(nuclei.shape)
    cy = ndimage.mean(yy + 0.5, nuclei, ids) * mpp
    cx = ndimage.mean(xx + 0.5, nuclei, ids) * mpp
    dist, match = cKDTree(np.c_[truth.y, truth.x]).query(np.c_[cy, cx])
    hit = dist < 4.0  # µm between a found centroid and a true nucleus centre
    precision = hit.mean()
    recall = np.unique(match[hit]).size / truth.y.size
    # measured on this sample: precision 1.000, recall 0.839 (355 found, 422 true nuclei)
    print(f"precision {precision:.3f} recall {recall:.3f} ({hit.size} found, {truth.y.size} true)")
    assert precision > 0.9 and recall > 0.75, (precision, recall)


def test_a_region_is_segmented_like_the_whole_slide(slide, nuclei):
    box = (150, 200, 450, 600)
    part = segment_nuclei(slide, bbox_yx=box, tissue="auto")
    assert part.origin == (150, 200) and part.shape_hw == (300, 400)
    crop = np.asarray(part.array)
    whole = part.read((150, 200, 450, 600))
    np.testing.assert_array_equal(whole, crop)
    # nuclei with their centroid well inside the box are the same as on the whole slide
    inner = [o for o in _objects(crop) if _inside(o, 400, 40)]
    full = _objects(_shift(nuclei, box))
    assert len(inner) > 50 and all(o in full for o in inner)


def _shift(lab, box):
    return lab[box[0] : box[2], box[1] : box[3]]


def _inside(obj, width, margin):
    r, c = np.divmod(np.fromiter(obj, int), width)
    return (
        r.min() > margin
        and c.min() > margin
        and r.max() < 300 - margin
        and c.max() < width - margin
    )


@pytest.mark.parametrize("distance_um", [2.0, 5.0])
def test_expansion_no_overlap_and_within_distance(nuclei, distance_um):
    mpp = 0.5
    base = ArrayLabels(nuclei, 1, kind="segment", name="nuclei")
    grown = expand_cells(base, distance_um, mpp)
    whole = grown.read((0, 0, *nuclei.shape))
    # windows read lazily give the whole-image result
    tiles = np.zeros_like(whole)
    for y in range(0, nuclei.shape[0], 130):
        for x in range(0, nuclei.shape[1], 170):
            ye, xe = min(y + 130, nuclei.shape[0]), min(x + 170, nuclei.shape[1])
            tiles[y:ye, x:xe] = grown.read((y, x, ye, xe))
    np.testing.assert_array_equal(tiles, whole)
    # nuclei keep their pixels; new pixels join a nucleus within the distance
    np.testing.assert_array_equal(whole[nuclei > 0], nuclei[nuclei > 0])
    assert (whole > 0).sum() > 1.3 * (nuclei > 0).sum()
    added = (whole > 0) & (nuclei == 0)
    for k in np.unique(whole[added])[:200]:
        own = ndimage.distance_transform_edt(nuclei != k)
        assert own[whole == k].max() <= distance_um / mpp + 1e-9
    assert expand_cells(base, 0, mpp) is base
