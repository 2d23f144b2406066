"""Tile plans over a slide at a model's µm/px, and the tissue mask that decides which tiles run.

Three pixel frames appear here, all with axis order (y, x):

- **level-0 px** of the slide (what :class:`~napari_stmap.core.geometry.MapGrid`, spots and
  shapes use);
- **model px**: the slide resampled to the model's ``mpp``. Model pixel ``(i, j)`` covers
  level-0 px ``[i·f, (i+1)·f) × [j·f, (j+1)·f)`` with ``f = model_mpp / slide_mpp``, so model
  px 0 starts at level-0 px 0 whatever region is planned (as in
  :func:`~napari_stmap.core.io.slide.read_at_mpp`);
- **output px**: the model's output at stride ``s``; output pixel ``(p, q)`` of a plan covers
  model px ``[Y0 + p·s, Y0 + (p+1)·s)`` (likewise for x), ``(Y0, X0)`` being the plan's origin.

A :class:`TileSpec` cuts a region (the whole slide by default) into square tile *cores* of
``tile_px`` model px. Cores start at multiples of the model's alignment (the least common
multiple of its encoder's max stride ``align_px`` and its output ``stride``), so every tile is
translation-aligned with every other one and with one big forward pass: with a halo of at
least the model's ``halo_px`` (its receptive-field radius) the tiled map is seamless. Each tile
is read as a *window* of ``tile_px + 2·halo_px`` model px (always full size, also at the region's
last row and column; parts beyond the slide are white) and only its core's output is kept.

:func:`tissue_mask` finds tissue on a low-resolution overview (Otsu thresholds of saturation
and optical density, then morphology) and :func:`tissue_tiles` says which tiles touch it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stmap.core.errors import StmapInputError
from napari_stmap.core.geometry import MapGrid

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from .io.slide import Slide

__all__ = [
    "DEFAULT_TILE_PX",
    "HALO_MULTIPLE",
    "TileSpec",
    "TissueMask",
    "default_tile_px",
    "plan_tiles",
    "tissue_mask",
    "tissue_tiles",
]

log = logging.getLogger(__name__)

#: Smallest default tile core side in model px (the default grows to three times the halo).
DEFAULT_TILE_PX = 1024
#: Default core side as a multiple of the halo: the window ``core + 2·halo`` then costs at most
#: ``(5/3)² ≈ 2.8×`` the core's pixels (``2·halo`` cost 4×; see docs/benchmarks.md, issue 4).
HALO_MULTIPLE = 3

Tile = tuple[int, int]


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step - 1e-9)) * step


def _lcm(a: int, b: int) -> int:
    a, b = max(int(a), 1), max(int(b), 1)
    return a * b // math.gcd(a, b)


@dataclass(frozen=True)
class TileSpec:
    """How a region of a slide is cut into tiles at the model's µm/px.

    Attributes
    ----------
    tile_px : int
        Side of a tile core in model px (a multiple of ``align``).
    halo_px : int
        Context read around each core on every side, model px (a multiple of ``align``).
    stride : int
        Model px per output pixel side.
    align_px : int
        The model's encoder max stride (input px); tile origins are multiples of ``align``.
    model_mpp, slide_mpp : float
        µm per model px and per level-0 slide px.
    level : int
        Pyramid level the tiles are read from (the coarsest at least as fine as the model).
    level_downsample : float
        Level-0 px per px of ``level``.
    scale : float
        Level px per model px (``model_mpp / (slide_mpp · level_downsample)``; 1: no resize).
    origin_model_yx : (int, int)
        Top-left model px of the region (multiples of ``align``).
    size_model_hw : (int, int)
        Region size in model px (multiples of ``stride``).
    grid_shape : (int, int)
        Number of tiles (rows, columns).
    slide_shape_yx : (int, int)
        Level-0 size of the slide, px.
    """

    tile_px: int
    halo_px: int
    stride: int
    align_px: int
    model_mpp: float
    slide_mpp: float
    level: int
    level_downsample: float
    scale: float
    origin_model_yx: tuple[int, int]
    size_model_hw: tuple[int, int]
    grid_shape: tuple[int, int]
    slide_shape_yx: tuple[int, int]

    # --- derived sizes ------------------------------------------------------------------
    @property
    def align(self) -> int:
        """Step of tile origins and sizes, model px: lcm(``align_px``, ``stride``)."""
        return _lcm(self.align_px, self.stride)

    @property
    def f(self) -> float:
        """Level-0 px per model px (``model_mpp / slide_mpp``)."""
        return self.model_mpp / self.slide_mpp

    @property
    def window_px(self) -> int:
        """Side of a tile's read window, model px: ``tile_px + 2·halo_px``."""
        return self.tile_px + 2 * self.halo_px

    @property
    def out_tile_px(self) -> int:
        """Side of a full tile's output, output px (``tile_px / stride``)."""
        return self.tile_px // self.stride

    @property
    def out_shape_hw(self) -> tuple[int, int]:
        """Size (H_out, W_out) of the whole output map, output px."""
        h, w = self.size_model_hw
        return h // self.stride, w // self.stride

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the plan."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def grid(self) -> MapGrid:
        """Where the output map lies: origin and pixel size in level-0 px (``stride · f``)."""
        oy, ox = self.origin_model_yx
        return MapGrid((oy * self.f, ox * self.f), self.stride * self.f, self.out_shape_hw)

    # --- per tile -----------------------------------------------------------------------
    def tiles(self) -> Iterator[Tile]:
        """All tiles ``(i, j)``, row-major."""
        rows, cols = self.grid_shape
        return ((i, j) for i in range(rows) for j in range(cols))

    def core_model(self, tile: Tile) -> tuple[int, int, int, int]:
        """Core of ``tile`` in model px ``(y0, x0, y1, x1)``, clipped to the region's end."""
        i, j = self._check(tile)
        (oy, ox), (h, w), t = self.origin_model_yx, self.size_model_hw, self.tile_px
        y0, x0 = oy + i * t, ox + j * t
        return y0, x0, min(y0 + t, oy + h), min(x0 + t, ox + w)

    def core_level0(self, tile: Tile) -> tuple[float, float, float, float]:
        """Core of ``tile`` in level-0 px ``(y0, x0, y1, x1)`` (floats)."""
        return tuple(v * self.f for v in self.core_model(tile))  # type: ignore[return-value]

    def window_model(self, tile: Tile) -> tuple[int, int, int, int]:
        """Read window of ``tile`` in model px: the full-size core grown by the halo."""
        y0, x0, _, _ = self.core_model(tile)
        h, t = self.halo_px, self.tile_px
        return y0 - h, x0 - h, y0 + t + h, x0 + t + h

    def output_slices(self, tile: Tile) -> tuple[slice, slice]:
        """Rows and columns of the output map (output px) that ``tile``'s core fills."""
        y0, x0, y1, x1 = self.core_model(tile)
        (oy, ox), s = self.origin_model_yx, self.stride
        return slice((y0 - oy) // s, (y1 - oy) // s), slice((x0 - ox) // s, (x1 - ox) // s)

    def tile_center_level0(self, tile: Tile) -> tuple[float, float]:
        """Centre of ``tile``'s core in level-0 px (y, x)."""
        y0, x0, y1, x1 = self.core_level0(tile)
        return (y0 + y1) / 2, (x0 + x1) / 2

    def tiles_in_bbox(self, bbox_yx: Sequence[float]) -> list[Tile]:
        """Tiles whose core overlaps a level-0 px box ``(y0, x0, y1, x1)``, row-major."""
        y0, x0, y1, x1 = (float(v) for v in bbox_yx)
        (oy, ox), t, f = self.origin_model_yx, self.tile_px, self.f
        rows, cols = self.grid_shape
        i0 = max(0, math.floor((y0 / f - oy) / t))
        j0 = max(0, math.floor((x0 / f - ox) / t))
        i1 = min(rows, math.ceil((y1 / f - oy) / t))
        j1 = min(cols, math.ceil((x1 / f - ox) / t))
        return [(i, j) for i in range(i0, i1) for j in range(j0, j1)]

    def _check(self, tile: Tile) -> Tile:
        i, j = (int(v) for v in tile)
        if not (0 <= i < self.grid_shape[0] and 0 <= j < self.grid_shape[1]):
            msg = f"tile {tile!r} is outside the tile grid {self.grid_shape}"
            raise IndexError(msg)
        return i, j

    # --- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists for tuples); :meth:`from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def default_tile_px(model: Any) -> int:
    """Default core side for ``model``: ``max(1024, 3·halo_px)`` model px, aligned.

    The network runs on the window ``core + 2·halo``; a core of at least three times the halo
    keeps that overhead ``(window / core)²`` ≤ 2.8 (ResNet-18 PixNet, halo 384 px: core 1152,
    window 1920 px; at ``2·halo`` it was 4 and dense prediction lost a third of its lead over
    spot crops). Smaller tiles (``tile_px=``) paint a first viewport sooner on a slow CPU.
    """
    align = _lcm(model.align_px, model.stride)
    return _round_up(max(DEFAULT_TILE_PX, HALO_MULTIPLE * int(model.halo_px)), align)


def plan_tiles(
    slide: Slide,
    model: Any,
    *,
    tile_px: int | None = None,
    halo_px: int | None = None,
    bbox_yx: Sequence[float] | None = None,
) -> TileSpec:
    """Plan the tiles of ``slide`` (or of a level-0 box of it) for ``model``.

    Parameters
    ----------
    slide : Slide
        The slide (its ``mpp``, level-0 shape and pyramid).
    model : StmapModel or any object with ``mpp``, ``stride``, ``halo_px``, ``align_px``
        A dense model.
    tile_px : int, optional
        Core side in model px, rounded up to the alignment (default :func:`default_tile_px`).
    halo_px : int, optional
        Context per side in model px (default: the model's ``halo_px``), rounded up to the
        alignment. Less than the model's halo is faster but not seamless (a warning says so).
    bbox_yx : (y0, x0, y1, x1), optional
        Level-0 px region (clipped to the slide); default the whole slide. Its start is
        floored to the alignment, its end rounded up to whole output pixels.

    Returns
    -------
    TileSpec
    """
    mpp, s = float(model.mpp), int(model.stride)
    if getattr(model, "input_kind", "dense") != "dense" or not (mpp > 0 and s >= 1):
        msg = f"tiling needs a dense model with mpp > 0 and stride >= 1 (got {model!r:.80})"
        raise StmapInputError(msg)
    align = _lcm(model.align_px, s)
    tile = _round_up(max(int(tile_px or default_tile_px(model)), 1), align)
    halo = _round_up(max(int(model.halo_px if halo_px is None else halo_px), 0), align)
    if halo < int(model.halo_px):
        log.warning(
            "halo %d model px < the model's halo %d px: tiles will show seams", halo, model.halo_px
        )
    f = mpp / slide.mpp
    origin, size = _region_model(slide.shape_yx, f, bbox_yx, align, s)
    level = slide.best_level_for_mpp(mpp)
    d = float(slide.downsamples[level])
    grid_shape = (max(1, math.ceil(size[0] / tile)), max(1, math.ceil(size[1] / tile)))
    return TileSpec(
        tile_px=tile,
        halo_px=halo,
        stride=s,
        align_px=int(model.align_px),
        model_mpp=mpp,
        slide_mpp=float(slide.mpp),
        level=int(level),
        level_downsample=d,
        scale=f / d,
        origin_model_yx=origin,
        size_model_hw=size,
        grid_shape=grid_shape,
        slide_shape_yx=tuple(int(v) for v in slide.shape_yx),
    )


def _region_model(
    shape_yx: tuple[int, int], f: float, bbox_yx: Sequence[float] | None, align: int, s: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Aligned model-px origin (y, x) and size (h, w) of a level-0 box clipped to the slide."""
    hm, wm = (math.ceil(n / f - 1e-9) for n in shape_yx)  # slide size in model px
    if bbox_yx is None:
        y0, x0, y1, x1 = 0.0, 0.0, float(hm), float(wm)
    else:
        b = [float(v) for v in bbox_yx]
        if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]):
            msg = f"bbox_yx must be (y0, x0, y1, x1) level-0 px with y1 > y0, x1 > x0; got {bbox_yx!r}"
            raise StmapInputError(msg)
        y0, x0 = max(b[0] / f, 0.0), max(b[1] / f, 0.0)
        y1, x1 = min(b[2] / f, hm), min(b[3] / f, wm)
        if not (y1 > y0 and x1 > x0):
            msg = f"bbox_yx {bbox_yx!r} does not overlap the slide (0, 0, {shape_yx[0]}, {shape_yx[1]})"
            raise StmapInputError(msg)
    oy, ox = math.floor(y0 / align) * align, math.floor(x0 / align) * align
    return (oy, ox), (_round_up(y1 - oy, s), _round_up(x1 - ox, s))


# ------------------------------------------------------------------------------ tissue mask
@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask on a low-resolution overview of a slide.

    Attributes
    ----------
    mask : numpy.ndarray
        ``(h, w)`` bool, True on tissue, axes (y, x).
    px_yx : (float, float)
        Level-0 px per mask px along y and x (mask px ``(r, c)`` covers level-0 px
        ``[r·py, (r+1)·py) × [c·px, (c+1)·px)``).
    """

    mask: np.ndarray
    px_yx: tuple[float, float]

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def any_in(self, boxes_yx: np.ndarray) -> np.ndarray:
        """Whether each level-0 px box ``(n, 4)`` ``(y0, x0, y1, x1)`` touches tissue."""
        boxes = np.asarray(boxes_yx, dtype=float).reshape(-1, 4)
        h, w = self.mask.shape
        sat = np.zeros((h + 1, w + 1), dtype=np.int64)
        sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        py, px = self.px_yx
        r0 = np.clip(np.floor(boxes[:, 0] / py), 0, h).astype(int)
        c0 = np.clip(np.floor(boxes[:, 1] / px), 0, w).astype(int)
        r1 = np.clip(np.ceil(boxes[:, 2] / py), 0, h).astype(int)
        c1 = np.clip(np.ceil(boxes[:, 3] / px), 0, w).astype(int)
        total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        return total > 0


def tissue_mask(
    slide: Slide,
    *,
    mask_um: float = 8.0,
    dilate_um: float = 0.0,
    min_object_um: float = 50.0,
    max_hole_um: float = 200.0,
    max_px: int = 2048,
) -> TissueMask:
    """Tissue mask of a slide from a low-resolution overview.

    Tissue is where saturation (HSV) or optical density (mean over RGB of
    ``-log10(I / 255)``) exceeds its Otsu threshold, each at least a floor (0.05 and 0.05) so
    blank glass stays background; then holes up to ``max_hole_um`` wide are filled (fat
    cells), the mask is closed (2 mask px), objects smaller than ``min_object_um`` squared
    are removed and the rest is dilated by ``dilate_um``.

    Parameters
    ----------
    slide : Slide
        The slide; read once through :meth:`Slide.thumbnail` (a low pyramid level).
    mask_um : float
        Target µm per mask pixel (the overview is at most ``max_px`` px per side).
    dilate_um : float
        Margin added around tissue, µm (the engine uses one tile halo).
    min_object_um, max_hole_um : float
        Side, µm, of the largest object removed and of the largest hole filled.
    max_px : int
        Longest side of the overview, px.

    Returns
    -------
    TissueMask
    """
    import dask
    from scipy import ndimage

    longest_um = max(slide.shape_yx) * slide.mpp
    side = int(min(max_px, max(16, math.ceil(longest_um / mask_um))))
    with dask.config.set(scheduler="threads"):  # local: the slide's open file cannot travel
        rgb = slide.thumbnail(side)
    px_yx = (slide.shape_yx[0] / rgb.shape[0], slide.shape_yx[1] / rgb.shape[1])
    um = math.sqrt(px_yx[0] * px_yx[1]) * slide.mpp  # µm per mask px
    mask = _threshold_tissue(rgb)
    mask = ndimage.binary_fill_holes(mask) & ~_large_holes(mask, (max_hole_um / um) ** 2)
    mask = _close(mask, 2.0)
    mask = _drop_small(mask, (min_object_um / um) ** 2)
    if dilate_um > 0 and mask.any():
        mask = ndimage.distance_transform_edt(~mask) <= dilate_um / um
    log.info("tissue mask: %.1f%% of %s (%.3g µm/px)", 100 * mask.mean(), slide.path.name, um)
    return TissueMask(mask=np.ascontiguousarray(mask, dtype=bool), px_yx=px_yx)


def _threshold_tissue(rgb: np.ndarray) -> np.ndarray:
    """Saturation or optical density above their Otsu thresholds (with floors)."""
    from skimage.color import rgb2hsv

    img = rgb.astype(np.float32) / 255.0
    sat = rgb2hsv(img)[..., 1]
    od = -np.log10(np.clip(img, 1 / 255, 1.0)).mean(axis=-1)
    return (sat > _otsu(sat, 0.05)) | (od > _otsu(od, 0.05))


def _otsu(values: np.ndarray, floor: float) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(np.ptp(values)) < 1e-6:
        return max(floor, float(values.max(initial=0.0)))
    return max(floor, float(threshold_otsu(values)))


def _large_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Holes of ``mask`` (background not connected to the border) larger than ``max_area``."""
    from scipy import ndimage

    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    big = sizes > max_area
    big[0] = False
    return big[labels]


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary closing with a disk of ``radius`` px (distance transforms; border-safe)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    pad = int(math.ceil(radius)) + 1
    padded = np.pad(mask, pad, mode="edge")
    grown = ndimage.distance_transform_edt(~padded) <= radius
    closed = ~(ndimage.distance_transform_edt(grown) <= radius)
    return closed[pad:-pad, pad:-pad] | mask


def _drop_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Remove connected objects (8-connectivity) of at most ``min_area`` px."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes > min_area
    keep[0] = False
    return keep[labels]


def tissue_tiles(mask: TissueMask | None, spec: TileSpec) -> np.ndarray:
    """Which tiles of ``spec`` touch tissue: bool ``(rows, cols)`` (all True without a mask)."""
    if mask is None:
        return np.ones(spec.grid_shape, dtype=bool)
    boxes = np.array([spec.core_level0(t) for t in spec.tiles()], dtype=float)
    return mask.any_in(boxes).reshape(spec.grid_shape)
