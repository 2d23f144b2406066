"""MagNet: bin-level expression from views at three magnifications and a graph of neighbouring
bins (after Zhu et al., "MagNet: Multi-Level Attention Graph Network for Predicting
High-Resolution Spatial Transcriptomics", MIDL 2025; our own implementation).

Wiring, for N bins (``input_kind = "bins"``: bin centres in, one vector per bin out)::

    bin view  (N, 3, p0, p0)  views_um[0] µm at ``mpp``   -> bin encoder -> mean pool -> h0 (N, d)
    context level l = 1..L    views_um[l] µm at mpp_l      -> context encoder on a shared tile
        (one tile per group / chunk of bins, context_px[l-1] px per view)
        -> deepest feature map, mean over each of t × t cells of each bin's view
        -> tokens T_l (N, t², d)
    fusion      h = h0;  for l: h = h + CrossAttn_l(q = h, kv = T_l);  h = h + FFN(h)
    levels      z_0 = h,  z_l = mean of T_l                                     (N, d) each
    graph       per level, ``gat_blocks`` parallel graph-attention blocks over the k nearest bins
                (+ the bin itself): (L + 1) · gat_blocks tokens per bin
    transformer a small Transformer over those tokens (per bin), mean -> e (N, d)   = embed
    head        Linear + softplus -> (N, G + 1) expected counts (genes, then total) = head

``mpp_l = views_um[l] / context_px[l - 1]``; the bin view has ``p0 = round(views_um[0] / mpp)``
px. The head is pointwise on ``e``, as the model contract asks; the per-level means of the
Transformer's tokens give one prediction per level (``forward_levels``), used by the
cross-level consistency term of the loss (``consistency_weight``, see
:mod:`napari_stmap.core.training.magnet`).

What differs from the paper (and why)
-------------------------------------
- The paper encodes each of the three views of every bin separately (three crops per bin) and
  attends across single feature vectors. Here the context encoders run **once per region**
  (a group of neighbouring bins in training, a chunk of the slide in inference) and each bin's
  context is read from that feature map: the cost of context no longer grows with the number
  of bins. Each context level gives ``t × t`` tokens (cells of the view), so the bin feature
  has something to attend over.
- The receptive field of the context encoder extends beyond the view, so a bin's context
  tokens from a shared tile (real tissue around the view) differ from those of a crop of just
  the view (zero padding around it). Tiles always carry a margin of ``context_margin`` × the
  view around every view, in training and in inference alike, so the network is trained on
  what it sees at inference. With an encoder whose receptive field is its own cell, both
  paths agree exactly for views aligned to the encoder stride (tested);
  :func:`~napari_stmap.core.predict.bins.predict_bins` with ``shared_context=False`` runs the
  per-bin crop path.
- Bins of one training batch are neighbours (an anchor bin and its nearest bins), so the kNN
  graph is meaningful; inference uses the kNN graph of all bins passed. Every level uses the
  graph of the bins (the paper builds separate graphs of its context patches); its
  Transformer runs per bin over the graph blocks' outputs, as here, so a bin's output depends
  on its neighbours only (one hop): inference is exact in any chunking of the bins.
- Context encoders are trainable copies by default (the published code uses features
  precomputed by a frozen network: ``context_encoder="frozen"`` with pretrained weights).
- Outputs follow the project's value rule: non-negative expected counts of the bin (softplus),
  normalised expression computed from them; trained on counts × reference area / bin area
  (like SpotNet), and :func:`~napari_stmap.core.predict.bins.predict_bins` scales back by each
  bin's area.

Defaults: views of 56 / 112 / 256 µm (the paper's 112 / 224 / 512 px at 0.5 µm/px); the
bin view at the model's µm/px, the context views at 64 px each (1.75 and 4 µm/px).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_stmap.core.errors import StmapInputError

from .base import BASE_OPTIONS, StmapModel
from .encoder import encoder_from_config
from .heads import GlobalPool, LinearHead
from .registry import register_presets

__all__ = [
    "MAGNET_TINY_CONFIG",
    "BinBatch",
    "CrossAttentionBlock",
    "GraphAttention",
    "MagNet",
    "knn_graph",
    "sample_tokens",
    "tile_box",
]

#: Tiny random-init config for tests: timm's ``test_resnet`` cut at stride 16, views of
#: 16 / 32 / 64 µm (32 px at 0.5 µm/px; 32 px at 1 and 2 µm/px), d = 32.
MAGNET_TINY_CONFIG: dict[str, Any] = {
    "encoder": "test_resnet",
    "encoder_out_indices": [0, 1, 2, 3],
    "views_um": [16.0, 32.0, 64.0],
    "context_px": [32, 32],
    "dim": 32,
    "heads": 2,
    "gat_blocks": 1,
    "dropout": 0.0,
    "group_bins": 16,
}

_CONTEXT_ENCODERS = ("separate", "shared", "frozen")


# ------------------------------------------------------------------------------ inputs
@dataclass
class BinBatch:
    """Inputs of :class:`MagNet` for N bins, in groups that share context tiles.

    Attributes
    ----------
    views : torch.Tensor
        (N, 3, p0, p0) bin views, float in [0, 1] (or uint8).
    tiles : list of list of torch.Tensor
        ``tiles[l][g]``: (3, H, W) context tile of group g at context level l (float [0, 1] or
        uint8); tiles of one level may differ in size.
    positions : list of torch.Tensor
        ``positions[l]``: (N, 2) float, each bin's centre (y, x) in its group's level-l tile,
        in px of that tile (pixel (i, j) spans [i, i + 1) × [j, j + 1)).
    group : torch.Tensor
        (N,) int64, the group (tile index) of each bin.
    neighbours : torch.Tensor
        (N, k) int64 indices of each bin's graph neighbours among the N bins, -1 for none.
    """

    views: torch.Tensor
    tiles: list[list[torch.Tensor]]
    positions: list[torch.Tensor]
    group: torch.Tensor
    neighbours: torch.Tensor

    @property
    def n(self) -> int:
        """Number of bins N."""
        return int(self.views.shape[0])

    def to(self, device: Any) -> BinBatch:
        """The same batch on ``device``."""
        return BinBatch(
            self.views.to(device),
            [[t.to(device) for t in level] for level in self.tiles],
            [p.to(device) for p in self.positions],
            self.group.to(device),
            self.neighbours.to(device),
        )


# ---------------------------------------------------------------------------------- graph
def knn_graph(centers: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """The k nearest other bins of every bin (Euclidean distance of centres).

    Parameters
    ----------
    centers : numpy.ndarray
        (n, 2) bin centres, any px unit (y, x).
    k : int
        Neighbours per bin.
    valid : numpy.ndarray, optional
        (n,) bool; invalid bins (padding) are nobody's neighbour and get none.

    Returns
    -------
    numpy.ndarray
        (n, k) int64 indices, nearest first; -1 where a bin has fewer than k other valid bins
        (sets of 1 to k bins) and for invalid bins. A bin is never its own neighbour (no
        self-loops: :class:`GraphAttention` adds the bin itself on purpose).
    """
    from scipy.spatial import cKDTree

    c = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    out = np.full((len(c), int(k)), -1, dtype=np.int64)
    real = np.flatnonzero(np.ones(len(c), bool) if valid is None else np.asarray(valid, bool))
    m, kk = len(real), min(int(k) + 1, len(real))
    if m < 2 or k < 1:
        return out
    _, j = cKDTree(c[real]).query(c[real], k=kk)
    j = np.asarray(j, dtype=np.int64).reshape(m, kk)
    keep = j != np.arange(m)[:, None]
    missing_self = keep.all(axis=1)  # duplicate centres: self may fall off the list
    keep[missing_self, -1] = False
    out[real, : kk - 1] = real[j[keep].reshape(m, kk - 1)]
    return out


# ------------------------------------------------------------------------ context tokens
def tile_box(
    positions: np.ndarray, view_px: float, margin_px: float, align: int
) -> tuple[np.ndarray, int]:
    """Square tile (origin, side) covering every view of side ``view_px`` around ``positions``.

    Parameters
    ----------
    positions : numpy.ndarray
        (n, 2) view centres (y, x), px of the level.
    view_px : float
        View side, px.
    margin_px : float
        Extra context around the views, px.
    align : int
        Origin and side are multiples of this (the encoder's stride), so feature cells line up
        with a global grid whatever bins are asked for.

    Returns
    -------
    origin : numpy.ndarray
        (2,) int64 top-left px (y, x).
    side : int
        Side, px.
    """
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    reach = view_px / 2 + margin_px
    lo = np.floor((p.min(axis=0) - reach) / align).astype(np.int64) * align
    hi = np.ceil((p.max(axis=0) + reach) / align).astype(np.int64) * align
    return lo, int((hi - lo).max())


def sample_tokens(
    fmap: torch.Tensor, positions: torch.Tensor, view_px: float, stride: int, tokens: int
) -> torch.Tensor:
    """Mean features of a ``tokens × tokens`` grid of cells over each bin's view.

    Parameters
    ----------
    fmap : torch.Tensor
        (1, C, h, w) feature map of a tile; feature pixel (i, j) covers tile px
        ``[i·stride, (i+1)·stride) × [j·stride, (j+1)·stride)``.
    positions : torch.Tensor
        (n, 2) view centres (y, x) in tile px.
    view_px : float
        View side, tile px.
    stride : int
        Tile px per feature pixel.
    tokens : int
        Cells per side t.

    Returns
    -------
    torch.Tensor
        (n, t², C), row-major cells: the exact area-weighted mean of the feature map (taken
        as constant over each feature pixel's footprint) over each cell, computed from the
        map's summed-area table, which is exactly bilinear between its grid points. Parts of
        a cell outside the map count as zeros (like zero padding). A cell that covers whole
        feature pixels reads only those pixels.
    """
    n, (h, w) = positions.shape[0], fmap.shape[-2:]
    sat = F.pad(fmap.cumsum(dim=2).cumsum(dim=3), (1, 0, 1, 0))  # (1, C, h + 1, w + 1)
    edges = torch.linspace(-view_px / 2, view_px / 2, tokens + 1, device=fmap.device)
    ey = _normalised((positions[:, 0, None] + edges.to(positions.dtype)) / stride, h + 1)
    ex = _normalised((positions[:, 1, None] + edges.to(positions.dtype)) / stride, w + 1)
    e = tokens + 1
    grid = torch.stack([ex[:, None, :].expand(n, e, e), ey[:, :, None].expand(n, e, e)], dim=-1)
    corner = F.grid_sample(
        sat,
        grid.reshape(1, n, e * e, 2).to(sat.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    ).reshape(fmap.shape[1], n, e, e)
    box = (
        corner[:, :, 1:, 1:]
        - corner[:, :, :-1, 1:]
        - corner[:, :, 1:, :-1]
        + corner[:, :, :-1, :-1]
    )
    box = box / (view_px / tokens / stride) ** 2
    return box.permute(1, 2, 3, 0).reshape(n, tokens * tokens, fmap.shape[1])


def _normalised(u: torch.Tensor, size: int) -> torch.Tensor:
    """Grid index (0 … size − 1) -> grid_sample coordinate (align_corners=True)."""
    return u * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(u)


# -------------------------------------------------------------------------------- blocks
class CrossAttentionBlock(nn.Module):
    """The bin feature queries a level's context tokens; residual, then a residual FFN."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, d), (N, T, d) -> (N, d)."""
        kv = self.norm_kv(tokens)
        a, _ = self.attn(self.norm_q(h).unsqueeze(1), kv, kv, need_weights=False)
        h = h + a.squeeze(1)
        return h + self.ff(self.norm_ff(h))


class GraphAttention(nn.Module):
    """GATv2-style multi-head attention of each bin over itself and its graph neighbours.

    ``score_ij = aᵀ LeakyReLU(W_q x_i + W_k x_j)`` per head, softmax over ``{i} ∪ N(i)``
    (missing neighbours, index -1, are masked out), output ``x_i + W_o Σ_j α_ij W_v x_j``.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            msg = f"dim {dim} must be a multiple of heads {heads}"
            raise StmapInputError(msg)
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.a = nn.Parameter(torch.randn(heads, self.head_dim) / math.sqrt(self.head_dim))
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """(N, d), (N, k) int64 (-1 = none) -> (N, d)."""
        n, hd = x.shape[0], (self.heads, self.head_dim)
        idx = torch.cat([torch.arange(n, device=x.device)[:, None], neighbours], dim=1)
        valid = idx >= 0
        xn = self.norm(x)
        src = xn[idx.clamp_min(0)]  # (N, k + 1, d)
        q = self.q(xn).view(n, 1, *hd)
        score = (F.leaky_relu(q + self.k(src).view(n, -1, *hd), 0.2) * self.a).sum(-1)
        score = score.masked_fill(~valid[..., None], float("-inf"))
        alpha = self.drop(torch.softmax(score, dim=1))  # (N, k + 1, heads)
        v = self.v(src).view(n, -1, *hd)
        return x + self.out((alpha[..., None] * v).sum(dim=1).reshape(n, -1))


# --------------------------------------------------------------------------------- model
class MagNet(StmapModel):
    """Multi-magnification bin model: :class:`BinBatch` -> (N, G + 1) expected counts per bin.

    Parameters
    ----------
    genes : sequence of str
        Gene names (G); a ``"total"`` channel is appended.
    mpp : float
        µm/px of the bin view (the engine reads the slide at it).
    views_um : list of float
        Fields of view (µm) of the bin view, then of each context level (growing).
    context_px : list of int
        Side (px) each context view is encoded at; level l works at ``views_um[l] /
        context_px[l - 1]`` µm/px.
    context_encoder : {"separate", "shared", "frozen"}
        Context levels use their own trainable copy of the encoder (default; batch-norm
        statistics of a shared encoder would mix magnifications), the bin encoder itself, or
        a frozen copy (sensible with pretrained ``encoder_weights``).
    context_tokens : int
        t: each context view gives t × t tokens.
    context_margin : float
        Context tiles extend this fraction of a view beyond the outermost views.
    dim, heads : int
        Width and attention heads of the fusion, graph and Transformer blocks.
    k : int
        Graph neighbours per bin.
    gat_blocks : int
        Parallel graph-attention blocks per level (tokens per level for the Transformer).
    transformer_layers : int
        Layers of the per-bin Transformer over the level tokens.
    dropout : float
        Dropout in attention and Transformer layers.
    group_bins : int
        Training: neighbouring bins per group (one anchor and its nearest bins).
    consistency_weight : float
        Training: weight of the cross-level consistency term (0 turns it off).
    init_counts_per_bin : float or list of float, optional
        Prior mean counts per bin (reference area) for the head bias.
    normalisation, encoder, pretrained, encoder_weights, allow_pickle, encoder_out_indices,
    encoder_kwargs, mean, std
        As for :class:`~napari_stmap.core.model.base.StmapModel`.
    """

    arch = "magnet"
    input_kind = "bins"
    options: ClassVar[dict[str, Any]] = {
        **BASE_OPTIONS,
        "views_um": [56.0, 112.0, 256.0],
        "context_px": [64, 64],
        "context_encoder": "separate",
        "context_tokens": 2,
        "context_margin": 0.5,
        "dim": 128,
        "heads": 4,
        "k": 8,
        "gat_blocks": 2,
        "transformer_layers": 1,
        "dropout": 0.1,
        "group_bins": 32,
        "consistency_weight": 0.1,
        "init_counts_per_bin": None,
    }

    def __init__(self, genes: Sequence[str], **config: Any) -> None:
        super().__init__(genes, **config)
        cfg = self.config
        self._build_context(cfg)
        self._build_fusion(cfg)
        self.head_ = LinearHead(self.embed_dim, self.num_outputs, cfg["init_counts_per_bin"])
        self.view_px = round(float(cfg["views_um"][0]) / self.mpp)
        self.context_px = [int(p) for p in cfg["context_px"]]
        self.context_mpp = [
            float(u) / p for u, p in zip(cfg["views_um"][1:], self.context_px, strict=True)
        ]
        self.k = int(cfg["k"])
        self.stride = self.view_px  # one output per bin view; not tiled: no halo

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Refuse views, context sizes and graph options that cannot build a MagNet."""
        _check_views(cfg)

    # ------------------------------------------------------------------ construction
    def _build_context(self, cfg: dict[str, Any]) -> None:
        kind = cfg["context_encoder"]
        self.context_encoder = None if kind == "shared" else encoder_from_config(dict(cfg))
        if kind == "frozen":
            self.context_encoder.requires_grad_(False)
        enc = self.encoder if self.context_encoder is None else self.context_encoder
        self.context_stride = enc.max_stride
        self.context_channels = enc.deepest_channels
        self._context_idx = enc.deepest
        d, t, n_ctx = int(cfg["dim"]), int(cfg["context_tokens"]), len(cfg["context_px"])
        self.context_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(self.context_channels, d), nn.LayerNorm(d))
            for _ in range(n_ctx)
        )
        self.token_embed = nn.Parameter(torch.randn(n_ctx, t * t, d) * 0.02)

    def _build_fusion(self, cfg: dict[str, Any]) -> None:
        d, heads, drop = int(cfg["dim"]), int(cfg["heads"]), float(cfg["dropout"])
        self.pool = GlobalPool(self.encoder.deepest)
        self.bin_proj = nn.Sequential(nn.Linear(self.encoder.deepest_channels, d), nn.LayerNorm(d))
        n_levels = len(cfg["context_px"]) + 1
        self.cross = nn.ModuleList(CrossAttentionBlock(d, heads, drop) for _ in range(n_levels - 1))
        blocks = int(cfg["gat_blocks"])
        self.gat = nn.ModuleList(
            nn.ModuleList(GraphAttention(d, heads, drop) for _ in range(blocks))
            for _ in range(n_levels)
        )
        self.level_embed = nn.Parameter(torch.randn(n_levels * blocks, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, 2 * d, drop, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, int(cfg["transformer_layers"]), enable_nested_tensor=False
        )
        self.out_norm = nn.LayerNorm(d)
        self.embed_dim = d
        self.n_levels, self.gat_blocks = n_levels, blocks

    def train(self, mode: bool = True) -> MagNet:
        """As :meth:`torch.nn.Module.train`; a frozen context encoder stays in eval mode."""
        super().train(mode)
        if self.config.get("context_encoder") == "frozen" and self.context_encoder is not None:
            self.context_encoder.eval()
        return self

    # --------------------------------------------------------------------- stages
    def bin_features(self, views: torch.Tensor) -> torch.Tensor:
        """(N, 3, p0, p0) in [0, 1] (or uint8) -> (N, d) projected, pooled bin-view features."""
        x = self.preprocess(views) if views.dtype == torch.uint8 else views
        if tuple(x.shape[-2:]) != (self.view_px, self.view_px):
            msg = f"bin views must be {self.view_px} × {self.view_px} px, got {tuple(x.shape[-2:])}"
            raise StmapInputError(msg)
        return self.bin_proj(self.pool(self.encoder(self.normalise(x))))

    def context_map(self, tile: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) context tile in [0, 1] (or uint8) -> (1, C, H/r, W/r) deepest features."""
        x = self.preprocess(tile) if tile.dtype == torch.uint8 else tile
        enc = self.encoder if self.context_encoder is None else self.context_encoder
        feats = enc(self.normalise(x))
        return torch.cat([feats[i] for i in self._context_idx], dim=1)

    def context_tokens(
        self, fmap: torch.Tensor, positions: torch.Tensor, level: int
    ) -> torch.Tensor:
        """Tokens (n, t², d) of context level ``level`` (0-based) for views at ``positions``."""
        t = int(self.config["context_tokens"])
        raw = sample_tokens(fmap, positions, self.context_px[level], self.context_stride, t)
        return self.context_proj[level](raw) + self.token_embed[level]

    def fuse(self, h0: torch.Tensor, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Cross-attention fusion, level by level -> per-level features ``[z_0, ..., z_L]``."""
        h = h0
        for block, tok in zip(self.cross, tokens, strict=True):
            h = block(h, tok)
        return [h, *(tok.mean(dim=1) for tok in tokens)]

    def graph(
        self, z: Sequence[torch.Tensor], neighbours: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Graph attention per level, Transformer per bin -> (e, [e_1, ..., e_L])."""
        seq = torch.stack(
            [
                blk(z_l, neighbours)
                for z_l, blocks in zip(z, self.gat, strict=True)
                for blk in blocks
            ],
            dim=1,
        )
        out = self.transformer(seq + self.level_embed)  # (N, (L + 1)·blocks, d)
        e = self.out_norm(out.mean(dim=1))
        levels = out.unflatten(1, (self.n_levels, self.gat_blocks)).mean(dim=2)
        return e, [self.out_norm(levels[:, lv]) for lv in range(1, self.n_levels)]

    def tokens_of(self, batch: BinBatch) -> list[torch.Tensor]:
        """Context tokens of every bin of ``batch``: one encoder pass per group and level."""
        out = []
        for level, tiles in enumerate(batch.tiles):
            rows, parts = [], []
            for g, tile in enumerate(tiles):
                sel = torch.nonzero(batch.group == g).squeeze(1)
                if sel.numel() == 0:
                    continue
                fmap = self.context_map(tile.unsqueeze(0))
                rows.append(sel)
                parts.append(self.context_tokens(fmap, batch.positions[level][sel], level))
            tok = torch.cat(parts)
            out.append(torch.zeros_like(tok).index_copy(0, torch.cat(rows), tok))
        return out

    # --------------------------------------------------------------------- contract
    def embed_levels(self, batch: BinBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embedding (N, d) and the per-context-level embeddings (N, d) each."""
        z = self.fuse(self.bin_features(batch.views), self.tokens_of(batch))
        return self.graph(z, batch.neighbours)

    def embed(self, x: BinBatch) -> torch.Tensor:
        """:class:`BinBatch` -> (N, d) embedding of each bin."""
        return self.embed_levels(x)[0]

    def forward_levels(self, batch: BinBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Counts (N, G + 1) and each context level's own prediction (N, G + 1) (for the loss)."""
        e, levels = self.embed_levels(batch)
        return self.head(e), [self.head(lv) for lv in levels]

    def context_margin_px(self, level: int) -> float:
        """Context beyond the outermost views of a tile at ``level`` (0-based), level px."""
        return float(self.config["context_margin"]) * self.context_px[level]

    def describe(self) -> dict[str, Any]:
        """Metadata of the network, plus the views (µm, px, µm/px) and k."""
        return {
            **super().describe(),
            "views_um": list(self.config["views_um"]),
            "view_px": [self.view_px, *self.context_px],
            "view_mpp": [self.mpp, *self.context_mpp],
            "k": self.k,
        }


def _check_views(cfg: dict[str, Any]) -> None:
    views, ctx = cfg["views_um"], cfg["context_px"]
    if len(views) != len(ctx) + 1 or any(float(v) <= 0 for v in views):
        msg = (
            f"views_um {views} needs one positive field of view (µm) for the bin and one per "
            f"context level; context_px {ctx} has one side (px) per context level"
        )
        raise StmapInputError(msg)
    if any(int(p) < 1 for p in ctx) or float(cfg["mpp"]) <= 0:
        msg = f"context_px {ctx} and mpp {cfg['mpp']} must be positive"
        raise StmapInputError(msg)
    if cfg["context_encoder"] not in _CONTEXT_ENCODERS:
        msg = f"context_encoder {cfg['context_encoder']!r}: use one of {_CONTEXT_ENCODERS}"
        raise StmapInputError(msg)
    if int(cfg["context_tokens"]) < 1 or int(cfg["k"]) < 0 or int(cfg["gat_blocks"]) < 1:
        msg = "context_tokens and gat_blocks must be >= 1 and k >= 0"
        raise StmapInputError(msg)


register_presets(MagNet, {"magnet": {}, "magnet_tiny": MAGNET_TINY_CONFIG})
