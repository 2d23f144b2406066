"""QuPath GeoJSON in and out of the napari viewer: reader, writer, the Regions dock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geojson_samples import HOLE, OUTER, _shoelace, assert_same_annotations, qupath_doc
from napari_stmap._layers import align_shapes_to_slide
from napari_stmap._reader import napari_get_reader
from napari_stmap.core.io.regions import read_annotations

pytest.importorskip("napari")

pytestmark = [
    pytest.mark.gui,
    pytest.mark.filterwarnings("error:Private attribute access:FutureWarning"),
]


@pytest.fixture
def qupath_file(tmp_path):
    path = tmp_path / "case 12 annotations.geojson"
    path.write_text(json.dumps(qupath_doc(), indent=2))
    return path


@pytest.fixture
def viewer_on_slide(make_napari_viewer, small_sample):
    """A viewer with the synthetic slide (0.5 µm/px) opened through napari-stmap."""
    viewer = make_napari_viewer()
    viewer.open(str(small_sample.slide), plugin="napari-stmap")
    return viewer


def test_open_qupath_geojson_as_shapes_in_um(viewer_on_slide, qupath_file, small_sample):
    viewer = viewer_on_slide
    (layer,) = viewer.open(str(qupath_file), plugin="napari-stmap")
    assert layer.name == "case 12 annotations" and layer.nshapes == 7
    assert tuple(layer.scale) == pytest.approx((small_sample.mpp, small_sample.mpp))
    assert layer.metadata["stmap"]["kind"] == "regions"
    assert layer.metadata["stmap"]["units"] == "px"
    assert layer.metadata["stmap"]["source"] == str(qupath_file)
    # level-0 px (y, x): the file's [x, y] swapped
    np.testing.assert_allclose(layer.data[0], np.array(OUTER)[:-1, ::-1])
    feats = layer.features
    assert list(feats["feature"]) == [0, 0, 1, 1, 1, 2, 3]
    assert list(feats["hole"]) == [False, True, False, False, True, False, False]
    assert list(feats["name"][:2]) == ["ring", "ring"]
    assert list(feats["classification"]) == ["Tumor"] * 2 + ["Stroma"] * 3 + ["", "Stroma"]
    assert list(layer.shape_type[:2]) == ["polygon", "rectangle"]
    np.testing.assert_allclose(layer.edge_color[0], [200 / 255, 0, 0, 1])
    np.testing.assert_allclose(layer.edge_color[2], [0, 150 / 255, 0, 1])
    np.testing.assert_allclose(layer.edge_color[5], [0, 229 / 255, 1, 1])  # no class


def test_save_layer_as_geojson_reads_back_equal(viewer_on_slide, qupath_file, tmp_path):
    import napari

    viewer = viewer_on_slide
    (layer,) = viewer.open(str(qupath_file), plugin="napari-stmap")
    out = tmp_path / "saved.geojson"
    written = napari.save_layers(str(out), [layer], plugin="napari-stmap")
    assert written == [str(out)]
    # napari keeps shapes in float32: ~1e-7 relative (1e-4 px at x = 1600 px); the other
    # vertices of this file are exact in float32
    assert_same_annotations(read_annotations(out), read_annotations(qupath_file), atol=1e-3)
    # ... and through the viewer's own save of the selected layer, then opened again
    viewer.layers.selection = {layer}
    again = tmp_path / "again.json"
    viewer.layers.save(str(again), selected=True, plugin="napari-stmap")
    (back,) = viewer.open(str(again), plugin="napari-stmap")
    assert back.nshapes == layer.nshapes and list(back.features["feature"]) == list(
        layer.features["feature"]
    )
    for a, b in zip(back.data, layer.data, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_plain_shapes_in_world_um_save_in_level0_px(viewer_on_slide, tmp_path, small_sample):
    import napari

    viewer = viewer_on_slide
    # drawn in the world (µm) in a plain napari layer: 20 × 30 µm at (10, 40) µm
    layer = viewer.add_shapes(
        np.array([[10.0, 40.0], [10.0, 70.0], [30.0, 70.0], [30.0, 40.0]]), shape_type="rectangle"
    )
    out = tmp_path / "plain.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-stmap")
    ring = json.loads(out.read_text())["features"][0]["geometry"]["coordinates"][0]
    xy = np.array(ring)[:-1]
    mpp = small_sample.mpp
    np.testing.assert_allclose(xy.min(0), [40 / mpp, 10 / mpp])
    np.testing.assert_allclose(xy.max(0), [70 / mpp, 30 / mpp])


def test_reader_declines_other_json(tmp_path):
    scalefactors = tmp_path / "scalefactors_json.json"
    scalefactors.write_text(json.dumps({"spot_diameter_fullres": 89.4, "fiducial": 144.0}))
    numbers = tmp_path / "x.json"
    numbers.write_text("[1, 2, 3]")
    assert napari_get_reader(str(scalefactors)) is None
    assert napari_get_reader(str(numbers)) is None
    assert napari_get_reader(str(tmp_path / "missing.geojson")) is None


def test_align_shapes_to_slide_rescales_the_world(make_napari_viewer, qupath_file):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(qupath_file), plugin="napari-stmap")
    data = [np.array(v) for v in layer.data]
    align_shapes_to_slide(layer, 0.25, units=("um", "um"))
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    assert layer.metadata["stmap"]["mpp"] == 0.25 and layer.metadata["stmap"]["units"] == "px"
    for a, b in zip(layer.data, data, strict=True):
        np.testing.assert_array_equal(a, b)  # the data stay level-0 px


def test_regions_dock_reads_opened_geojson(viewer_on_slide, qupath_file):
    viewer = viewer_on_slide
    (layer,) = viewer.open(str(qupath_file), plugin="napari-stmap")
    _, dock = viewer.window.add_plugin_dock_widget("napari-stmap", "Regions")
    dock.regions_layer().add_rectangles(np.array([[0.0, 0.0], [10.0, 20.0]]))
    regions = dock.regions()
    names = [r.name for r in regions]
    assert names == ["ring", "Stroma 1", "region 3", "Stroma 2", "region 1"]
    assert regions[0].area_px == pytest.approx(_shoelace(OUTER) - _shoelace(HOLE))
    assert regions[-1].area_px == pytest.approx(200.0)
    assert any(ly is layer for ly in dock.regions_layers())


def test_dock_sums_subtract_holes():
    from napari_stmap.core.geometry import Rectangle, Region
    from napari_stmap.core.regions import compute_regions as compute_regions_bins

    class Bins:  # a bin prediction whose sums are each part's area (one gene + total)
        genes = ["G"]

        def region_sums(self, fps):
            area = np.array([fp.area_px() for fp in fps])
            return np.stack([area, 2 * area], axis=1)

    ring = Region("ring", [(Rectangle(0, 0, 10, 10), 1.0), (Rectangle(2, 2, 4, 4), -1.0)])
    table = compute_regions_bins(Bins(), [ring, Region("b", [(Rectangle(0, 0, 1, 2), 1.0)])], 0.5)
    np.testing.assert_allclose(table.counts, [[96.0, 192.0], [2.0, 4.0]])
    np.testing.assert_allclose(table.area_um2, [96 * 0.25, 2 * 0.25])
    assert table.names == ["ring", "b"] and table.kinds == ["rectangle", "rectangle"]


def test_moved_regions_layer_writes_where_it_is_shown(tmp_path):
    import napari
    from napari.layers import Layer

    from napari_stmap._layers import annotations_layer
    from napari_stmap.core.geometry import Rectangle
    from napari_stmap.core.io.regions import Annotation

    data, kwargs, kind = annotations_layer(
        [Annotation([[Rectangle(10.0, 20.0, 30.0, 60.0)]], name="r")], name="r"
    )
    layer = Layer.create(data, {**kwargs, "scale": (0.5, 0.5)}, kind)
    layer.translate = (5.0, -2.0)  # µm: 10 px down, 4 px left
    out = tmp_path / "moved.geojson"
    napari.save_layers(str(out), [layer], plugin="napari-stmap")
    (ann,) = read_annotations(out)
    assert ann.name == "r" and ann.polygons[0][0] == Rectangle(20.0, 16.0, 40.0, 56.0)


def test_geojson_opened_before_the_slide_follows_it(
    make_napari_viewer, qupath_file, small_sample, qtbot, monkeypatch
):
    """GeoJSON opened first (µm/px unknown) is put on the slide's µm/px once a slide is used."""
    import napari_stmap._layers as layers_mod

    monkeypatch.setattr(layers_mod, "_SLIDE_HINT", {})  # a fresh napari: no slide opened yet
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(qupath_file), plugin="napari-stmap")
    assert tuple(layer.scale) == pytest.approx((1.0, 1.0))
    data = [np.array(v) for v in layer.data]
    _, dock = viewer.window.add_plugin_dock_widget("napari-stmap", "Slide & data")
    viewer.open(str(small_sample.slide), plugin="napari-stmap")
    qtbot.waitUntil(lambda: dock.session.slide is not None, timeout=60_000)
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.metadata["stmap"]["mpp"] == 0.5
    for a, b in zip(layer.data, data, strict=True):
        np.testing.assert_array_equal(a, b)  # level-0 px stay level-0 px
