"""A bin model (MagNet) in the viewer: bins of the view, raster heatmaps, compare, regions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TIMEOUT_MS = 120_000
GENES = 6


@pytest.fixture(scope="module")
def magnet_file(small_sample, tmp_path_factory):
    """A random-init magnet_tiny on 6 of the sample's genes, 'trained' on 16 µm bins."""
    from napari_stmap.core.model import create_model, save_model

    torch.manual_seed(0)
    model = create_model("magnet_tiny", genes=list(small_sample.genes[:GENES]))
    path = tmp_path_factory.mktemp("magnet") / "magnet.safetensors"
    save_model(model, path, metadata={"training": {"spot_area_um2": 256.0}})
    return path


# ----------------------------------------------------------------------------- core
def test_bin_lattice_and_prediction(small_sample, magnet_file):
    from napari_stmap.core.io.slide import open_slide
    from napari_stmap.core.model import load_model
    from napari_stmap.core.predict import (
        DEFAULT_BIN_UM,
        PredictionCancelled,
        bin_lattice,
        model_bin_um,
        predict_bin_region,
    )

    c = bin_lattice((0, 0, 100, 70), 32.0, shape_yx=(100, 70))
    assert c.tolist() == [[16, 16], [16, 48], [48, 16], [48, 48], [80, 16], [80, 48]]
    assert len(bin_lattice((20, 20, 40, 40), 32.0)) == 0  # no centre inside
    assert (
        model_bin_um({}) == DEFAULT_BIN_UM
        and model_bin_um({"training": {"spot_area_um2": 64}}) == 8
    )
    model, slide = load_model(magnet_file), open_slide(small_sample.slide)
    box = (40.0, 60.0, 200.0, 180.0)  # level-0 px: 5 × 4 bins of 32 px (16 µm)
    pred = predict_bin_region(model, slide, box)
    assert pred.bin_um == 16.0 and pred.n == 20 and pred.counts.shape == (20, GENES + 1)
    assert np.all(pred.counts >= 0)
    raster, grid = pred.raster()
    assert raster.shape == (GENES + 1, 5, 4) and grid.pixel_px == 32.0
    assert grid.translate_yx == (48.0, 80.0)  # centre of the first bin
    gene = pred.genes[0]
    norm = pred.values(gene)
    expect = np.log1p(1e4 * pred.counts[:, 0] / pred.counts[:, -1])
    np.testing.assert_allclose(norm, expect, rtol=1e-6)
    r, _ = pred.gene_raster(gene, "absolute")
    np.testing.assert_allclose(r.ravel(), pred.counts[:, 0], rtol=1e-6)  # row-major lattice
    # merging: the union of both lattices, the newer prediction wins where both have a bin
    more = predict_bin_region(model, slide, (40.0, 124.0, 104.0, 244.0))
    both = pred.merged(more)
    assert both.n == 20 + 4
    with pytest.raises(PredictionCancelled):
        predict_bin_region(model, slide, box, cancelled=lambda: True)
    # region sums: a footprint equal to 2 whole bins
    from napari_stmap.core.geometry import Rectangle

    sums = pred.region_sums([Rectangle(32.0, 64.0, 64.0, 128.0)])
    np.testing.assert_allclose(sums[0], pred.counts[:2].sum(axis=0), rtol=1e-5)


# ----------------------------------------------------------------------------- viewer
@pytest.fixture
def errors(monkeypatch):
    import napari.utils.notifications as notes

    seen: list[str] = []
    monkeypatch.setattr(notes, "show_error", lambda msg: seen.append(str(msg)))
    return seen


def _wait(qtbot, worker) -> None:
    if worker is not None and worker is not True:
        qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT_MS)


def test_magnet_in_the_viewer(docks, qtbot, small_sample, magnet_file, errors):
    from napari_stmap._widgets._viewer import camera_of, viewport_bbox_px
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.model import load_model
    from napari_stmap.core.predict import predict_bin_region

    viewer, session, data = docks["viewer"], docks["session"], docks["data"]
    _wait(qtbot, data.load_slide(small_sample.slide))
    qtbot.waitUntil(lambda: session.slide is not None, timeout=TIMEOUT_MS)
    _wait(qtbot, data.load_spots(small_sample.outs, bin_um=16.0))
    qtbot.waitUntil(lambda: session.spots is not None, timeout=TIMEOUT_MS)
    assert data.load_model(magnet_file) and session.is_bins
    viewer.reset_view()
    cam = camera_of(viewer)
    cam.center = (0.0, 100.0, 120.0)[-len(cam.center) :]
    cam.zoom = cam.zoom * 4  # a small part of the slide
    box = viewport_bbox_px(viewer, session.mpp, session.slide.shape_yx)
    assert box is not None and (box[2] - box[0]) * (box[3] - box[1]) < 0.5 * np.prod(
        session.slide.shape_yx
    )

    # predict the view: a worker, the result kept in the session
    docks["predict"].predict_view()
    qtbot.waitUntil(lambda: session.bins is not None, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: docks["predict"].bins_worker is None, timeout=TIMEOUT_MS)
    model = load_model(magnet_file)
    expect = predict_bin_region(model, session.slide, box)
    bins = session.bins
    assert bins.n == expect.n > 0 and bins.bin_um == 16.0
    np.testing.assert_allclose(bins.centers_yx, expect.centers_yx)
    np.testing.assert_allclose(bins.counts, expect.counts, rtol=1e-4, atol=1e-6)

    # a raster heatmap in µm, values from the stored counts
    genes = docks["genes"]
    gene = session.model_genes[1]
    genes.add_gene(gene)
    layer = viewer.layers[f"stmap: {gene}"]
    raster, grid = expect.gene_raster(gene, "normalised")
    assert layer.data.shape == raster.shape and not layer.multiscale
    np.testing.assert_allclose(layer.scale[-2:], (16.0, 16.0))
    np.testing.assert_allclose(layer.translate[-2:], np.array(grid.translate_yx) * session.mpp)
    np.testing.assert_allclose(layer.data, raster, rtol=1e-4, atol=1e-6, equal_nan=True)
    genes.set_mode("absolute")
    raster_abs, _ = expect.gene_raster(gene, "absolute")
    np.testing.assert_allclose(layer.data, raster_abs, rtol=1e-4, atol=1e-6, equal_nan=True)
    other = session.model_genes[2]
    genes.search.setText(other)
    genes.switch_gene(other)  # no network run: the raster comes from the stored counts
    assert f"stmap: {other}" in viewer.layers and f"stmap: {gene}" not in viewer.layers

    # regions: sums of the bin prediction
    regions = docks["regions"]
    shapes = regions.regions_layer()
    y0, x0 = bins.centers_yx.min(axis=0) - bins.bin_px / 2
    rect = np.array([[y0, x0], [y0, x0 + 64], [y0 + 64, x0 + 64], [y0 + 64, x0]])
    shapes.add_rectangles(rect)
    regions._debounce.stop()
    worker = regions.recompute()
    _wait(qtbot, worker)
    qtbot.waitUntil(lambda: regions.table_data is not None, timeout=TIMEOUT_MS)
    first = np.all(bins.centers_yx < [y0 + 64, x0 + 64], axis=1)
    np.testing.assert_allclose(
        regions.table_data.counts[0], bins.counts[first].sum(axis=0), rtol=1e-5
    )

    # compare: stmap evaluate's numbers with the same model
    compare = docks["compare"]
    compare.set_scales([16.0])
    compare.run()
    qtbot.waitUntil(lambda: compare.data is not None, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: compare._worker is None, timeout=TIMEOUT_MS)
    measured = load_measured(small_sample.outs, scales_um=[16.0], slide=session.slide)
    cli = evaluate_measured(model, session.slide, measured, [16.0])
    got = compare.data.result
    for key in ("pcc_f", "pcc_s", "pcc_m", "n_spots", "n_genes"):
        assert got["scales"]["16"][key] == pytest.approx(cli["scales"]["16"][key], rel=1e-4)
    assert got["model"]["input_kind"] == "bins"
    assert not errors, errors
