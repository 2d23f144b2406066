"""Fixtures of the cell tests: a prediction store of the small sample and its nuclei."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cell_store(tmp_path_factory, small_sample, tiny_model):
    """The small sample predicted by the tiny model (a complete store)."""
    from napari_stmap.core.predict import predict_slide

    out = tmp_path_factory.mktemp("cells_pred") / "pred.zarr"
    predict_slide(small_sample.slide, tiny_model, out, batch_size=4)
    return out


@pytest.fixture(scope="session")
def nuclei(slide):
    """The built-in segmentation of the whole small sample, (600, 800) int32 labels."""
    from napari_stmap.core.cells import segment_nuclei

    return np.asarray(segment_nuclei(slide).array)


@pytest.fixture
def source(cell_store):
    from napari_stmap.core.predict import StoreSource

    return StoreSource(cell_store, background=0.0)
