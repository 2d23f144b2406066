"""Region tables (core/regions.py): shapes -> regions -> sums of a prediction -> AnnData.

The source is a tiny random-init PixNet's store over the small synthetic slide (conftest,
600 × 800 px at 0.5 µm/px; output px of 4 level-0 px), predicted on demand for the tiles
the regions need. Every row is checked against the dense map itself (the additive rule).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_stmap.core.geometry import Disk, Ellipse, Polygon, Rectangle, Region, Square

torch = pytest.importorskip("torch")

GENES = ["G0", "G1", "G2", "G3"]
MPP = 0.5


@pytest.fixture(scope="module")
def pred(small_sample, tmp_path_factory):
    """A float32 store of a tiny PixNet over the whole slide (no tissue mask)."""
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import create_model
    from napari_stmap.core.predict import Predictor

    torch.manual_seed(0)
    model = create_model("pixnet_tiny", genes=GENES).eval()
    slide = open_slide(small_sample.slide)
    path = tmp_path_factory.mktemp("regions") / "r.zarr"
    p = Predictor(slide, model, path, tile_px=128, dtype="float32", tissue=False)
    yield p
    p.close()


@pytest.fixture(scope="module")
def source(pred):
    from napari_stmap.core.predict import StoreSource

    return StoreSource(pred)


@pytest.fixture(scope="module")
def dense(pred):
    """The dense map (G + 1, H, W) and its grid over the part of the slide the tests use."""
    from napari_stmap.core.predict import ensure_region

    values, grid = ensure_region(pred, (0.0, 0.0, 400.0, 480.0))
    return np.asarray(values, dtype=np.float64), grid


def _table(source, regions):
    from napari_stmap.core.regions import compute_regions

    return compute_regions(source, regions, MPP)


def _aggregate(dense, footprints):
    from napari_stmap.core.aggregate import aggregate

    values, grid = dense
    return aggregate(values, grid, footprints)


# ------------------------------------------------------------------------ the additive rule
def test_rectangle_row_is_the_map_summed_over_it(source, dense):
    values, grid = dense
    box = (64.0, 96.0, 192.0, 256.0)  # on output-pixel edges (4 level-0 px)
    off = Rectangle(61.0, 90.5, 171.25, 233.0)  # cuts output pixels
    table = _table(source, [Region("box", [(Rectangle(*box), 1.0)]), Region("off", [(off, 1.0)])])
    rows, cols = grid.crop_slices(box)
    np.testing.assert_allclose(table.counts[0], values[:, rows, cols].sum(axis=(1, 2)), rtol=1e-9)
    np.testing.assert_allclose(table.counts[1], _aggregate(dense, [off])[0], rtol=1e-9)
    assert table.counts.shape == (2, len(GENES) + 1) and (table.counts > 0).all()
    assert table.names == ["box", "off"] and table.kinds == ["rectangle", "rectangle"]
    assert table.genes == GENES
    np.testing.assert_allclose(table.area_um2, [128 * 160 * MPP**2, off.area_px() * MPP**2])
    np.testing.assert_allclose(table.centers_yx[0], [128.0, 176.0])
    np.testing.assert_array_equal(table.total, table.counts[:, -1])


def test_normalised_is_log1p_after_summing(source):
    from napari_stmap.core.metrics import normalize_expression

    table = _table(source, [Region("d", [(Disk((150.0, 200.0), 60.0), 1.0)])])
    want = np.log1p(1e4 * table.counts[:, :-1] / table.counts[:, -1:])
    np.testing.assert_allclose(table.normalised(), want, rtol=1e-12)
    np.testing.assert_array_equal(
        table.normalised(), normalize_expression(table.counts[:, :-1], table.total)
    )


def test_polygon_with_hole_is_outer_minus_hole(source, dense):
    from napari_stmap.core.io.regions import Annotation

    outer = Polygon(((40.0, 60.0), (40.0, 300.0), (220.0, 340.0), (300.0, 180.0), (200.0, 50.0)))
    hole = Polygon(((120.0, 150.0), (110.0, 230.0), (190.0, 200.0)))
    donut = Annotation([[outer, hole]], name="donut").region("donut")
    table = _table(
        source,
        [donut, Region("outer", [(outer, 1.0)]), Region("hole", [(hole, 1.0)])],
    )
    np.testing.assert_allclose(table.counts[0], table.counts[1] - table.counts[2], rtol=1e-9)
    by_map = _aggregate(dense, [outer, hole])
    np.testing.assert_allclose(table.counts[0], by_map[0] - by_map[1], rtol=1e-9)
    assert (table.counts[0] > 0).all() and (table.counts[0] < table.counts[1]).all()
    assert table.area_um2[0] == pytest.approx(table.area_um2[1] - table.area_um2[2])
    assert table.kinds[0] == "polygon"


def test_four_quarters_sum_to_their_square(source):
    y0, x0, y1, x1 = 61.3, 90.7, 181.3, 210.7  # off the output pixels on every side
    ym, xm = (y0 + y1) / 2, (x0 + x1) / 2
    quarters = [
        Rectangle(y0, x0, ym, xm),
        Rectangle(y0, xm, ym, x1),
        Rectangle(ym, x0, y1, xm),
        Rectangle(ym, xm, y1, x1),
    ]
    square = Region("square", [(Square((ym, xm), y1 - y0), 1.0)])
    parts = [Region(f"q{k}", [(q, 1.0)]) for k, q in enumerate(quarters)]
    table = _table(source, [square, *parts])
    np.testing.assert_allclose(table.counts[1:].sum(axis=0), table.counts[0], rtol=1e-6)
    assert table.area_um2[1:].sum() == pytest.approx(table.area_um2[0])
    one = _table(source, [Region("all four", [(q, 1.0) for q in quarters])])  # parts of one region
    np.testing.assert_allclose(one.counts[0], table.counts[0], rtol=1e-6)


def test_spot_regions_are_the_spot_grid(source, dense):
    from napari_stmap.core.geometry import disks, squares
    from napari_stmap.core.regions import spot_regions

    centers = np.array([[0, 100.0, 120.0], [0, 100.0, 220.0], [0, 210.5, 170.25]])  # (z, y, x)
    for kind, build in (("disk", disks), ("square", squares)):
        regions = spot_regions(centers, 48.0, kind)
        assert [r.name for r in regions] == ["spot 1", "spot 2", "spot 3"]
        table = _table(source, regions)
        assert table.kinds == [kind] * 3
        want = _aggregate(dense, build(centers[:, 1:], 48.0))
        np.testing.assert_allclose(table.counts, want, rtol=1e-9)
        np.testing.assert_allclose(table.centers_yx, centers[:, 1:])
    area = math.pi * 24.0**2 * MPP**2
    disk_table = _table(source, spot_regions(centers, 48.0, "disk"))
    np.testing.assert_allclose(disk_table.area_um2, area, rtol=1e-6)


def test_no_regions_give_an_empty_table(source):
    table = _table(source, [])
    assert table.counts.shape == (0, len(GENES) + 1) and table.names == []


# ----------------------------------------------------------------------------------- names
def test_names_come_from_annotations(source):
    from napari_stmap.core.io.regions import Annotation, regions_from_annotations

    def box(k):
        return [[Rectangle(40.0 + 30 * k, 60.0, 60.0 + 30 * k, 120.0)]]

    anns = [
        Annotation(box(0), name="Tumour"),
        Annotation(box(1), classification="Stroma"),
        Annotation(box(2)),
        Annotation(box(3), classification="Stroma"),
        Annotation(box(4), name="Tumour"),
    ]
    table = _table(source, regions_from_annotations(anns))
    assert table.names == ["Tumour", "Stroma 1", "region 3", "Stroma 2", "Tumour (2)"]
    assert table.counts.shape == (5, len(GENES) + 1)


def test_make_names_unique_renames_in_place():
    from napari_stmap.core.regions import make_names_unique

    regions = [Region(n, [(Square((50.0, 50.0), 10.0), 1.0)]) for n in ("a", "b", "a", "a")]
    out = make_names_unique(regions)
    assert [r.name for r in regions] == ["a", "b", "a (2)", "a (3)"]
    assert out == regions


# ------------------------------------------------------------------------- napari shapes
def test_shapes_group_into_regions_with_holes(source):
    from napari_stmap.core.regions import annotations_from_shapes, regions_from_shapes

    outer = np.array([[40.0, 60.0], [40.0, 260.0], [240.0, 260.0], [240.0, 60.0]])
    hole = np.array([[100.0, 100.0], [100.0, 160.0], [160.0, 160.0], [160.0, 100.0]])
    tri = np.array([[250.0, 300.0], [300.0, 380.0], [320.0, 290.0]])
    line = np.array([[0.0, 0.0], [10.0, 10.0]])
    types = ["rectangle", "rectangle", "polygon", "line"]
    props = {
        "feature": [0, 0, np.nan, -1],
        "hole": [False, True, False, False],
        "name": ["", "ring", None, "line"],
        "classification": ["Tumour", "", "Stroma", ""],
    }
    colors = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=float)
    anns = annotations_from_shapes(types, [outer, hole, tri, line], props, colors)
    assert len(anns) == 2  # the line is left out
    assert anns[0].name == "ring" and anns[0].classification == "Tumour"
    assert anns[0].color == (255, 0, 0) and len(anns[0].polygons[0]) == 2
    regions = regions_from_shapes(types, [outer, hole, tri, line], props)
    assert [r.name for r in regions] == ["ring", "Stroma 1"]
    table = _table(source, regions)
    o, h = Rectangle(40.0, 60.0, 240.0, 260.0), Rectangle(100.0, 100.0, 160.0, 160.0)
    parts = _table(source, [Region("o", [(o, 1.0)]), Region("h", [(h, 1.0)])])
    np.testing.assert_allclose(table.counts[0], parts.counts[0] - parts.counts[1], rtol=1e-9)
    assert table.area_um2[0] == pytest.approx((200 * 200 - 60 * 60) * MPP**2)


def test_shape_footprint_and_back():
    from napari_stmap.core.regions import footprint_shape, shape_footprint

    for fp in (
        Rectangle(10.0, 20.0, 50.0, 90.0),
        Square((40.0, 40.0), 16.0),
        Disk((60.0, 70.0), 30.0),
        Ellipse((60.0, 70.0), (20.0, 8.0), 0.4),
        Polygon(((0.0, 0.0), (10.0, 40.0), (30.0, 5.0))),
    ):
        kind, vertices = footprint_shape(fp)
        back = shape_footprint(kind, vertices)
        assert back.area_px() == pytest.approx(fp.area_px(), rel=1e-3), fp
        np.testing.assert_allclose(back.bbox_yx(), fp.bbox_yx(), atol=0.05 * max(back.bbox_yx()))
    turned = np.array([[0.0, 10.0], [10.0, 20.0], [20.0, 10.0], [10.0, 0.0]])  # a diamond
    assert isinstance(shape_footprint("rectangle", turned), Polygon)
    assert shape_footprint("path", turned) is None and shape_footprint("line", turned) is None
    three_d = np.column_stack([np.zeros(4), turned])  # napari's (z, y, x): leading axes dropped
    assert shape_footprint("polygon", three_d).area_px() == pytest.approx(200.0)


# ------------------------------------------------------------------------------- export
def test_export_round_trips_through_anndata(source, tmp_path):
    import anndata as ad

    from napari_stmap.core.export import write_anndata
    from napari_stmap.core.regions import build_export, spot_regions

    regions = [
        Region("box", [(Rectangle(64.0, 96.0, 192.0, 256.0), 1.0)]),
        *spot_regions(np.array([[100.0, 300.0], [250.0, 150.0]]), 40.0, "disk"),
    ]
    table = _table(source, regions)
    path = write_anndata(build_export(table, MPP, "slide.ome.tif"), tmp_path / "regions.h5ad")
    back = ad.read_h5ad(path)
    assert list(back.obs_names) == ["box", "spot 1", "spot 2"] and list(back.var_names) == GENES
    np.testing.assert_allclose(back.X, table.counts[:, :-1], rtol=1e-6)  # float32
    np.testing.assert_allclose(back.obs["total_counts"], table.total)
    np.testing.assert_allclose(back.obs["area_um2"], table.area_um2)
    assert list(back.obs["footprint"]) == ["rectangle", "disk", "disk"]
    np.testing.assert_allclose(back.obsm["spatial"], table.centers_yx[:, ::-1])  # (x, y)
    np.testing.assert_allclose(back.obsm["spatial"][0], [176.0, 128.0])
    np.testing.assert_allclose(back.obs["y_px"], table.centers_yx[:, 0])
    np.testing.assert_allclose(back.layers["lognorm"], table.normalised(), rtol=1e-5)
    spatial = back.uns["spatial"]["stmap"]
    assert spatial["scalefactors"]["microns_per_pixel"] == MPP
    assert spatial["metadata"]["slide"] == "slide.ome.tif"
