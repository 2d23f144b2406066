"""Shared fixtures.

Real data lives in ``../shared/data`` next to the checkout (or ``$STMAP_SHARED_DATA``); tests
that use it skip cleanly when it is absent, as on a user's fresh clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STMAP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data``; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """A small synthetic sample (400 × 300 µm at 0.5 µm/px, 2/8/16 µm bins), made once."""
    from napari_stmap.core.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "sample"
    return write_synthetic(root, size_um=(400.0, 300.0), mpp=0.5, n_genes=24, seed=3)


@pytest.fixture(scope="session")
def slide(small_sample):
    """The small sample's slide, opened once (600 × 800 px at 0.5 µm/px)."""
    from napari_stmap.core.io.slide import open_slide

    return open_slide(small_sample.slide)


@pytest.fixture(scope="session")
def make_model_file(small_sample, tmp_path_factory):
    """``make_model_file(n_genes)``: a random-init pixnet_tiny (seed 0) on the sample's first
    ``n_genes`` genes, saved once per ``n_genes`` as a model file."""
    made: dict[int, Path] = {}

    def make(n_genes: int) -> Path:
        if n_genes not in made:
            import torch

            from napari_stmap.core.model import create_model, save_model

            torch.manual_seed(0)
            model = create_model("pixnet_tiny", genes=list(small_sample.genes[:n_genes]))
            made[n_genes] = tmp_path_factory.mktemp("model") / f"tiny{n_genes}.safetensors"
            save_model(model.eval(), made[n_genes])
        return made[n_genes]

    return make


@pytest.fixture(scope="session")
def tiny_model(make_model_file) -> Path:
    """A random-init pixnet_tiny on 5 of the sample's genes, as a model file."""
    return make_model_file(5)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread (no OpenMP barriers on a shared CPU)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def docks(make_napari_viewer, tmp_path):
    """A viewer (napari's own test fixture: plugins registered once, leaks checked) with the
    five docks opened the way napari's Plugins menu opens them."""
    from napari_stmap._widgets._session import get_session

    viewer = make_napari_viewer()
    out = {"viewer": viewer}
    for key, name in [
        ("data", "Slide & data"),
        ("predict", "Predict"),
        ("genes", "Genes"),
        ("regions", "Regions"),
        ("compare", "Compare"),
    ]:
        _dock, out[key] = viewer.window.add_plugin_dock_widget("napari-stmap", name)
    session = get_session(viewer)
    assert all(out[k].session is session for k in ("data", "predict", "genes", "regions"))
    session.store_root = tmp_path / "stores"
    out["session"] = session
    yield out
    session.close()
    viewer.close()
