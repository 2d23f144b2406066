"""Slides through OpenSlide (:mod:`napari_stmap.core.io.slide._openslide`) against tifffile.

CI files are written here with tifffile: a generic tiled pyramidal TIFF (levels as pages, the
layout OpenSlide's ``generic-tiff`` reads) and a minimal Trestle TIFF (OpenSlide's Trestle
convention: Software ``MedScan``, ``OverlapsXY`` in the description, µm/px in XResolution; no
tile overlaps, so tifffile reads the same pixels). The Aperio SVS from ../shared is used when
present.
"""

from __future__ import annotations

import gc
import json
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile

from napari_stmap.core.errors import StmapInputError, StmapInputWarning
from napari_stmap.core.io.slide import _openslide as os_mod
from napari_stmap.core.io.slide import _slide as slide_mod
from napari_stmap.core.io.slide import open_slide

openslide = pytest.importorskip("openslide")

SVS = Path(__file__).resolve().parents[4] / "shared/data/formats/slides/CMU-1-Small-Region.svs"


def _smooth(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy % 256, xx % 256, (yy * 3 + xx) % 256], axis=-1).astype(np.uint8)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pyramid(path: Path, levels: list[np.ndarray], mpp: float, **kw) -> Path:
    """Tiled TIFF, one page per level (full resolution first), resolution in px/cm."""
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tw.write(
                lvl,
                tile=(256, 256),
                photometric="rgb",
                compression=kw.get("compression", "zlib"),
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                software=kw.get("software"),
                description=kw.get("description") if k == 0 else None,
                metadata=None,
            )
    return path


@pytest.fixture
def generic_tiff(tmp_path) -> tuple[Path, list[np.ndarray]]:
    """1024 x 1536 px noise, levels x1, x2, x4 (exact), 0.25 µm/px."""
    data = _noise(1024, 1536)
    levels = [data, data[::2, ::2], data[::4, ::4]]
    return _write_pyramid(tmp_path / "generic.tif", levels, 0.25), levels


def _openslide_level(arr) -> os_mod._OpenSlideLevel:
    found = [
        v
        for layer in arr.dask.layers.values()
        for v in layer.values()
        if isinstance(v, os_mod._OpenSlideLevel)
    ]
    return found[0]


# --- same pixels, levels and µm/px as tifffile ---------------------------------------------


def test_generic_tiff_same_as_tifffile(generic_tiff):
    path, written = generic_tiff
    a = open_slide(path, backend="tifffile")
    b = open_slide(path, backend="openslide")
    assert (a.backend, b.backend) == ("tifffile", "openslide")
    assert a.mpp == pytest.approx(0.25) and b.mpp == pytest.approx(0.25)
    assert b.mpp_source == "openslide"
    assert [lvl.shape for lvl in b.levels] == [lvl.shape for lvl in a.levels]
    assert b.downsamples == a.downsamples == (1.0, 2.0, 4.0)
    for k, lvl in enumerate(written):
        np.testing.assert_array_equal(np.asarray(b.levels[k]), lvl)
        np.testing.assert_array_equal(np.asarray(a.levels[k]), lvl)
    box = (100, 1400, 700, 1700)  # level-0 px, partly outside: white there
    for level in range(3):
        np.testing.assert_array_equal(b.read_region(box, level), a.read_region(box, level))


def test_non_integer_downsample_maps_by_size(tmp_path):
    """Odd sizes: OpenSlide says 1.99967 and 5.999; the Slide says 2 and 6 from the sizes.

    Level 0 and every block whose origin is a whole level-0 px are exact; the level-1 blocks
    from x (or y) = 1024 on start 0.17 level px off (OpenSlide interpolates), so this smooth image
    differs only where its ramps wrap from 255 to 0.
    """
    data = _smooth(2100, 2999)
    lvl1 = data[::2, ::2]
    levels = [data, lvl1, lvl1[::3, ::3]]
    path = _write_pyramid(tmp_path / "odd.tif", levels, 0.5)
    s = open_slide(path, backend="openslide")
    osr = openslide.OpenSlide(str(path))
    assert osr.level_downsamples[1] == pytest.approx(1.99967, abs=1e-5)
    assert [lvl.shape[:2] for lvl in s.levels] == [(2100, 2999), (1050, 1500), (350, 500)]
    assert s.downsamples == (1.0, 2.0, 6.0)
    np.testing.assert_array_equal(np.asarray(s.levels[0]), data)
    np.testing.assert_array_equal(np.asarray(s.levels[2]), levels[2])
    got = np.asarray(s.levels[1]).astype(int)
    np.testing.assert_array_equal(got[:1024, :1024], levels[1][:1024, :1024])
    diff = np.abs(got - levels[1])[:, 1024:]
    assert 0 < diff.mean() < 1.0 and np.median(diff) == 0, diff.mean()


@pytest.mark.skipif(not SVS.is_file(), reason="needs ../shared/data/formats/slides (CMU-1 SVS)")
def test_svs_same_pixels_and_mpp_through_both_backends():
    a = open_slide(SVS)  # auto: tifffile for Aperio
    b = open_slide(SVS, backend="openslide")
    assert (a.backend, b.backend) == ("tifffile", "openslide")
    assert (a.mpp, a.mpp_source) == (0.499, "svs")
    assert (b.mpp, b.mpp_source) == (0.499, "openslide")
    assert a.shape_yx == b.shape_yx == (2967, 2220)
    x, y = np.asarray(a.levels[0]).astype(int), np.asarray(b.levels[0]).astype(int)
    diff = np.abs(x - y)
    # both decode with libjpeg-turbo: identical here (max 0, mean 0); allow a decoder's ±2
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


# --- auto: which reader ---------------------------------------------------------------------


def test_auto_picks_tifffile_for_generic_tiff(generic_tiff):
    assert open_slide(generic_tiff[0]).backend == "tifffile"


def test_auto_reads_trestle_through_openslide(tmp_path):
    """A vendor OpenSlide lays out itself (Trestle) goes to OpenSlide under "auto"."""
    data = _noise(512, 768, seed=2)
    levels = [data, data[::2, ::2]]
    desc = "Background Color=FFFFFF;White Balance=FFFFFF;Objective Power=20;OverlapsXY=0 0 0 0;"
    path = tmp_path / "trestle.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tw.write(
                lvl,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolution=(0.5, 0.5),  # Trestle keeps µm/px in XResolution
                software="MedScan",
                description=desc if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    s = open_slide(path)
    assert s.backend == "openslide"
    assert (s.mpp, s.mpp_source) == (0.5, "openslide")
    np.testing.assert_array_equal(np.asarray(s.levels[0]), data)
    np.testing.assert_array_equal(np.asarray(s.levels[1]), levels[1])
    # tifffile reads the same pixels when asked (no overlaps in this file), but not Trestle's
    # µm/px (XResolution without a unit reads as 50800 µm/px, implausible)
    with pytest.warns(StmapInputWarning, match="implausible"):
        via_tifffile = open_slide(path, backend="tifffile")
    np.testing.assert_array_equal(np.asarray(via_tifffile.levels[0]), data)


# --- errors ---------------------------------------------------------------------------------


def test_random_bytes_ndpi_names_the_formats(tmp_path):
    path = tmp_path / "scan.ndpi"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    for backend in ("auto", "openslide"):
        with pytest.raises(StmapInputError, match="OpenSlide cannot read") as err:
            open_slide(path, backend=backend)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg
        assert ".mrxs" in msg and ".ndpi" in msg and ".svs" in msg


def test_mrxs_without_its_folder(tmp_path):
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\nSLIDE_VERSION=01.02\n")
    with pytest.raises(StmapInputError, match="folder of the same name") as err:
        open_slide(path)
    assert "\n" not in str(err.value) and "supported" in str(err.value)
    with pytest.raises(StmapInputError, match="tifffile cannot read .mrxs"):
        open_slide(path, backend="tifffile")


def test_unknown_backend(generic_tiff):
    with pytest.raises(StmapInputError, match=r"backend='vips'.*'auto', 'tifffile', 'openslide'"):
        open_slide(generic_tiff[0], backend="vips")


def test_openslide_on_png_is_refused(tmp_path):
    from PIL import Image

    path = tmp_path / "he.png"
    Image.fromarray(_smooth(40, 50)).save(path)
    assert open_slide(path, mpp=0.5).backend == "pillow"
    with pytest.raises(StmapInputError, match="OpenSlide does not read .png"):
        open_slide(path, backend="openslide")


def test_missing_openslide_names_the_extra(tmp_path, monkeypatch, generic_tiff):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\n")
    with pytest.raises(StmapInputError, match=r'pip install "napari-stmap\[openslide\]"'):
        open_slide(path)
    with pytest.raises(StmapInputError, match=r'pip install "napari-stmap\[openslide\]"'):
        open_slide(generic_tiff[0], backend="openslide")
    assert open_slide(generic_tiff[0]).backend == "tifffile"  # auto still reads TIFF


def test_truncated_generic_tiff_stays_a_tifffile_error(generic_tiff, tmp_path):
    """auto: tifffile's clear error when OpenSlide cannot read the file either."""
    raw = generic_tiff[0].read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(StmapInputError, match="truncated|corrupt|cannot") as err:
        open_slide(path)
    assert "\n" not in str(err.value)


# --- composite, threads, pickling, closing ---------------------------------------------------


def test_transparent_pixels_over_background():
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    white = os_mod._background(None)
    out = os_mod._over_background(rgba, white)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [227, 177, 127]  # (c·128 + 255·127) / 255, rounded
    grey = os_mod._background("E0E0E0")
    assert os_mod._over_background(rgba, grey)[0, 1].tolist() == [224, 224, 224]


def test_threads_share_one_handle(generic_tiff):
    path, written = generic_tiff
    s = open_slide(path, backend="openslide")
    small = s.levels[0].rechunk((96, 128, 3))  # 176 blocks, read by 8 threads at once
    with dask.config.set(scheduler="threads", num_workers=8):
        np.testing.assert_array_equal(small.compute(), written[0])


def test_levels_pickle_and_reopen(generic_tiff):
    path, written = generic_tiff
    s = open_slide(path, backend="openslide")
    again = pickle.loads(pickle.dumps(s.levels[1]))
    np.testing.assert_array_equal(again.compute(scheduler="sync"), written[1])


def test_handle_closed_when_slide_is_collected(generic_tiff):
    s = open_slide(generic_tiff[0], backend="openslide")
    osr = _openslide_level(s.levels[0]).handle.get()
    ref = weakref.ref(osr)
    del osr, s
    gc.collect()
    assert ref() is None  # OpenSlide closes its handle when the object goes


def test_auto_vendor_rule(monkeypatch, generic_tiff):
    """The vendors tifffile cannot lay out go to OpenSlide (Philips, Leica, Ventana, Trestle)."""
    assert {"philips", "leica", "ventana", "trestle"} == set(os_mod.OPENSLIDE_VENDORS)
    monkeypatch.setattr(slide_mod, "_detect_vendor", lambda path: "philips")
    assert open_slide(generic_tiff[0]).backend == "openslide"
    monkeypatch.setattr(slide_mod, "_detect_vendor", lambda path: "aperio")
    assert open_slide(generic_tiff[0]).backend == "tifffile"


# --- the command line ------------------------------------------------------------------------


def test_stmap_info_backend_openslide_process(generic_tiff):
    path = generic_tiff[0]
    cmd = [sys.executable, "-m", "napari_stmap.cli", "info", str(path), "--json"]
    proc = subprocess.run([*cmd, "--backend", "openslide"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "openslide" and info["mpp_source"] == "openslide"
    assert info["shape_yx"] == [1024, 1536] and info["mpp"] == pytest.approx(0.25)
    bad = subprocess.run([*cmd, "--backend", "vips"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "backend='vips'" in bad.stderr
