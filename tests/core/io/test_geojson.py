"""GeoJSON regions in QuPath's layout: reading, writing, napari shapes <-> annotations (no Qt)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geojson_samples import (  # noqa: I001 (tests/ helper module)
    HOLE,
    OUTER,
    SQUARE,
    SQUARE_HOLE,
    TRIANGLE,
    _shoelace,
    assert_same_annotations,
    qupath_doc,
)
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import Disk, Ellipse, Polygon, Rectangle, Region
from napari_stmap.core.io.regions import (
    is_geojson,
    read_annotations,
    read_geojson,
    write_geojson,
)
from napari_stmap.core.predict import combine_parts, region_parts
from napari_stmap.core.regions import (
    annotations_from_shapes,
    footprint_shape,
    regions_from_shapes,
)


@pytest.fixture
def qupath_file(tmp_path):
    path = tmp_path / "annotations.geojson"
    path.write_text(json.dumps(qupath_doc(), indent=2))
    return path


def test_qupath_layout_reads_with_holes_parts_classes(qupath_file):
    ring, stroma, rect, ellipse = read_annotations(qupath_file)
    assert (ring.name, ring.classification, ring.color) == ("ring", "Tumor", (200, 0, 0))
    assert (stroma.name, stroma.classification, stroma.color) == ("", "Stroma", (0, 150, 0))
    assert (rect.name, rect.classification, rect.color) == ("", "", None)
    assert ellipse.classification == "Stroma" and ellipse.color == (0, 150, 0)  # colorRGB
    assert ring.id == "uuid-2" and ring.object_type == "annotation"
    # a polygon with a hole: outer, then the hole (an axis-aligned ring is a Rectangle)
    assert [type(fp) for fp in ring.polygons[0]] == [Polygon, Rectangle]
    # (y, x) = swapped [x, y], without the repeated closing vertex
    np.testing.assert_array_equal(ring.polygons[0][0].vertices_yx, np.array(OUTER)[:-1, ::-1])
    # a MultiPolygon: two parts, the second with its hole
    assert [len(p) for p in stroma.polygons] == [1, 2]
    assert rect.polygons[0][0] == Rectangle(10.0, 1000.0, 60.0, 1300.0)
    assert isinstance(ellipse.polygons[0][0], Polygon)  # QuPath's ellipses stay polygons

    regions = read_geojson(qupath_file)
    assert [r.name for r in regions] == ["ring", "Stroma 1", "region 3", "Stroma 2"]
    assert regions[0].area_px == pytest.approx(_shoelace(OUTER) - _shoelace(HOLE))
    want = _shoelace(TRIANGLE) + _shoelace(SQUARE) - _shoelace(SQUARE_HOLE)
    assert regions[1].area_px == pytest.approx(want)
    assert regions[2].area_px == pytest.approx(300 * 50)


def test_bare_feature_list_and_points(tmp_path):
    doc = qupath_doc()["features"][:1] + [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}},
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(doc))
    assert is_geojson(path)
    with pytest.raises(StmapInputError, match="radius_px"):
        read_geojson(path)  # `stmap aggregate --shapes` names the missing property
    anns = read_annotations(path, points="skip")
    assert [a.name for a in anns] == ["ring"]
    doc[1]["properties"] = {"radius_px": 7}
    path.write_text(json.dumps(doc))
    disk = read_annotations(path)[1].polygons[0][0]
    assert disk == Disk((6.0, 5.0), 14.0)


def test_round_trip_read_write_read(qupath_file, tmp_path):
    first = read_annotations(qupath_file)
    out = write_geojson(tmp_path / "out.geojson", first)
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    props = [f["properties"] for f in doc["features"]]
    assert props[0] == {
        "objectType": "annotation",
        "name": "ring",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
    }
    assert props[2] == {"objectType": "annotation"}
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert kinds == ["Polygon", "MultiPolygon", "Polygon", "Polygon"]
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]  # closed, [x, y]
    np.testing.assert_allclose(ring, OUTER)
    assert_same_annotations(read_annotations(out), first)


def test_shapes_round_trip_groups_parts_and_holes(qupath_file):
    """Annotations -> one napari shape per ring (feature, hole) -> the same annotations."""
    anns = read_annotations(qupath_file)
    types, data, cols, colors = (
        [],
        [],
        {"feature": [], "hole": [], "name": [], "classification": []},
        [],
    )
    for f, ann in enumerate(anns):
        for poly in ann.polygons:
            for k, fp in enumerate(poly):
                kind, vertices = footprint_shape(fp)
                types.append(kind)
                data.append(vertices)
                cols["feature"].append(f)
                cols["hole"].append(k > 0)
                cols["name"].append(ann.name)
                cols["classification"].append(ann.classification)
                colors.append([c / 255 for c in ann.color or (0, 229, 255)] + [1.0])
    assert types.count("rectangle") == 4  # hole, square, its hole, rect
    # holes listed before their outer, and the parts of the MultiPolygon swapped
    order = [1, 0, 4, 3, 2, 5, 6]
    back = annotations_from_shapes(
        [types[i] for i in order],
        [data[i] for i in order],
        {k: [v[i] for i in order] for k, v in cols.items()},
        np.array([colors[i] for i in order]),
    )
    anns[2].color = (0, 229, 255)
    anns[1].polygons = anns[1].polygons[::-1]
    assert_same_annotations(back, anns)


def test_shapes_without_properties_are_one_region_each():
    rect = np.array([[10.0, 10.0], [10.0, 50.0], [30.0, 50.0], [30.0, 10.0]])
    ellipse = np.array([[0.0, 0.0], [0.0, 40.0], [20.0, 40.0], [20.0, 0.0]])
    line = np.array([[0.0, 0.0], [5.0, 5.0]])
    regions = regions_from_shapes(["rectangle", "line", "ellipse"], [rect, line, ellipse])
    assert [r.name for r in regions] == ["region 1", "region 2"]
    assert regions[0].parts[0][0] == Rectangle(10.0, 10.0, 30.0, 50.0)
    assert regions[1].parts[0][0] == Ellipse((10.0, 20.0), (10.0, 20.0), 0.0)
    # a new shape drawn in an opened layer (feature = -1) is a region of its own
    props = {"feature": [0, -1, 0], "hole": [False, False, True], "name": ["a", "", "a"]}
    hole = np.array([[15.0, 20.0], [15.0, 30.0], [25.0, 30.0], [25.0, 20.0]])
    regions = regions_from_shapes(
        ["rectangle", "ellipse", "rectangle"], [rect, ellipse, hole], props
    )
    assert [r.name for r in regions] == ["a", "region 2"]
    assert regions[0].area_px == pytest.approx(20 * 40 - 10 * 10)


def test_write_regions_nests_holes_into_their_part(tmp_path):
    a = Rectangle(0.0, 0.0, 10.0, 10.0)
    b = Rectangle(0.0, 100.0, 50.0, 150.0)
    hole = Rectangle(10.0, 110.0, 20.0, 120.0)
    out = write_geojson(tmp_path / "r.geojson", [Region("two", [(a, 1.0), (b, 1.0), (hole, -1.0)])])
    geometry = json.loads(out.read_text())["features"][0]["geometry"]
    assert geometry["type"] == "MultiPolygon"
    assert [len(p) for p in geometry["coordinates"]] == [1, 2]
    (region,) = read_geojson(out)
    assert region.name == "two" and region.area_px == pytest.approx(100 + 2500 - 100)


def test_parts_combine_with_signs():
    regions = [
        Region("ring", [(Rectangle(0, 0, 4, 4), 1.0), (Rectangle(1, 1, 2, 2), -1.0)]),
        Region("dot", [(Disk((9.0, 9.0), 2.0), 1.0)]),
    ]
    fps, signs, groups = region_parts(regions)
    assert len(fps) == 3 and list(signs) == [1, -1, 1] and list(groups) == [0, 0, 1]
    values = np.array([[16.0, 1.0], [1.0, np.nan], [3.0, 2.0]])
    out = combine_parts(values, signs, groups, 2)
    np.testing.assert_allclose(out, [[15.0, np.nan], [3.0, 2.0]])


@pytest.mark.parametrize(
    "text",
    [
        '{"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.15}',  # scalefactors_json.json
        "[1, 2, 3]",
        "[]",
        '{"type": "config", "lr": 0.001}',
        "{not json",
        "",
    ],
)
def test_other_json_is_not_geojson(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text(text)
    assert not is_geojson(path)
    assert not is_geojson(tmp_path / "missing.geojson")


def test_bad_geojson_names_the_file_and_fix(tmp_path):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}))
    with pytest.raises(StmapInputError, match=r"bad\.geojson.*fewer than 3"):
        read_annotations(path)
    path.write_text("[1, 2]")
    with pytest.raises(StmapInputError, match="not GeoJSON"):
        read_annotations(path)
