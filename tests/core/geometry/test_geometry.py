"""Footprints -> map pixel fractions: exactness, additivity, clipping, spot grids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import (
    Disk,
    Ellipse,
    MapGrid,
    Polygon,
    Rectangle,
    Square,
    coverage,
    disks,
    spot_grid,
    squares,
    weight_matrix,
)
from napari_stmap.core.geometry._grids import _segment_distance

MPP = 0.2634  # µm per level-0 px, a typical 40x scan
PIX = 2.0 / MPP  # a 2 µm map pixel in level-0 px


@pytest.fixture
def grid() -> MapGrid:
    return MapGrid(origin_yx=(13.7, -41.3), pixel_px=PIX, shape_hw=(60, 70))


def dense(fp, grid: MapGrid) -> np.ndarray:
    rows, cols, frac = coverage(fp, grid)
    out = np.zeros(grid.shape_hw)
    out[rows, cols] = frac
    return out


def brute(fp_contains, grid: MapGrid, n: int = 64) -> np.ndarray:
    """Reference coverage by n×n point sampling of every pixel (slow, small grids only)."""
    h, w = grid.shape_hw
    sub = (np.arange(n) + 0.5) / n
    ys = grid.origin_yx[0] + (np.arange(h)[:, None] + sub).ravel() * grid.pixel_px
    xs = grid.origin_yx[1] + (np.arange(w)[:, None] + sub).ravel() * grid.pixel_px
    inside = fp_contains(ys[:, None], xs[None, :])
    return inside.reshape(h, n, w, n).mean(axis=(1, 3))


# ------------------------------------------------------------------------------------ grid
def test_map_grid_helpers(grid: MapGrid) -> None:
    y0, x0, y1, x1 = grid.bbox_yx
    assert (y0, x0) == grid.origin_yx
    assert y1 == pytest.approx(13.7 + 60 * PIX) and x1 == pytest.approx(-41.3 + 70 * PIX)
    centers = grid.pixel_centers()
    assert centers.shape == (60 * 70, 2)
    # row i*W + j is pixel (i, j), whose centre is at map coords (i + .5, j + .5)
    np.testing.assert_allclose(grid.to_map(centers[3 * 70 + 5]), [3.5, 5.5])
    np.testing.assert_allclose(grid.from_map(grid.to_map(centers)), centers)
    np.testing.assert_allclose(grid.translate_yx, centers[0])


def test_map_grid_crop(grid: MapGrid) -> None:
    bbox = grid.from_map([[2.5, 3.2], [7.1, 9.0]]).ravel()
    rows, cols = grid.crop_slices(bbox)
    assert (rows, cols) == (slice(2, 8), slice(3, 9))
    sub = grid.crop(bbox)
    assert sub.shape_hw == (6, 6) and sub.pixel_px == grid.pixel_px
    np.testing.assert_allclose(sub.origin_yx, grid.from_map((2, 3)))
    # a bbox reaching outside is clipped; one fully outside gives an empty grid
    assert grid.crop((-1e6, -1e6, 1e6, 1e6)).shape_hw == grid.shape_hw
    assert grid.crop((-2e6, -2e6, -1e6, -1e6)).shape_hw == (0, 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MapGrid((0, 0), 0.0, (3, 3)),
        lambda: MapGrid((0, np.nan), 1.0, (3, 3)),
        lambda: MapGrid((0, 0), 1.0, (3,)),
        lambda: Disk((0, 0), -1),
        lambda: Square((0, 0, 0), 2),
        lambda: Rectangle(5, 0, 1, 3),
        lambda: Ellipse((0, 0), (1, 0)),
        lambda: Polygon([(0, 0), (1, 1)]),
        lambda: disks([[0, 0], [np.inf, 1]], 3),
        lambda: squares([[0, 0]], 0),
    ],
)
def test_bad_input_raises_one_line_error(make) -> None:
    with pytest.raises(StmapInputError) as info:
        make()
    assert "\n" not in str(info.value) and "pass" in str(info.value)


def test_footprints_are_hashable_frozen_values() -> None:
    p = Polygon(np.array([[0.0, 0.0], [0.0, 4.0], [3.0, 0.0]]))
    assert p == Polygon([(0, 0), (0, 4), (3, 0)]) and hash(p) == hash(Polygon(p.vertices_yx))
    assert np.asarray(p.vertices_yx).shape == (3, 2) and p.area_px() == 6.0
    assert Disk(np.array([1, 2]), 4).center_yx == (1.0, 2.0)
    with pytest.raises(AttributeError):
        Disk((0, 0), 1).diameter_px = 3  # type: ignore[misc]


# ------------------------------------------------------------------------- exact shapes
def test_square_coverage_is_exact(grid: MapGrid) -> None:
    g = MapGrid((0.0, 0.0), 2.0, (10, 10))
    # side 3 centred at (5.25, 7.75): map y in [1.875, 3.375), map x in [3.125, 4.625)
    frac = dense(Square((5.25, 7.75), 3.0), g)
    fy = np.array([0, 0.125, 1, 0.375, 0, 0, 0, 0, 0, 0])
    fx = np.array([0, 0, 0, 0.875, 0.625, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(frac, np.outer(fy, fx), atol=1e-15)
    rng = np.random.default_rng(0)
    for _ in range(50):
        side = rng.uniform(0.1, 12) * PIX
        center = grid.from_map(rng.uniform(8, 50, 2))
        total = dense(Square(center, side), grid).sum()
        assert total * PIX**2 == pytest.approx(side**2, rel=1e-9, abs=1e-9)


def test_disk_coverage_matches_area_and_point_sampling(grid: MapGrid) -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        r = rng.uniform(2, 8)  # map px
        disk = Disk(grid.from_map(rng.uniform(12, 45, 2)), 2 * r * PIX)
        assert dense(disk, grid).sum() * PIX**2 == pytest.approx(disk.area_px(), rel=1e-9)
    small = MapGrid((0.0, 0.0), 1.0, (9, 9))
    disk = Disk((4.3, 4.61), 5.3)
    ref = brute(lambda y, x: (y - 4.3) ** 2 + (x - 4.61) ** 2 <= 2.65**2, small, n=200)
    np.testing.assert_allclose(dense(disk, small), ref, atol=4e-3)
    # a disk inside one pixel covers exactly its area
    tiny = dense(Disk((4.5, 4.5), 0.5), small)
    assert tiny[4, 4] == pytest.approx(math.pi * 0.0625) and tiny.sum() == tiny[4, 4]


def test_ellipse_coverage(grid: MapGrid) -> None:
    rng = np.random.default_rng(2)
    for _ in range(30):
        e = Ellipse(
            grid.from_map(rng.uniform(15, 45, 2)), rng.uniform(2, 9, 2) * PIX, rng.uniform(0, 6.3)
        )
        assert dense(e, grid).sum() * PIX**2 == pytest.approx(e.area_px(), rel=2e-3)
    c = grid.from_map((30.3, 31.7))
    turned = dense(Ellipse(c, (5 * PIX, 9 * PIX), math.pi / 2), grid)
    np.testing.assert_allclose(turned, dense(Ellipse(c, (9 * PIX, 5 * PIX)), grid), atol=5e-3)
    # circles take the exact disk path
    np.testing.assert_array_equal(dense(Ellipse(c, (6.0, 6.0)), grid), dense(Disk(c, 12.0), grid))
    small = MapGrid((0.0, 0.0), 1.0, (12, 12))
    e = Ellipse((6.2, 5.9), (4.5, 2.2), 0.6)
    (ry, rx), cs, sn = e.radii_yx, math.cos(0.6), math.sin(0.6)

    def inside(y, x):
        dy, dx = y - 6.2, x - 5.9
        return ((dy * cs + dx * sn) / ry) ** 2 + ((-dy * sn + dx * cs) / rx) ** 2 <= 1

    np.testing.assert_allclose(dense(e, small), brute(inside, small, n=128), atol=1e-2)


def star(center, radius: float, n: int, seed: int) -> Polygon:
    """A simple star-shaped polygon (jittered angles keep it simple)."""
    rng = np.random.default_rng(seed)
    ang = (np.arange(n) + rng.uniform(0.1, 0.9, n)) * 2 * np.pi / n
    rad = radius * rng.uniform(0.4, 1.0, n)
    return Polygon(np.stack([center[0] + rad * np.sin(ang), center[1] + rad * np.cos(ang)], 1))


def test_polygon_coverage_area_and_exact_interior(grid: MapGrid) -> None:
    for seed in range(20):
        poly = star(grid.from_map((30, 35)), 20 * PIX, 7 + seed, seed)
        frac = dense(poly, grid)
        assert frac.sum() * PIX**2 == pytest.approx(poly.area_px(), rel=5e-3)
        assert frac.max() == 1.0  # interior pixels are exactly 1
    small = MapGrid((0.0, 0.0), 1.0, (10, 10))
    tri = Polygon([(1.2, 1.3), (8.7, 2.1), (4.4, 8.9)])
    (ay, ax), (by, bx), (cy, cx) = tri.vertices_yx

    def inside(y, x):
        def side(py, px, qy, qx):
            return (qx - px) * (y - py) - (qy - py) * (x - px)

        s = [side(ay, ax, by, bx), side(by, bx, cy, cx), side(cy, cx, ay, ax)]
        return ((s[0] >= 0) & (s[1] >= 0) & (s[2] >= 0)) | ((s[0] <= 0) & (s[1] <= 0) & (s[2] <= 0))

    np.testing.assert_allclose(dense(tri, small), brute(inside, small, n=128), atol=1e-2)
    assert dense(tri, small).sum() == pytest.approx(tri.area_px(), rel=1e-12)


def test_polygon_is_exact_and_orientation_free(grid: MapGrid) -> None:
    y0, x0, y1, x1 = (*grid.from_map((3.3, 4.9)), *grid.from_map((21.05, 40.7)))
    box = Polygon([(y0, x0), (y0, x1), (y1, x1), (y1, x0)])
    exact = dense(Rectangle(y0, x0, y1, x1), grid)
    np.testing.assert_allclose(dense(box, grid), exact, atol=1e-12)
    flipped = Polygon(np.asarray(box.vertices_yx)[::-1])
    np.testing.assert_allclose(dense(flipped, grid), exact, atol=1e-12)


# ---------------------------------------------------------------------------- additivity
def test_four_4um_squares_sum_to_their_8um_square(grid: MapGrid) -> None:
    rng = np.random.default_rng(3)
    side4 = 4.0 / MPP
    for _ in range(20):
        c = grid.from_map(rng.uniform(10, 50, 2))  # arbitrary sub-pixel position
        q = side4 / 2
        parts = squares(c + np.array([[-q, -q], [-q, q], [q, -q], [q, q]]), side4)
        w = weight_matrix([Square(c, 2 * side4), *parts], grid)
        np.testing.assert_allclose(w[1:].sum(axis=0).A1, w[0].toarray().ravel(), atol=1e-12)
        values = rng.gamma(2.0, 1.0, grid.shape_hw[0] * grid.shape_hw[1])
        sums = w @ values
        assert sums[1:].sum() == pytest.approx(sums[0], rel=1e-12)


@pytest.mark.parametrize("cut", ["vertical", "diagonal"])
def test_polygon_halves_sum_to_whole(grid: MapGrid, cut: str) -> None:
    y0, x0, y1, x1 = (*grid.from_map((5.3, 6.1)), *grid.from_map((52.7, 61.4)))
    if cut == "vertical":
        xm = (x0 + x1) / 2 + 0.37
        whole = Polygon([(y0, x0), (y0, x1), (y1, x1), (y1, x0)])
        halves = [
            Polygon([(y0, x0), (y0, xm), (y1, xm), (y1, x0)]),
            Polygon([(y0, xm), (y0, x1), (y1, x1), (y1, xm)]),
        ]
    else:
        whole = Polygon([(y0, x0), (y0, x1), (y1, x1), (y1, x0 + 40.0)])
        halves = [
            Polygon([(y0, x0), (y0, x1), (y1, x0 + 40.0)]),
            Polygon([(y0, x1), (y1, x1), (y1, x0 + 40.0)]),
        ]
    np.testing.assert_allclose(sum(dense(h, grid) for h in halves), dense(whole, grid), atol=1e-9)
    assert sum(h.area_px() for h in halves) == pytest.approx(whole.area_px())


def test_weight_rows_sum_to_area_when_inside(grid: MapGrid) -> None:
    c = grid.from_map((30.2, 33.9))
    fps = [
        Disk(c, 11 * PIX),
        Square(c, 7.3 * PIX),
        Rectangle(c[0] - 40, c[1] - 90, c[0] + 55, c[1] + 10),
        Ellipse(c, (8 * PIX, 3 * PIX), 0.4),
        star(c, 15 * PIX, 9, 0),
    ]
    rows = np.asarray(weight_matrix(fps, grid).sum(axis=1)).ravel()
    areas = np.array([f.area_px() for f in fps]) / PIX**2
    np.testing.assert_allclose(rows[:3], areas[:3], rtol=1e-9)
    np.testing.assert_allclose(rows[3:], areas[3:], rtol=5e-3)


def test_footprints_partly_outside_count_only_the_inside(grid: MapGrid) -> None:
    y0, x0, _, _ = grid.bbox_yx
    half_out = Square((y0 + 10.0, x0), 20.0)  # left half outside the grid
    assert dense(half_out, grid).sum() * PIX**2 == pytest.approx(200.0)
    corner = Disk((y0, x0), 30.0)  # three quarters outside
    assert dense(corner, grid).sum() * PIX**2 == pytest.approx(math.pi * 225 / 4)
    poly = Polygon([(y0 - 50, x0 - 50), (y0 - 50, x0 + 20), (y0 + 20, x0 + 20), (y0 + 20, x0 - 50)])
    assert dense(poly, grid).sum() * PIX**2 == pytest.approx(400.0, rel=1e-3)
    far = [
        Disk((-1e5, 0), 10),
        Ellipse((-1e5, 0), (3, 5), 1.0),
        Polygon([(-9e4, 0), (-9e4, 5), (-8e4, 0)]),
    ]
    w = weight_matrix(far, grid)
    assert w.shape == (3, 60 * 70) and w.nnz == 0


def test_weight_matrix_matches_coverage_and_keeps_order(grid: MapGrid) -> None:
    rng = np.random.default_rng(4)
    centers = grid.from_map(rng.uniform(-3, 63, (40, 2)))
    fps = []
    for i, c in enumerate(centers):
        kind = i % 5
        size = rng.uniform(0.3, 9) * PIX
        fps.append(
            [
                Disk(c, size),
                Square(c, size),
                Rectangle(c[0], c[1], c[0] + size, c[1] + 2 * size),
                Ellipse(c, (size, size / 3), 1.0),
                star(c, size, 6, i),
            ][kind]
        )
    w = weight_matrix(fps, grid)
    assert w.shape == (40, 60 * 70) and w.dtype == np.float64
    for i in rng.choice(40, 12, replace=False):
        np.testing.assert_array_equal(w[i].toarray().reshape(grid.shape_hw), dense(fps[i], grid))
    assert weight_matrix(fps[0], grid).shape == (1, 60 * 70)
    assert weight_matrix([], grid).shape == (0, 60 * 70)


def test_vectorised_builders() -> None:
    centers = np.array([[1.0, 2.0], [3.0, 4.0]])
    ds = disks(centers, [5.0, 6.0])
    assert ds == [Disk((1, 2), 5), Disk((3, 4), 6)]
    assert squares(centers, 2.5)[1] == Square((3, 4), 2.5)


# ------------------------------------------------------------------------------ spot grids
def test_spot_grid_in_bbox() -> None:
    centers, fps = spot_grid((0, 0, 100, 60), size_px=10, pitch_px=20, footprint="square")
    assert centers.shape == (5 * 3, 2) and len(fps) == 15 and isinstance(fps[0], Square)
    assert centers[:, 0].min() - 5 >= 0 and centers[:, 0].max() + 5 <= 100
    # the lattice is centred: equal margins on both sides
    assert centers[:, 1].min() - 5 == pytest.approx(60 - centers[:, 1].max() - 5)
    hex_centers, _ = spot_grid((0, 0, 200, 200), size_px=55, pitch_px=100, hexagonal=True)
    d = np.hypot(*(hex_centers[:, None] - hex_centers[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(axis=1), 100.0)


@pytest.mark.parametrize("shape", ["disk", "square"])
def test_spot_grid_keeps_spots_entirely_inside_region(shape: str) -> None:
    region = star((500.0, 500.0), 400.0, 9, 5)
    centers, fps = spot_grid(region, size_px=30, pitch_px=35, footprint=shape)
    assert len(centers) > 20
    g = MapGrid((0.0, 0.0), 2.0, (500, 500))
    inside = dense(region, g).ravel()
    w = weight_matrix(fps, g)
    # each spot's weights stay within pixels fully covered by the region, up to boundary ones
    spill = (w @ (1.0 - inside)) / np.asarray(w.sum(axis=1)).ravel()
    assert spill.max() < 0.02
    # every lattice spot not kept touches the outside (checked with a finer lattice offset)
    disk_region = Disk((0.0, 0.0), 200.0)
    c2, _ = spot_grid(disk_region, size_px=20, pitch_px=10, footprint=shape)
    reach = np.hypot(*c2.T) + (10 if shape == "disk" else 10 * math.sqrt(2))
    assert reach.max() <= 100.0 + 1e-6 and reach.max() > 90


def test_chebyshev_segment_distance_matches_sampling() -> None:
    rng = np.random.default_rng(6)
    d = rng.normal(size=(50, 1, 2)) * 5
    e = rng.normal(size=(1, 2)) * 5
    got = _segment_distance(d, e, chebyshev=True)[:, 0]
    t = np.linspace(0, 1, 20001)
    pts = d + t[None, :, None] * e[None]
    ref = np.abs(pts).max(axis=2).min(axis=1)
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert (got <= ref + 1e-12).all()


def test_point_in_ring_even_odd():
    from napari_stmap.core.geometry import point_in_ring

    square = np.array([[0.0, 0.0], [0.0, 10.0], [10.0, 10.0], [10.0, 0.0]])  # (y, x)
    assert point_in_ring((5.0, 5.0), square) and not point_in_ring((5.0, 12.0), square)
    notch = np.array([[0, 0], [0, 10], [10, 10], [10, 6], [4, 6], [4, 4], [10, 4], [10, 0]])
    assert not point_in_ring((7.0, 5.0), notch)  # in the notch cut from the bottom
    assert point_in_ring((2.0, 5.0), notch) and point_in_ring((7.0, 2.0), notch)
