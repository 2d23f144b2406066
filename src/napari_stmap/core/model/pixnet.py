"""PixNet: dense expression maps from H&E (after Pan, Zhang & Yang, arXiv 2503.01347).

Wiring (segmentation_models.pytorch style, by ``out_channels``)::

    image (B, 3, H, W) in [0, 1]
      -> TimmEncoder            feature pyramid, strides r_i (px)
      -> FusionDecoder          U-Net of separable attention fusion blocks, up to ``stride``
      -> embedding (B, D, H/s, W/s)
      -> PointwiseHead          1×1 conv + softplus -> (B, G + 1, H/s, W/s) expected counts

Each :class:`FusionBlock` (one per ×2 upsampling) does, at the finer resolution:

1. concat(upsampled input, encoder skip) -> 1×1 conv -> LayerNorm (the 1×1 is applied before
   the bilinear upsampling, which is mathematically identical and 4× cheaper);
2. separable conv residual: x + LayerNorm(1×1(SiLU(depthwise 3×3(x))));
3. local attention residual: x + 1×1(attention(Q, K, V)) where each pixel attends only to the
   k × k pixels around it (neighbourhood attention). The paper's fusion block uses
   attention too; it is local here so that a tile with a finite halo gives exactly the same
   output as one big forward pass (the engine's seamless-tiling contract). By default the
   finest stage (stride 4) has none: there it would cost as much as the rest of the decoder.

The block order (fusion before the separable conv, rather than after) keeps the depthwise conv
at the finer resolution, which shrinks the receptive field and hence the halo.

``halo_px`` is the receptive-field radius of the whole network (encoder + decoder) in input px,
measured by :func:`~napari_stmap.core.model.encoder.receptive_field` (an upper bound) and
rounded up to a multiple of ``align_px`` (the encoder's max stride). Pass ``halo_px=`` to
override it (smaller halos are faster but no longer exact).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_stmap.core.errors import StmapInputError

from .base import BASE_OPTIONS, StmapModel
from .encoder import receptive_field
from .heads import PointwiseHead
from .registry import register_presets

__all__ = [
    "PIXNET_DEFAULT_CONFIG",
    "PIXNET_TINY_CONFIG",
    "FusionBlock",
    "FusionDecoder",
    "LayerNorm2d",
    "LocalAttention2d",
    "PixNet",
    "SepConvResidual",
]

_logger = logging.getLogger(__name__)

#: Default for real use: ResNet-18 encoder, light decoder, 2 µm output pixels at 0.5 µm/px.
#: The decoder then defaults to widths (128, 64, 64) and attention windows (7, 5, 0) at strides
#: (16, 8, 4) px: no attention at the finest stage, where it would cost as much as the rest of
#: the decoder together (``attn_windows=[7, 5, 3]`` turns it on).
PIXNET_DEFAULT_CONFIG: dict[str, Any] = {"encoder": "resnet18", "stride": 4}
#: Tiny random-init config for tests: timm's ``test_resnet`` cut after its stride-16 stage
#: (~0.1 M parameters), so tiles align to 16 px and the halo is small (96 px).
PIXNET_TINY_CONFIG: dict[str, Any] = {
    "encoder": "test_resnet",
    "encoder_out_indices": [0, 1, 2, 3],
    "stride": 4,
    "decoder_channels": [16, 16],
    "attn_windows": [3, 3],
    "head_dim": 8,
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of (B, C, H, W); free of copies for channels_last tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class UpsampleBy(nn.Module):
    """Bilinear ×``factor`` upsampling (align_corners=False); reads 1 input px around each pixel."""

    rf_radius = 1

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = int(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        return F.interpolate(
            x, scale_factor=float(self.factor), mode="bilinear", align_corners=False
        )


class SepConvResidual(nn.Module):
    """x + LayerNorm(1×1(SiLU(depthwise 3×3(x)))); (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.act = nn.SiLU()
        self.pw = nn.Conv2d(channels, channels, 1)
        self.norm = LayerNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.pw(self.act(self.dw(x))))


class LocalAttention2d(nn.Module):
    """Neighbourhood attention with a residual: each pixel attends to its k × k neighbours.

    Parameters
    ----------
    channels : int
        C of the (B, C, H, W) input and output.
    window : int
        Odd k: the attended window is k × k pixels centred on the query pixel.
    head_dim : int
        Channels per head (heads = max(1, C // head_dim)).

    Notes
    -----
    Keys outside the image are masked (not zero-padded), so the output at the border of the
    whole slide is a proper attention over the pixels that exist. A learned bias per head and
    relative offset gives the attention a sense of position. Implemented with k² shifted views
    (no unfolded k²-times copy of K and V), so memory stays O(B·C·H·W).
    """

    def __init__(self, channels: int, window: int = 7, head_dim: int = 32) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            msg = f"attention window must be an odd number of pixels (or 0: none), got {window}"
            raise StmapInputError(msg)
        self.window = int(window)
        self.rf_radius = self.window // 2
        self.heads = max(1, channels // head_dim)
        self.scale = (channels // self.heads) ** -0.5
        self.norm = LayerNorm2d(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.pos_bias = nn.Parameter(torch.zeros(self.heads, self.window**2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Work in (B, H, W, heads, d) so every reduction runs over a contiguous axis; for a
        # channels_last input the permutes are free.
        q, k, v = self.qkv(self.norm(x)).permute(0, 2, 3, 1).chunk(3, dim=-1)
        h, w, r = q.shape[1], q.shape[2], self.rf_radius
        q, kp, vp = (
            t.contiguous().unflatten(-1, (self.heads, -1))
            for t in (q, F.pad(k, (0, 0, r, r, r, r)), F.pad(v, (0, 0, r, r, r, r)))
        )
        shifts = [
            (slice(None), slice(dy, dy + h), slice(dx, dx + w))
            for dy in range(self.window)
            for dx in range(self.window)
        ]
        q = q * self.scale
        logits = torch.stack([(q * kp[s]).sum(-1) for s in shifts], dim=-1)  # (B, H, W, heads, k²)
        attn = torch.softmax(logits + self._bias(h, w, q), dim=-1)
        out = attn[..., 0, None] * vp[shifts[0]]
        for i, s in enumerate(shifts[1:], start=1):
            out = out.addcmul_(attn[..., i, None], vp[s])
        return x + self.proj(out.flatten(-2).permute(0, 3, 1, 2))

    def _bias(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Relative-position bias plus -inf for keys outside the image: (1, H, W, heads, k²)."""
        r = self.rf_radius
        outside = F.pad(like.new_zeros(1, h, w), (r, r, r, r), value=float("-inf"))
        outside = outside.unfold(1, self.window, 1).unfold(2, self.window, 1).flatten(-2)
        return outside.unsqueeze(3) + self.pos_bias


class ContextBranch(nn.Module):
    """Neighbourhood context of the deepest features, appended to the decoder's embedding.

    ``forward(x, bottom)``: ``bottom`` (B, C_deep, h, w) at the encoder's max stride -> k × k
    mean (cells outside the image left out, not zero-padded) -> 1×1 conv -> LayerNorm ->
    bilinear up by ``factor`` -> (B, channels, h·factor, w·factor), concatenated after the
    channels of ``x``. It gives the pointwise head a descriptor of the tissue around each
    output pixel (k × max stride px across), which the U-Net's fine stages otherwise carry
    through a few channels only. Local (finite receptive field), so tiling stays exact.
    """

    def __init__(self, in_ch: int, channels: int, window: int, factor: int) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            msg = f"context window must be an odd number of cells, got {window}"
            raise StmapInputError(msg)
        self.pool = nn.AvgPool2d(window, stride=1, padding=window // 2, count_include_pad=False)
        self.proj = nn.Conv2d(in_ch, channels, 1)
        self.norm = LayerNorm2d(channels)
        self.up = UpsampleBy(factor)

    def forward(self, x: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.up(self.norm(self.proj(self.pool(bottom))))], dim=1)


class _NoContext(nn.Module):
    """Stands in for the :class:`ContextBranch` of a decoder without one: ``x`` unchanged."""

    def forward(self, x: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return x


class _NoSkip(nn.Module):
    """Stands in for the skip projection of a level the encoder does not provide."""

    def forward(self, skip: torch.Tensor | None) -> float:
        return 0.0


class FusionBlock(nn.Module):
    """One ×2 decoder step: (B, C_in, h, w) + skip (B, C_skip, 2h, 2w) -> (B, C_out, 2h, 2w)."""

    def __init__(
        self, in_ch: int, skip_ch: int, out_ch: int, *, window: int, head_dim: int
    ) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(in_ch, out_ch, 1)
        self.up = UpsampleBy(2)
        self.proj_skip = nn.Conv2d(skip_ch, out_ch, 1, bias=False) if skip_ch else _NoSkip()
        self.norm = LayerNorm2d(out_ch)
        self.conv = SepConvResidual(out_ch)
        self.attn = LocalAttention2d(out_ch, window, head_dim) if window else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.norm(self.up(self.proj_in(x)) + self.proj_skip(skip))
        return self.attn(self.conv(x))


class FusionDecoder(nn.Module):
    """U-Net decoder from the encoder's max stride down to ``stride``.

    Parameters
    ----------
    encoder_channels, encoder_reductions : sequence of int
        Per encoder feature: channels and stride (px). Features sharing a stride (ViT blocks)
        are concatenated.
    stride : int
        Output stride (px); max stride / stride must be a power of two.
    channels : sequence of int
        Width of each ×2 stage (one per halving of the stride).
    windows : sequence of int
        Attention window (odd, px of that stage) of each stage.
    head_dim : int
        Channels per attention head.
    context_channels, context_window : int
        Width of the :class:`ContextBranch` appended to the output (0: none) and its window
        (cells of the max stride).

    Notes
    -----
    ``forward(features)`` -> (B, channels[-1] + context_channels, H / stride, W / stride),
    layer-normalised over channels (bounded values: the embedding can be cached as float16).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_reductions: Sequence[int],
        *,
        stride: int,
        channels: Sequence[int],
        windows: Sequence[int],
        head_dim: int,
        context_channels: int = 0,
        context_window: int = 3,
    ) -> None:
        super().__init__()
        levels = _stage_strides(max(encoder_reductions), stride)
        if len(channels) != len(levels) or len(windows) != len(levels):
            msg = (
                f"decoder needs {len(levels)} stages to go from stride {max(encoder_reductions)} "
                f"to {stride}; got decoder_channels={list(channels)}, attn_windows={list(windows)}"
            )
            raise StmapInputError(msg)
        group = {
            r: [i for i, ri in enumerate(encoder_reductions) if ri == r]
            for r in set(encoder_reductions)
        }
        self.bottom = group[max(encoder_reductions)]
        self.skips = [group.get(s, []) for s in levels]
        in_chs = [sum(encoder_channels[i] for i in self.bottom), *channels[:-1]]
        skip_chs = [sum(encoder_channels[i] for i in idx) for idx in self.skips]
        self.blocks = nn.ModuleList(
            FusionBlock(i, s, o, window=w, head_dim=head_dim)
            for i, s, o, w in zip(in_chs, skip_chs, channels, windows, strict=True)
        )
        self.norm = LayerNorm2d(int(channels[-1]))
        self.context = (
            ContextBranch(in_chs[0], context_channels, context_window, max(levels) * 2 // stride)
            if context_channels
            else _NoContext()
        )
        self.out_channels = int(channels[-1]) + int(context_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        bottom = x = _gather(features, self.bottom)
        for block, skip_idx in zip(self.blocks, self.skips, strict=True):
            x = block(x, _gather(features, skip_idx))
        return self.context(self.norm(x), bottom)


def _stage_strides(max_stride: int, stride: int) -> list[int]:
    """Output strides of the decoder stages: max_stride/2, /4, ..., stride."""
    n = math.log2(max_stride / stride) if stride > 0 else -1
    if n < 1 or n != int(n):
        msg = f"stride must be max encoder stride ({max_stride}) / 2^n with n ≥ 1, got {stride}"
        raise StmapInputError(msg)
    return [max_stride >> (i + 1) for i in range(int(n))]


def _gather(features: Sequence[torch.Tensor], idx: Sequence[int]) -> torch.Tensor | None:
    if not idx:
        return None
    return features[idx[0]] if len(idx) == 1 else torch.cat([features[i] for i in idx], dim=1)


class PixNet(StmapModel):
    """Dense model: (B, 3, H, W) in [0, 1] -> (B, G + 1, H / stride, W / stride) counts.

    Parameters
    ----------
    genes : sequence of str
        Gene names (G); a ``"total"`` channel is appended.
    stride : int
        Output stride in input px (4 -> 2 µm pixels at 0.5 µm/px).
    decoder_channels, attn_windows : sequence of int, optional
        Per decoder stage (coarse to fine): width, and odd attention window in that stage's px.
        Defaults: width clip(8 × stage stride, 64, 256); window 7 / 5 / 0 at stride ≥16 / 8 / ≤4.
        Window 0 means no attention in that stage (``nn.Identity``).
    head_dim : int
        Channels per attention head.
    context_channels, context_window : int
        A :class:`ContextBranch` of that width (0: none) over a window of that many
        max-stride cells, concatenated to the embedding.
    halo_px : int, optional
        Override the measured halo (input px; rounded up to ``align_px``). A halo below the
        receptive field is faster but not exact (``exact_tiling`` becomes False).
    init_counts_per_px : float or list of float, optional
        Prior mean counts per output pixel for the head bias.
    mpp, normalisation, encoder, pretrained, encoder_weights, allow_pickle, encoder_out_indices,
    encoder_kwargs, mean, std
        As for :class:`~napari_stmap.core.model.base.StmapModel`.
    """

    arch = "pixnet"
    input_kind = "dense"
    options: ClassVar[dict[str, Any]] = {
        **BASE_OPTIONS,
        "stride": 4,
        "decoder_channels": None,
        "attn_windows": None,
        "head_dim": 32,
        "context_channels": 0,
        "context_window": 3,
        "halo_px": None,
        "init_counts_per_px": None,
    }

    def __init__(self, genes: Sequence[str], **config: Any) -> None:
        super().__init__(genes, **config)
        cfg = self.config
        self._build_decoder(cfg)
        self.head_ = PointwiseHead(
            self.decoder.out_channels, self.num_outputs, cfg["init_counts_per_px"]
        )
        self.stride = int(cfg["stride"])
        self._set_halo(cfg["halo_px"])

    def _build_decoder(self, cfg: dict[str, Any]) -> None:
        levels = _stage_strides(self.encoder.max_stride, int(cfg["stride"]))
        cfg["decoder_channels"] = [
            int(c) for c in cfg["decoder_channels"] or [min(256, max(64, 8 * s)) for s in levels]
        ]
        cfg["attn_windows"] = [
            int(w)
            for w in cfg["attn_windows"] or [7 if s >= 16 else 5 if s == 8 else 0 for s in levels]
        ]
        self.decoder = FusionDecoder(
            self.encoder.out_channels,
            self.encoder.reductions,
            stride=int(cfg["stride"]),
            channels=cfg["decoder_channels"],
            windows=cfg["attn_windows"],
            head_dim=int(cfg["head_dim"]),
            context_channels=int(cfg["context_channels"]),
            context_window=int(cfg["context_window"]),
        )
        self.embed_dim = self.decoder.out_channels

    def _set_halo(self, override: int | None) -> None:
        rf = receptive_field(self, self.embed, probe_px=4 * self.align_px)
        self.receptive_field_px = rf.radius_px
        a = self.align_px
        self.halo_px = rf.halo(a) if override is None else -(-int(override) // a) * a
        self.exact_tiling = rf.exact and self.halo_px >= rf.radius_px
        if not rf.exact:
            _logger.warning(
                "encoder %s mixes information across the whole tile (%s): tiled maps are only "
                "approximately seamless; halo_px=%d is a practical margin",
                self.config["encoder"],
                ", ".join(rf.global_modules[:3]),
                self.halo_px,
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of ``align_px`` -> (B, D, H/s, W/s)."""
        if x.shape[-2] % self.align_px or x.shape[-1] % self.align_px:
            msg = f"input of {tuple(x.shape[-2:])} px: height and width must be multiples of {self.align_px} px"
            raise StmapInputError(msg)
        return self.decoder(self.encoder(self.normalise(x)))


register_presets(PixNet, {"pixnet": {}, "pixnet_tiny": PIXNET_TINY_CONFIG})
