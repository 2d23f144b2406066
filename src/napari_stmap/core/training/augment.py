"""Augmentation of training images: 90° turns and flips (positions follow), stain jitter, blur.

The turns themselves are :func:`~napari_stmap.core.geometry.turn_image` and
:func:`~napari_stmap.core.geometry.turn_points`; stain jitter works in HED optical-density
space (Tellez et al.).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..geometry import turn_image, turn_points

__all__ = ["augment_tile", "hed_jitter"]


def hed_jitter(
    image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.01
) -> np.ndarray:
    """Stain jitter: scale and shift each of the H, E, D optical densities (Tellez et al.)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-bias, bias, 3)
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def augment_tile(
    image: np.ndarray, centers: np.ndarray, rng: np.random.Generator, *, colour: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random 90° turn + flip (points follow), HED stain jitter and, 1 time in 4, a mild blur.

    Parameters
    ----------
    image : numpy.ndarray
        (T, T, 3) uint8 tile.
    centers : numpy.ndarray
        (n, 2) tile px (y, x) of the spot centres.
    rng : numpy.random.Generator
        Randomness.
    colour : bool
        Apply stain jitter and blur (geometry is always augmented).

    Returns
    -------
    image, centers
        The augmented (T, T, 3) uint8 tile and its (n, 2) tile px (y, x) centres.
    """
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    image, centers = turn_image(image, k, flip), turn_points(centers, image.shape[0], k, flip)
    if colour:
        image = hed_jitter(image, rng)
        if rng.random() < 0.25:
            s = float(rng.uniform(0.3, 1.0))
            image = gaussian_filter(image, sigma=(s, s, 0), mode="reflect")
    return image, centers
