"""Architecture contracts: core/ never imports napari or Qt; the package imports light."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import napari_stmap.core as core_pkg

GUI_MODULES = (
    "napari",
    "qtpy",
    "magicgui",
    "superqt",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "vispy",
)
HEAVY_MODULES = ("torch", "timm", "dask", "napari", "zarr", "anndata")


def _loaded_after(code: str) -> set[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_core_imports_no_gui():
    modules = [m.name for m in pkgutil.walk_packages(core_pkg.__path__, "napari_stmap.core.")]
    assert "napari_stmap.core.io.slide" in modules
    code = "\n".join(f"import {m}" for m in modules)
    loaded = _loaded_after(code)
    assert not loaded.intersection(GUI_MODULES), loaded.intersection(GUI_MODULES)


def test_package_import_is_light():
    loaded = _loaded_after("import napari_stmap, napari_stmap._reader, napari_stmap._sample_data")
    assert not loaded.intersection(HEAVY_MODULES), loaded.intersection(HEAVY_MODULES)


def test_cli_import_is_light():
    loaded = _loaded_after("import napari_stmap.cli")
    assert not loaded.intersection(HEAVY_MODULES)


def test_manifest_validates():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-stmap"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
