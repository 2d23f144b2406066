"""Model package: registry, PixNet/SpotNet contracts, exact tiling, model files, timm import."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import napari_stmap
from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.model import _torchvision_compat as compat
from napari_stmap.core.model import (
    create_model,
    list_models,
    load_model,
    read_model_metadata,
    save_model,
)

GENES = ["EPCAM", "ERBB2", "CD3E"]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("pixnet_tiny", genes=GENES).eval()


@pytest.fixture(scope="module")
def tiny_spot() -> torch.nn.Module:
    torch.manual_seed(1)
    return create_model("spotnet_tiny", genes=GENES).eval()


# --- registry -------------------------------------------------------------------------------


def test_unknown_arch_lists_valid_names():
    with pytest.raises(StmapInputError, match="valid names: .*pixnet.*spotnet"):
        create_model("unet9000", genes=GENES)
    assert {"pixnet", "spotnet"} <= set(list_models())


def test_unknown_option_and_bad_genes_are_refused():
    with pytest.raises(StmapInputError, match="unknown pixnet option"):
        create_model("pixnet_tiny", genes=GENES, n_layers=3)
    with pytest.raises(StmapInputError, match="unique"):
        create_model("pixnet_tiny", genes=["A", "A"])
    with pytest.raises(StmapInputError, match="unknown timm encoder"):
        create_model("pixnet", genes=GENES, encoder="not_a_timm_model")


# --- PixNet ---------------------------------------------------------------------------------


def test_pixnet_contract_shapes_and_attributes(tiny):
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        e = tiny.embed(x)
        y = tiny.head(e)
        assert torch.equal(tiny(x), y)
    assert e.shape == (2, tiny.embed_dim, 16, 24)
    assert y.shape == (2, len(GENES) + 1, 16, 24)
    assert (y >= 0).all()
    assert tiny.output_names == (*GENES, "total")
    assert (tiny.arch, tiny.input_kind, tiny.stride, tiny.mpp) == ("pixnet", "dense", 4, 0.5)
    assert tiny.normalisation == "log1p_cp10k"
    assert tiny.halo_px % tiny.align_px == 0 and tiny.halo_px >= tiny.receptive_field_px
    json.dumps(tiny.config)  # JSON-safe


def test_pixnet_refuses_unaligned_input(tiny):
    with pytest.raises(StmapInputError, match="multiples of 16"):
        tiny.embed(torch.rand(1, 3, 64, 72))


def test_preprocess_accepts_uint8_hwc(tiny):
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = tiny.preprocess(img)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert float(x.max()) <= 1.0
    np.testing.assert_allclose(x[1, 2].numpy(), img[1, :, :, 2] / 255.0, rtol=1e-6)


def test_gradients_reach_encoder_decoder_and_head():
    torch.manual_seed(0)  # full-depth test_resnet: stride 32, three decoder stages
    widths = {"decoder_channels": [16] * 3, "attn_windows": [3] * 3, "head_dim": 8}
    model = create_model("pixnet", genes=GENES, encoder="test_resnet", **widths)
    assert model.align_px == 32 and len(model.decoder.blocks) == 3
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    groups = {"encoder": model.encoder, "decoder": model.decoder, "head": model.head_}
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    for block in model.decoder.blocks:
        assert float(block.attn.qkv.weight.grad.abs().sum()) > 0


def _tile_output(model, big, y0, x0, size):
    """Predict the output block of input [y0, y0+size) × [x0, x0+size) from a haloed tile."""
    h, s = model.halo_px, model.stride
    ya, xa = max(0, y0 - h), max(0, x0 - h)
    yb, xb = min(big.shape[-2], y0 + size + h), min(big.shape[-1], x0 + size + h)
    out = model(big[..., ya:yb, xa:xb])
    oy, ox = (y0 - ya) // s, (x0 - xa) // s
    return out[..., oy : oy + size // s, ox : ox + size // s]


def test_tiles_with_halo_equal_one_big_pass(tiny):
    torch.manual_seed(2)
    big = torch.rand(1, 3, 320, 352)
    s = tiny.stride
    assert tiny.halo_px == 96  # keeps this test small; an interior tile needs 2 × 96 px of context
    with torch.no_grad():
        full = tiny(big)
        # interior tile, tile at the slide's top-left corner, tile at its bottom-right corner
        for y0, x0, size in [(112, 128, 64), (0, 0, 48), (320 - 64, 352 - 80, 64)]:
            got = _tile_output(tiny, big, y0, x0, size)
            want = full[..., y0 // s : (y0 + size) // s, x0 // s : (x0 + size) // s]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_context_branch_widens_the_embedding_and_keeps_tiling_exact():
    torch.manual_seed(3)
    m = create_model("pixnet_tiny", genes=GENES, context_channels=8, context_window=3).eval()
    plain = create_model("pixnet_tiny", genes=GENES).eval()
    assert m.embed_dim == plain.embed_dim + 8
    # 3 × 3 cells of 16 px around each pixel plus the bilinear step: a wider field than without
    assert m.halo_px > plain.halo_px
    big = torch.rand(1, 3, 384, 416)
    s = m.stride
    with torch.no_grad():
        full = m(big)
        e = m.embed(big)
        assert e.shape[1] == m.embed_dim
        torch.testing.assert_close(m.head(e), full)
        for y0, x0, size in [(160, 176, 64), (0, 0, 48), (384 - 64, 416 - 80, 64)]:
            got = _tile_output(m, big, y0, x0, size)
            want = full[..., y0 // s : (y0 + size) // s, x0 // s : (x0 + size) // s]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    x = torch.rand(1, 3, 416, 416, requires_grad=True)
    m(x)[0, :, 208 // s, 208 // s].sum().backward()
    rows, cols = np.nonzero(x.grad.abs().sum(1)[0].numpy())
    assert rows.min() >= 208 - m.halo_px and rows.max() <= 208 + s - 1 + m.halo_px
    assert cols.min() >= 208 - m.halo_px and cols.max() <= 208 + s - 1 + m.halo_px


def test_halo_bounds_the_measured_receptive_field(tiny):
    x = torch.rand(1, 3, 320, 320, requires_grad=True)
    c = 160 // tiny.stride
    tiny(x)[0, :, c, c].sum().backward()
    rows, cols = np.nonzero(x.grad.abs().sum(1)[0].numpy())
    footprint = (160, 160 + tiny.stride - 1)
    assert rows.min() >= footprint[0] - tiny.halo_px and rows.max() <= footprint[1] + tiny.halo_px
    assert cols.min() >= footprint[0] - tiny.halo_px and cols.max() <= footprint[1] + tiny.halo_px


def test_local_attention_matches_a_naive_loop():
    from napari_stmap.core.model.pixnet import LocalAttention2d

    torch.manual_seed(0)
    att = LocalAttention2d(8, window=3, head_dim=4).double()
    torch.nn.init.normal_(att.pos_bias)
    x = torch.randn(2, 8, 5, 6, dtype=torch.double)
    q, k, v = att.qkv(att.norm(x)).chunk(3, dim=1)
    out = torch.zeros_like(q)
    for i, j, hd in np.ndindex(5, 6, att.heads):
        c = slice(4 * hd, 4 * hd + 4)
        nbrs = [(i + dy, j + dx, 3 * (dy + 1) + dx + 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        nbrs = [(a, b, o) for a, b, o in nbrs if 0 <= a < 5 and 0 <= b < 6]  # masked outside
        logits = torch.stack(
            [
                (q[:, c, i, j] * k[:, c, a, b]).sum(1) * att.scale + att.pos_bias[hd, o]
                for a, b, o in nbrs
            ],
            1,
        )
        vals = torch.stack([v[:, c, a, b] for a, b, _ in nbrs], 1)
        out[:, c, i, j] = (torch.softmax(logits, 1)[..., None] * vals).sum(1)
    torch.testing.assert_close(att(x), x + att.proj(out))


def test_head_rows_match_head_in_numpy(tiny):
    with torch.no_grad():
        e = tiny.embed(torch.rand(1, 3, 64, 64))
        want = tiny.head(e)[0, [1, len(GENES)]].numpy()
    w, b = tiny.head_rows(["ERBB2", "total"])
    assert w.shape == (2, tiny.embed_dim) and b.shape == (2,)
    z = np.einsum("kd,dhw->khw", w, e[0].numpy()) + b[:, None, None]
    np.testing.assert_allclose(np.logaddexp(0.0, z), want, rtol=1e-5, atol=1e-6)


def test_halo_override_is_aligned_and_reported():
    model = create_model("pixnet_tiny", genes=GENES, halo_px=40)
    assert model.halo_px == 48 and not model.exact_tiling
    assert model.config["halo_px"] == 40


def test_head_bias_starts_at_prior():
    prior = [0.05, 0.2, 1.0, 3.0]
    model = create_model("pixnet_tiny", genes=GENES, init_counts_per_px=prior).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))
    np.testing.assert_allclose(y.mean(dim=(0, 2, 3)).numpy(), prior, rtol=0.1)


def test_vit_encoder_works_and_is_flagged_inexact():
    model = create_model(
        "pixnet", genes=GENES, encoder="test_vit", decoder_channels=[16, 16], head_dim=8
    )
    with torch.no_grad():
        y = model.eval()(torch.rand(1, 3, 64, 96))
    assert y.shape == (1, len(GENES) + 1, 16, 24)
    assert model.align_px == 16 and not model.exact_tiling


# --- SpotNet --------------------------------------------------------------------------------


def test_spotnet_contract(tiny_spot):
    assert tiny_spot.input_kind == "spot" and tiny_spot.crop_px == 64
    assert create_model("spotnet", genes=GENES, encoder="test_resnet").crop_px == 224
    with torch.no_grad():
        e = tiny_spot.embed(torch.rand(3, 3, 64, 64))
        y = tiny_spot.head(e)
    assert e.shape == (3, tiny_spot.embed_dim)
    assert y.shape == (3, len(GENES) + 1) and (y >= 0).all()
    with pytest.raises(StmapInputError, match="64 × 64"):
        tiny_spot.embed(torch.rand(1, 3, 32, 32))


# --- model files ----------------------------------------------------------------------------


def test_round_trip_is_exact(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    extra = {"training": {"slides": ["C2", "C3"], "epochs": 1}, "metrics": {"pcc_m": 0.25}}
    save_model(tiny, path, metadata=extra)
    loaded = load_model(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))
    meta = read_model_metadata(path)
    assert meta == loaded.metadata
    assert meta["training"] == extra["training"] and meta["metrics"] == extra["metrics"]
    assert meta["napari_stmap_version"] == napari_stmap.__version__
    for key in ("arch", "genes", "mpp", "stride", "halo_px", "normalisation", "encoder"):
        assert meta[key] == tiny.describe()[key], key
    assert (loaded.genes, loaded.halo_px, loaded.config) == (tiny.genes, tiny.halo_px, tiny.config)


def test_spotnet_round_trip(tiny_spot, tmp_path):
    path = tmp_path / "spot.safetensors"
    save_model(tiny_spot, path)
    loaded = load_model(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_spot(x))
    assert loaded.crop_px == tiny_spot.crop_px


def test_read_metadata_needs_no_torch(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny, path)
    code = (
        "import sys; from napari_stmap.core.model import read_model_metadata; "
        f"m = read_model_metadata({str(path)!r}); "
        "print(m['arch'], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["pixnet", "False"]


class _Evil:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "name", ["model.pt", "model.ckpt", "disguised.safetensors", "zip.safetensors"]
)
def test_pickles_are_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    if name.startswith("zip"):
        torch.save({"state_dict": _Evil(marker)}, path)  # torch's zip format
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    for reader in (load_model, read_model_metadata):
        with pytest.raises(
            StmapInputError, match="is a pickle; napari-stmap only loads .safetensors"
        ):
            reader(path)
    assert not marker.exists()


def test_garbage_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model at all")
    with pytest.raises(StmapInputError, match="not a safetensors model file"):
        load_model(junk)
    with pytest.raises(StmapInputError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_newer_format_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "future.safetensors"
    meta = {"format_version": 99, "napari_stmap_version": "9.9.0", "arch": "pixnet"}
    save_file(
        {"w": np.zeros(1, np.float32)}, str(path), metadata={"napari_stmap": json.dumps(meta)}
    )
    with pytest.raises(StmapInputError) as info:
        load_model(path)
    msg = str(info.value)
    assert "napari-stmap 9.9.0" in msg and f"this napari-stmap {napari_stmap.__version__}" in msg
    assert msg.endswith("upgrade napari-stmap") and "\n" not in msg


def test_metadata_may_not_override_reserved_keys(tiny, tmp_path):
    with pytest.raises(StmapInputError, match="written by napari-stmap"):
        save_model(tiny, tmp_path / "m.safetensors", metadata={"genes": ["X"]})


# --- encoder weights ------------------------------------------------------------------------


def test_local_safetensors_encoder_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    timm = compat.import_timm()
    src = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_model("pixnet_tiny", genes=GENES, encoder_weights=path)
    got = model.encoder.model.state_dict()["conv1.0.weight"]
    assert torch.equal(got, src.state_dict()["conv1.0.weight"])
    assert model.config["encoder_weights"] == str(path)


def test_checkpoint_for_another_model_warns(tmp_path, caplog):
    from safetensors.torch import save_file

    src = compat.import_timm().create_model("test_resnet", pretrained=False)
    path = tmp_path / "partial.safetensors"
    state = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("conv1")}
    save_file(state, str(path))
    with caplog.at_level("WARNING", logger="napari_stmap"):
        create_model("pixnet_tiny", genes=GENES, encoder_weights=path)
    assert "missing keys" in caplog.text and "conv1.0.weight" in caplog.text


def test_pickled_encoder_weights_need_allow_pickle(tmp_path):
    path = tmp_path / "enc.pth"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(StmapInputError, match="allow_pickle=True"):
        create_model("pixnet_tiny", genes=GENES, encoder_weights=path)


# --- torchvision workaround -----------------------------------------------------------------


@pytest.fixture
def fake_import(monkeypatch):
    """Replace the real import with a scripted one; record what the workaround does."""
    calls = {"register": 0, "purge": 0}
    monkeypatch.setattr(
        compat,
        "_register_placeholder_ops",
        lambda: calls.__setitem__("register", calls["register"] + 1),
    )
    monkeypatch.setattr(
        compat, "_purge_modules", lambda pkgs: calls.__setitem__("purge", calls["purge"] + 1)
    )

    def script(*outcomes):
        seq = list(outcomes)

        def _import(name):
            result = seq.pop(0)
            if isinstance(result, BaseException):
                raise result
            return result

        monkeypatch.setattr(compat, "_import_module", _import)
        return calls

    return script


def test_workaround_inactive_when_timm_imports(fake_import):
    fake_timm = types.ModuleType("timm")
    calls = fake_import(fake_timm)
    assert compat.import_timm() is fake_timm
    assert calls == {"register": 0, "purge": 0}


def test_workaround_runs_only_after_the_nms_error(fake_import):
    fake_timm = types.ModuleType("timm")
    calls = fake_import(RuntimeError("operator torchvision::nms does not exist"), fake_timm)
    assert compat.import_timm() is fake_timm
    assert calls == {"register": 1, "purge": 1}


def test_other_import_errors_propagate(fake_import):
    calls = fake_import(RuntimeError("CUDA driver too old"))
    with pytest.raises(RuntimeError, match="CUDA driver"):
        compat.import_timm()
    assert calls == {"register": 0, "purge": 0}


def test_real_timm_import():
    timm = compat.import_timm()
    assert hasattr(timm, "create_model")
    if compat.placeholder_ops_registered():  # this environment has the mismatched wheel
        assert hasattr(torch.ops.torchvision, "nms")
