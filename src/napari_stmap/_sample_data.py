"""npe2 sample data: the synthetic H&E slide with Visium HD bins (known truth).

The sample is generated once (a few seconds) into the user cache folder
(``$STMAP_CACHE`` or ``~/.cache/napari-stmap``) and reused afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Parameters of the built-in sample (the demo, the docs and the sample-data menu use it).
SAMPLE_KWARGS = {"size_um": (1500.0, 1500.0), "mpp": 0.5, "n_genes": 60, "seed": 0}
SAMPLE_BIN_UM = 8.0


def cache_dir() -> Path:
    """Folder for generated samples and cached models (``$STMAP_CACHE`` wins)."""
    root = os.environ.get("STMAP_CACHE") or Path.home() / ".cache" / "napari-stmap"
    return Path(root)


def ensure_sample(progress=None):
    """Return the built-in synthetic sample, generating it on first use.

    Returns
    -------
    SyntheticSample
        Paths of the slide (``he.ome.tif``), the Space Ranger ``outs`` and the truth.
    """
    from . import __version__
    from .core.synthetic import load_synthetic, write_synthetic

    root = cache_dir() / f"synthetic-v{__version__}-seed{SAMPLE_KWARGS['seed']}"
    if (root / "synthetic.json").is_file():
        return load_synthetic(root)
    logger.info("generating the synthetic sample in %s", root)
    tmp = root.with_name(root.name + ".partial")
    write_synthetic(tmp, overwrite=True, progress=progress, **SAMPLE_KWARGS)
    tmp.rename(root)  # atomic: a half-written sample is never reused
    return load_synthetic(root)


def synthetic_sample() -> list:
    """Layer data: the synthetic slide and its measured 8 µm bins (total counts)."""
    from ._layers import slide_layer, spots_layer
    from .core.io.slide import open_slide
    from .core.io.spots import read_visium_hd

    sample = ensure_sample()
    slide = open_slide(sample.slide)
    bins = read_visium_hd(sample.outs, bin_um=SAMPLE_BIN_UM)
    return [
        slide_layer(slide, name="synthetic H&E"),
        spots_layer(bins, name=f"synthetic {SAMPLE_BIN_UM:g} µm", opened=sample.outs),
    ]
