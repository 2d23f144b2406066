"""GeoJSON in QuPath's layout, shared by the core and the napari tests (level-0 px, [x, y])."""

from __future__ import annotations

import numpy as np

from napari_stmap.core.io.regions import Annotation

# [x, y] level-0 px, as QuPath writes them (closed rings)
OUTER = [[100.0, 100.0], [400.0, 120.0], [420.0, 300.0], [110.0, 310.0], [100.0, 100.0]]
HOLE = [[200.0, 150.0], [300.0, 150.0], [300.0, 250.0], [200.0, 250.0], [200.0, 150.0]]
TRIANGLE = [[600.0, 50.0], [700.0, 50.0], [650.5, 130.25], [600.0, 50.0]]
SQUARE = [[800.0, 0.0], [900.0, 0.0], [900.0, 100.0], [800.0, 100.0], [800.0, 0.0]]
SQUARE_HOLE = [[820.0, 20.0], [840.0, 20.0], [840.0, 40.0], [820.0, 40.0], [820.0, 20.0]]
RECT = [[1000.0, 10.0], [1000.0, 60.0], [1300.0, 60.0], [1300.0, 10.0], [1000.0, 10.0]]


def _ellipse_ring(n: int = 90) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    xy = np.stack([1500 + 80 * np.cos(t), 400 + 40 * np.sin(t)], axis=1)
    return np.vstack([xy, xy[:1]]).tolist()


def qupath_doc() -> dict:
    """A QuPath 0.4+ export: FeatureCollection, classification objects, ids, objectType."""

    def feature(geometry, **props):
        return {
            "type": "Feature",
            "id": f"uuid-{len(props)}",
            "geometry": geometry,
            "properties": {"objectType": "annotation", **props},
        }

    return {
        "type": "FeatureCollection",
        "features": [
            feature(
                {"type": "Polygon", "coordinates": [OUTER, HOLE]},
                name="ring",
                classification={"name": "Tumor", "color": [200, 0, 0]},
            ),
            feature(
                {"type": "MultiPolygon", "coordinates": [[TRIANGLE], [SQUARE, SQUARE_HOLE]]},
                classification={"name": "Stroma", "color": [0, 150, 0]},
            ),
            feature({"type": "Polygon", "coordinates": [RECT]}, isLocked=False),
            feature(
                {"type": "Polygon", "coordinates": [_ellipse_ring()]},
                classification={"name": "Stroma", "colorRGB": -16738816},  # QuPath < 0.4
            ),
        ],
    }


def _shoelace(ring_xy) -> float:
    xy = np.asarray(ring_xy, float)
    x, y = xy[:, 0], xy[:, 1]
    return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def _vertices(ann: Annotation) -> list[list[np.ndarray]]:
    return [[np.asarray(fp.outline_yx(64)) for fp in poly] for poly in ann.polygons]


def assert_same_annotations(
    got: list[Annotation], want: list[Annotation], atol: float = 1e-6
) -> None:
    """Same names, classes, colours, kinds of rings and vertices (within ``atol`` px)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.name, a.classification, a.color) == (b.name, b.classification, b.color)
        assert [[type(fp) for fp in p] for p in a.polygons] == [
            [type(fp) for fp in p] for p in b.polygons
        ]
        for pa, pb in zip(_vertices(a), _vertices(b), strict=True):
            for ra, rb in zip(pa, pb, strict=True):
                np.testing.assert_allclose(ra, rb, atol=atol)
