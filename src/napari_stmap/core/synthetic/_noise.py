"""Counter-based random numbers, value noise and bitwise-reproducible elementary functions.

Every random number of the synthetic tissue is a hash of (seed, stream, integer keys), so it is
a pure function of position and never depends on the order or tiling of generation. Trigonometry
goes through Python's scalar ``math`` so that vectorised code gets the very same bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)
_K3 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 in, uint64 out; wraps on overflow)."""
    h = h ^ (h >> np.uint64(30))
    h = h * _K2
    h = h ^ (h >> np.uint64(27))
    h = h * _K3
    return h ^ (h >> np.uint64(31))


def _hash_bits(seed: int, stream: int, *keys: Any) -> np.ndarray:
    """64 random bits per element of the broadcast integer ``keys``; pure function of its inputs."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    with np.errstate(over="ignore"):
        start = _mix(
            np.array((seed & 0xFFFFFFFF) * 0x100000001 + stream * 0x9E3779B1, dtype=np.uint64)
        )
        h = np.full(arrays[0].shape, start, dtype=np.uint64)
        for k in arrays:
            h = _mix(h ^ (k.astype(np.uint64) * _K1))
    return h


def _hash_u01(seed: int, stream: int, *keys: Any) -> np.ndarray:
    """Uniform float64 in [0, 1) per element of the broadcast integer ``keys``."""
    return (_hash_bits(seed, stream, *keys) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def _smoothstep01(t: np.ndarray) -> np.ndarray:
    """Hermite smoothstep of ``t`` clipped to [0, 1] (polynomial only: bitwise reproducible)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _scalar_cos_sin(angles: np.ndarray, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of each angle (radians) through scalar ``math``: the same bits everywhere."""
    cos = np.array([math.cos(a) for a in angles], dtype=dtype)
    sin = np.array([math.sin(a) for a in angles], dtype=dtype)
    return cos, sin


def _value_noise(
    seed: int, stream: int, y: np.ndarray, x: np.ndarray, scale_y: float, scale_x: float
) -> np.ndarray:
    """Value noise in [-1, 1]: hashed lattice values at (scale_y, scale_x) µm, smooth interpolation.

    Lattice values are hashed once per lattice point (a small table) and gathered per point;
    the result is a pure function of the point's coordinates.
    """
    offset = 0.6180339887 * (stream % 97)
    ty, tx = y / scale_y + offset, x / scale_x + 2 * offset
    iy, ix = np.floor(ty), np.floor(tx)
    sy, sx = _smoothstep01(ty - iy), _smoothstep01(tx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    span_y, span_x = int(iy.max()) - y0 + 2, int(ix.max()) - x0 + 2
    if span_y * span_x <= np.broadcast(iy, ix).size:  # hash a lattice table, then gather
        table = _hash_u01(
            seed, stream, np.arange(y0, y0 + span_y)[:, None], np.arange(x0, x0 + span_x)[None, :]
        )
        table = table * 2.0 - 1.0
        ry, rx = np.broadcast_arrays(iy - y0, ix - x0)

        def corner(dy: int, dx: int) -> np.ndarray:
            return table[ry + dy, rx + dx]
    else:

        def corner(dy: int, dx: int) -> np.ndarray:
            return _hash_u01(seed, stream, iy + dy, ix + dx) * 2.0 - 1.0

    top = corner(0, 0) + (corner(0, 1) - corner(0, 0)) * sx
    bottom = corner(1, 0) + (corner(1, 1) - corner(1, 0)) * sx
    return top + (bottom - top) * sy
