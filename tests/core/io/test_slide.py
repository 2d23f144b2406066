"""Tests for :mod:`napari_stmap.core.io.slide`: formats, µm/px, laziness, regions, errors."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_stmap.core.errors import StmapInputError, StmapInputWarning
from napari_stmap.core.io.slide import UNKNOWN_MPP_FALLBACK, Slide, open_slide
from napari_stmap.core.io.slide import _tiff as slide_mod

RNG = np.random.default_rng(0)


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """Compressible test image (gradients), fast to write as PNG/JPEG."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy % 256, xx % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)


def _no_compute(dsk, keys, **kwargs):
    pytest.fail("open_slide computed a dask graph")


@pytest.fixture()
def ome_pyramid(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """600 x 500 RGB OME-TIFF, levels as SubIFDs (x1, x2, x4), PhysicalSizeX 0.5 µm."""
    data = _rgb(600, 500)
    levels = [data, data[::2, ::2], data[::4, ::4]]
    path = tmp_path / "pyr.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"}
    meta |= {"PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb", metadata=meta)
        for lvl in levels[1:]:
            tw.write(lvl, subfiletype=1, tile=(128, 128), photometric="rgb")
    return path, levels


# --- formats and pyramids -----------------------------------------------------------------


def test_ome_subifd_pyramid(ome_pyramid):
    path, written = ome_pyramid
    s = open_slide(path)
    assert isinstance(s, Slide)
    assert (s.mpp, s.mpp_source) == (0.5, "ome")
    assert s.n_levels == 3
    assert s.shape_yx == (600, 500)
    assert s.downsamples == (1.0, 2.0, 4.0)
    assert s.level_mpp(2) == pytest.approx(2.0)
    for lvl, expected in zip(s.levels, written, strict=True):
        assert isinstance(lvl, da.Array)
        assert lvl.dtype == np.uint8
        np.testing.assert_array_equal(lvl.compute(), expected)


def test_pyramid_as_reduced_resolution_pages(tmp_path):
    data = _rgb(600, 500)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(128, 128), photometric="rgb")
        tw.write(data[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    s = open_slide(path, mpp=0.5)
    assert s.n_levels == 2
    np.testing.assert_array_equal(s.levels[1].compute(), data[::2, ::2])


@pytest.mark.parametrize(("value", "unit"), [(500.0, "nm"), (5e-4, "mm"), (5e-5, "cm")])
def test_ome_physical_size_units(tmp_path, value, unit):
    path = tmp_path / f"u_{unit}.ome.tif"
    meta = {"PhysicalSizeX": value, "PhysicalSizeXUnit": unit}
    tifffile.imwrite(path, _rgb(64, 48), ome=True, photometric="rgb", metadata=meta)
    s = open_slide(path)
    assert s.mpp == pytest.approx(0.5)
    assert s.mpp_source == "ome"


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [((1e4 / 0.25, 1e4 / 0.25), "CENTIMETER", 0.25), ((50800, 50800), "INCH", 0.5)],
)
def test_tiled_tiff_resolution_tags(tmp_path, resolution, unit, expected):
    data = _rgb(300, 260)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(
        path, data, tile=(64, 64), photometric="rgb", resolution=resolution, resolutionunit=unit
    )
    s = open_slide(path)
    assert s.mpp == pytest.approx(expected)
    assert s.mpp_source == "tiff-resolution"
    np.testing.assert_array_equal(s.levels[0].compute(), data)


@pytest.mark.parametrize(
    ("resolution", "unit"), [((72, 72), "INCH"), ((1, 1), "NONE"), ((1e4 / 500, 1), "CENTIMETER")]
)
def test_meaningless_resolution_falls_back(tmp_path, resolution, unit):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(
        path, _rgb(32, 32), photometric="rgb", resolution=resolution, resolutionunit=unit
    )
    with pytest.warns(StmapInputWarning, match="unknown"):
        s = open_slide(path)
    assert s.mpp_source == "fallback"


def test_stripped_tiff_without_resolution_warns_and_falls_back(tmp_path):
    data = _rgb(200, 150)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, data, rowsperstrip=16, photometric="rgb")
    with pytest.warns(StmapInputWarning, match=r"unknown.*UNKNOWN_MPP_FALLBACK.*--mpp"):
        s = open_slide(path)
    assert s.mpp == UNKNOWN_MPP_FALLBACK
    assert s.mpp_source == "fallback"
    np.testing.assert_array_equal(s.levels[0].compute(), data)


def test_open_is_lazy_and_pyramid_is_computed(tmp_path):
    """A 22 MB stripped TIFF: opening computes nothing and allocates < 2 MB."""
    data = _smooth_rgb(3000, 2500)
    path = tmp_path / "big_stripped.tif"
    tifffile.imwrite(path, data, rowsperstrip=32, photometric="rgb", compression="zlib")
    open_slide(path, mpp=1.0)  # warm up: first-time imports inside zarr/dask count otherwise
    tracemalloc.start()
    with dask.config.set(scheduler=_no_compute), pytest.warns(StmapInputWarning):
        s = open_slide(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * 2**20 < data.nbytes
    assert [lvl.shape[:2] for lvl in s.levels] == [(3000, 2500), (1500, 1250), (750, 625)]
    assert all(isinstance(lvl, da.Array) for lvl in s.levels)
    assert s.levels[0].npartitions == 3  # 1024-row bands of the 32-row strips
    assert s.downsamples == (1.0, 2.0, 4.0)
    blocks = data[:2000, :2000].reshape(1000, 2, 1000, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    np.testing.assert_array_equal(s.levels[1][:1000, :1000].compute(), (blocks + 2) // 4)


def test_single_block_uncompressed_tiff_is_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(slide_mod, "_MAX_CHUNK_BYTES", 2**16)
    data = _rgb(1200, 300)
    path = tmp_path / "one_strip.tif"
    tifffile.imwrite(path, data, photometric="rgb", resolution=(4e4, 4e4), resolutionunit=3)
    s = open_slide(path)
    assert s.levels[0].npartitions > 1
    np.testing.assert_array_equal(s.read_region((1000, 10, 1100, 60)), data[1000:1100, 10:60])


def test_bigtiff(tmp_path):
    data = _rgb(300, 200)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, bigtiff=True, tile=(64, 64), photometric="rgb")
    with pytest.warns(StmapInputWarning):
        s = open_slide(path)
    assert tifffile.TiffFile(path).is_bigtiff
    np.testing.assert_array_equal(s.levels[0].compute(), data)


def test_png_and_jpeg(tmp_path):
    data = _smooth_rgb(120, 90)
    png, jpg = tmp_path / "a.png", tmp_path / "a.jpg"
    Image.fromarray(data).save(png)
    Image.fromarray(data).save(jpg, quality=90)
    with pytest.warns(StmapInputWarning):
        s_png = open_slide(png)
    s_jpg = open_slide(jpg, mpp=2.0)
    assert isinstance(s_png.levels[0], da.Array)
    assert s_png.n_levels == 1
    np.testing.assert_array_equal(s_png.levels[0].compute(), data)
    np.testing.assert_array_equal(s_jpg.levels[0].compute(), np.asarray(Image.open(jpg)))
    assert (s_jpg.mpp, s_jpg.mpp_source) == (2.0, "user")


def test_large_png_gets_lazy_pyramid(tmp_path):
    data = _smooth_rgb(2100, 1400)
    path = tmp_path / "large.png"
    Image.fromarray(data).save(path, compress_level=1)
    with dask.config.set(scheduler=_no_compute):
        s = open_slide(path, mpp=1.0)
    assert [lvl.shape[:2] for lvl in s.levels] == [(2100, 1400), (1050, 700), (525, 350)]
    np.testing.assert_array_equal(s.read_region((0, 0, 2100, 1400)), data)


def test_grayscale_to_rgb(tmp_path):
    gray = RNG.integers(0, 256, (50, 40), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "g.tif", gray, resolution=(4e4, 4e4), resolutionunit=3)
    Image.fromarray(gray).save(tmp_path / "g.png")
    for name in ("g.tif", "g.png"):
        out = open_slide(tmp_path / name, mpp=1.0).levels[0].compute()
        assert out.shape == (50, 40, 3)
        np.testing.assert_array_equal(out, np.stack([gray] * 3, axis=-1))


def test_rgba_drops_alpha(tmp_path):
    rgba = RNG.integers(0, 256, (50, 40, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    for name in ("a.tif", "a.png"):
        out = open_slide(tmp_path / name, mpp=1.0).levels[0].compute()
        np.testing.assert_array_equal(out, rgba[..., :3])


def test_uint16_scaled_to_uint8(tmp_path):
    values = np.arange(256, dtype=np.uint16) * 257  # 0, 257, …, 65535
    rgb16 = np.broadcast_to(values[None, :, None], (4, 256, 3)).copy()
    tifffile.imwrite(tmp_path / "u16.tif", rgb16, photometric="rgb")
    s = open_slide(tmp_path / "u16.tif", mpp=1.0)
    assert s.levels[0].dtype == np.uint8
    np.testing.assert_array_equal(s.levels[0][0, :, 0].compute(), np.arange(256))


def test_planar_rgb(tmp_path):
    data = _rgb(40, 30)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(data, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(open_slide(path, mpp=1.0).levels[0].compute(), data)


def test_user_mpp_overrides_file(ome_pyramid, tmp_path):
    s = open_slide(ome_pyramid[0], mpp=0.25)
    assert (s.mpp, s.mpp_source) == (0.25, "user")
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _rgb(20, 20), photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_slide(path, mpp=0.3).mpp_source == "user"


# --- regions, levels, thumbnails ----------------------------------------------------------


def test_read_region_inside_and_level(ome_pyramid):
    path, written = ome_pyramid
    s = open_slide(path)
    np.testing.assert_array_equal(s.read_region((100, 50, 180, 170)), written[0][100:180, 50:170])
    crop = s.read_region((200, 100, 400, 300), level=1)
    assert crop.shape == (100, 100, 3)
    np.testing.assert_array_equal(crop, written[1][100:200, 50:150])
    np.testing.assert_array_equal(s.read_region((0, 0, 600, 500), level=2), written[2])


def test_read_region_pads_outside_with_white(ome_pyramid):
    path, written = ome_pyramid
    s = open_slide(path)
    crop = s.read_region((-10, 480, 20, 530))
    assert crop.shape == (30, 50, 3)
    assert crop.dtype == np.uint8
    np.testing.assert_array_equal(crop[10:, :20], written[0][:20, 480:500])
    assert (crop[:10] == 255).all() and (crop[:, 20:] == 255).all()
    assert (s.read_region((700, 700, 720, 740), level=1) == 255).all()
    assert s.read_region((700, 700, 720, 740), level=1).shape == (10, 20, 3)
    assert s.read_region((5, 5, 5, 9)).shape == (0, 4, 3)
    with pytest.raises(ValueError, match="bbox_yx"):
        s.read_region((10, 0, 5, 5))
    with pytest.raises(IndexError, match="level"):
        s.read_region((0, 0, 5, 5), level=3)


def test_best_level_for_mpp(ome_pyramid):
    s = open_slide(ome_pyramid[0])  # 0.5, 1.0, 2.0 µm/px
    assert s.best_level_for_mpp(0.1) == 0
    assert s.best_level_for_mpp(0.5) == 0
    assert s.best_level_for_mpp(0.99) == 0
    assert s.best_level_for_mpp(0.9995) == 1
    assert s.best_level_for_mpp(1.0) == 1
    assert s.best_level_for_mpp(1.9) == 1
    assert s.best_level_for_mpp(50.0) == 2
    with pytest.raises(ValueError, match="target_mpp"):
        s.best_level_for_mpp(0.0)


def test_thumbnail(ome_pyramid):
    s = open_slide(ome_pyramid[0])
    thumb = s.thumbnail(max_px=200)
    assert thumb.shape == (200, 167, 3)
    assert thumb.dtype == np.uint8
    assert s.thumbnail(max_px=4000).shape == (600, 500, 3)


# --- errors -------------------------------------------------------------------------------


def _assert_one_line(err: pytest.ExceptionInfo, name: str) -> None:
    assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(StmapInputError, match="no such file") as err:
        open_slide(tmp_path / "nope.tif")
    _assert_one_line(err, "nope.tif")
    with pytest.raises(StmapInputError, match="folder") as err:
        open_slide(tmp_path)
    _assert_one_line(err, str(tmp_path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "slide.czi"
    path.write_bytes(b"not really")
    with pytest.raises(StmapInputError, match="unsupported") as err:
        open_slide(path)
    _assert_one_line(err, "slide.czi")


@pytest.mark.parametrize("kind", ["tiled", "stripped", "pyramid"])
def test_truncated_tiff(tmp_path, kind):
    path = tmp_path / f"cut_{kind}.tif"
    data = _rgb(256, 256)
    if kind == "pyramid":
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(data, subifds=1, tile=(64, 64), photometric="rgb")
            tw.write(data[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    else:
        tile = {"tile": (64, 64)} if kind == "tiled" else {"rowsperstrip": 8}
        tifffile.imwrite(path, data, photometric="rgb", **tile)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StmapInputError, match="truncated|corrupt") as err:
        open_slide(path, mpp=0.5)
    _assert_one_line(err, path.name)


def test_not_an_image(tmp_path):
    for name in ("junk.tif", "junk.png"):
        (tmp_path / name).write_bytes(b"this is not an image at all" * 10)
        with pytest.raises(StmapInputError, match="corrupt") as err:
            open_slide(tmp_path / name)
        _assert_one_line(err, name)


@pytest.mark.parametrize("bad", [0, -0.5, 1e6, float("nan"), float("inf"), "abc", True])
def test_implausible_user_mpp(ome_pyramid, bad):
    with pytest.raises(StmapInputError, match="--mpp") as err:
        open_slide(ome_pyramid[0], mpp=bad)
    _assert_one_line(err, "pyr.ome.tif")


# --- real files (../shared/data) ----------------------------------------------------------


def _direct_pixel(path: Path, level: int, y: int, x: int) -> np.ndarray:
    root = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    arr = root[str(level)] if isinstance(root, zarr.Group) else root
    return np.asarray(arr[y, x])


@pytest.mark.realdata
def test_real_svs(shared_data):
    path = shared_data / "formats/slides/CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    s = open_slide(path)
    # ImageLength 2967, ImageWidth 2220 (OpenSlide reports (w, h) = (2220, 2967)).
    assert s.shape_yx == (2967, 2220)
    assert s.mpp == pytest.approx(0.499)
    assert s.mpp_source == "svs"
    np.testing.assert_array_equal(
        s.read_region((1500, 1000, 1501, 1001))[0, 0], _direct_pixel(path, 0, 1500, 1000)
    )


@pytest.mark.realdata
def test_real_her2st_ome(shared_data):
    path = shared_data / "her2st/C2/he.ome.tif"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    s = open_slide(path)
    assert s.n_levels == 5
    assert s.mpp == pytest.approx(0.687, abs=1e-3)
    assert s.mpp_source == "ome"
    np.testing.assert_array_equal(
        s.read_region((5000, 4000, 5001, 4001))[0, 0], _direct_pixel(path, 0, 5000, 4000)
    )
    crop = s.read_region((4000, 4000, 4004, 4004), level=2)
    np.testing.assert_array_equal(crop[0, 0], _direct_pixel(path, 2, 1000, 1000))
