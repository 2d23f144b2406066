"""napari's plugin path for slides read through OpenSlide, and the reader's list of types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

pytest.importorskip("napari")
openslide = pytest.importorskip("openslide")

from napari_stmap._reader import napari_get_reader  # noqa: E402
from napari_stmap.core.io.slide import SUPPORTED_SUFFIXES  # noqa: E402

PLUGIN = "napari-stmap"
MANIFEST = Path(__file__).resolve().parents[2] / "src/napari_stmap/napari.yaml"
SVS = Path(__file__).resolve().parents[3] / "shared/data/formats/slides/CMU-1-Small-Region.svs"


def _trestle_tiff(path: Path) -> list[np.ndarray]:
    """A Trestle TIFF (Software MedScan, no tile overlaps, 0.5 µm/px in XResolution), 3 levels."""
    data = np.random.default_rng(5).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    levels = [data, data[::2, ::2], data[::4, ::4]]
    desc = "Background Color=FFFFFF;Objective Power=20;OverlapsXY=0 0 0 0 0 0;"
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tw.write(
                lvl,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolution=(0.5, 0.5),
                software="MedScan",
                description=desc if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    return levels


def test_manifest_lists_every_slide_type():
    manifest = yaml.safe_load(MANIFEST.read_text())
    (reader,) = manifest["contributions"]["readers"]
    patterns = set(reader["filename_patterns"])
    missing = [s for s in SUPPORTED_SUFFIXES if f"*{s}" not in patterns]
    assert not missing
    for suffix in (".mrxs", ".ndpi", ".scn", ".vms", ".vmu", ".bif"):
        assert f"*{suffix}" in patterns


@pytest.mark.parametrize("name", ["a.mrxs", "a.ndpi", "a.scn", "a.vms", "a.vmu", "a.bif"])
def test_reader_claims_vendor_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"x")
    assert napari_get_reader(str(path)) is not None


def test_reader_leaves_non_slide_dicom(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert napari_get_reader(str(path)) is None


def test_viewer_opens_trestle_through_openslide(make_napari_viewer, tmp_path):
    path = tmp_path / "trestle.tif"
    written = _trestle_tiff(path)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    assert layer.rgb and layer.multiscale
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.metadata["stmap"]["mpp_source"] == "openslide"
    for k, lvl in enumerate(written):
        np.testing.assert_array_equal(np.asarray(layer.data[k]), lvl)


@pytest.mark.skipif(not SVS.is_file(), reason="needs ../shared/data/formats/slides (CMU-1 SVS)")
def test_viewer_opens_the_svs(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(SVS), plugin=PLUGIN)
    assert layer.rgb and tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.data[0].shape == (2967, 2220, 3)
