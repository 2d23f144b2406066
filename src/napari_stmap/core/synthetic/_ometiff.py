"""The slide file: a pyramidal OME-TIFF written tile by tile.

Level 0 is rendered in rows of ``tile_px`` blocks (each in pieces of at most 512 × 512 px) and
streamed to tifffile as 512 px JPEG tiles; each block is also halved into level 1 of a temporary
zarr pyramid, from which the smaller SubIFD levels (factors of 2, down to < 1024 px) are made.
Memory stays bounded by one row of blocks.

Units: level-0 pixels (y, x); ``PhysicalSizeX/Y`` in µm; RGB uint8 (h, w, 3).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ._fields import _World
from ._raster import _pieces
from ._render import _render_rgb
from ._sample import _Progress

_SLIDE_TILE = 512
_TIFF_OPTS = {"tile": (_SLIDE_TILE, _SLIDE_TILE), "photometric": "rgb", "compression": "jpeg",
              "compressionargs": {"level": 90}, "dtype": np.uint8, "maxworkers": 2, "buffersize": 1 << 24,
              "resolutionunit": "CENTIMETER"}  # fmt: skip


def _level_shapes(world: _World) -> list[tuple[int, int]]:
    """(height, width) px of each pyramid level: halving until the longest side is < 1024 px."""
    shapes = [(world.height_px, world.width_px)]
    while max(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _halve(image: np.ndarray) -> np.ndarray:
    """2 × 2 mean of an (h, w, 3) uint8 image (odd sizes padded by edge replication)."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    total = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, 3).sum(
        axis=(1, 3), dtype=np.uint16
    )
    return ((total + 2) // 4).astype(np.uint8)


def _render_block(world: _World, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Render a block in pieces of at most 512 × 512 px: bounded temporaries, same pixels."""
    out = np.empty((h, w, 3), dtype=np.uint8)
    for y, x, ph, pw in _pieces(h, w, _SLIDE_TILE):
        out[y : y + ph, x : x + pw] = _render_rgb(world, top + y, left + x, ph, pw)
    return out


def _row_tiles(band: np.ndarray) -> Iterator[np.ndarray]:
    """512 px tiles of one row of tiles (≤ 512, w, 3), left to right, as copies (tifffile's
    buffer must not pin the band)."""
    for tx in range(0, band.shape[1], _SLIDE_TILE):
        yield band[:, tx : tx + _SLIDE_TILE].copy()


def _level0_tiles(
    world: _World, tile_px: int, level1: Any, steps: _Progress
) -> Iterator[np.ndarray]:
    """512 px tiles of level 0 in TIFF order, generated in rows of ``tile_px`` blocks; each
    block is also halved into level 1 (a temporary zarr array) when there is one."""
    height, width = world.height_px, world.width_px
    for top in range(0, height, tile_px):
        h = min(tile_px, height - top)
        strip = np.empty((h, width, 3), dtype=np.uint8)
        for left in range(0, width, tile_px):
            w = min(tile_px, width - left)
            strip[:, left : left + w] = block = _render_block(world, top, left, h, w)
            if level1 is not None:
                level1[top // 2 : (top + h + 1) // 2, left // 2 : (left + w + 1) // 2] = _halve(
                    block
                )
            steps.tick()
        for ty in range(0, h, _SLIDE_TILE):
            yield from _row_tiles(strip[ty : ty + _SLIDE_TILE])
        del strip


def _array_tiles(array: Any) -> Iterator[np.ndarray]:
    """512 px tiles of a (h, w, 3) zarr array in TIFF order, read one row of tiles at a time."""
    for ty in range(0, array.shape[0], _SLIDE_TILE):
        band = np.asarray(array[ty : ty + _SLIDE_TILE])
        yield from _row_tiles(band)
        del band


def _halve_level(source: Any, target: Any) -> None:
    """Fill pyramid level ``target`` from ``source`` (zarr arrays), 512 source rows at a time."""
    for top in range(0, source.shape[0], 2 * _SLIDE_TILE):
        target[top // 2 : top // 2 + _SLIDE_TILE] = _halve(
            np.asarray(source[top : top + 2 * _SLIDE_TILE])
        )


def _pyramid_store(tmp: Path, shapes: list[tuple[int, int]]) -> list[Any]:
    """Empty zarr arrays (h, w, 3) uint8 for pyramid levels 1, 2, ... in the folder ``tmp``."""
    import zarr

    store = zarr.open_group(tmp, mode="w")
    return [
        store.create_array(
            str(k), shape=(*shape, 3), chunks=(_SLIDE_TILE // 2, _SLIDE_TILE, 3), dtype="uint8"
        )
        for k, shape in enumerate(shapes[1:], start=1)
    ]


def _write_slide(world: _World, path: Path, tile_px: int, steps: _Progress) -> int:
    """Write the pyramidal OME-TIFF; return the number of levels."""
    shapes = _level_shapes(world)
    tmp = path.parent / ".pyramid.tmp.zarr"
    levels = _pyramid_store(tmp, shapes)
    metadata = {"axes": "YXS", "PhysicalSizeX": world.mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": world.mpp, "PhysicalSizeYUnit": "µm", "Name": "synthetic H&E"}  # fmt: skip
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tiles = _level0_tiles(world, tile_px, levels[0] if levels else None, steps)
        res = 1e4 / world.mpp
        tif.write(
            tiles,
            shape=(*shapes[0], 3),
            subifds=len(levels),
            resolution=(res, res),
            metadata=metadata,
            **_TIFF_OPTS,
        )
        for k, level in enumerate(levels, start=1):
            if k >= 2:
                _halve_level(levels[k - 2], level)
            res = 1e4 / (world.mpp * 2**k)
            tif.write(
                _array_tiles(level),
                shape=(*shapes[k], 3),
                subfiletype=1,
                resolution=(res, res),
                **_TIFF_OPTS,
            )
            steps.tick()
    shutil.rmtree(tmp)
    steps.tick()
    return len(shapes)
