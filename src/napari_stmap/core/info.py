"""Short descriptions of slides and measured spots (``stmap info``)."""

from __future__ import annotations

from pathlib import Path

from .errors import StmapInputError


def describe(path: str | Path, *, mpp: float | None = None, bin_um: float | None = None) -> dict:
    """Describe a slide or measured spots/bins as a JSON-ready dict.

    Returns
    -------
    dict
        Slide: ``{"kind": "slide", "shape_yx": [H, W], "levels": n, "mpp": µm/px, ...}``.
        Spots: ``{"kind": "spots", "n_spots": n, "n_genes": g, "bin_um": b,
        "footprint": "disk"|"square", "mpp": µm/px, ...}``.
    """
    from .spots import available_bin_sizes, detect_spots_layout, read_spots

    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or folder; check the path"
        raise StmapInputError(msg)
    layout = detect_spots_layout(path)
    if layout is not None:
        spots = read_spots(path, bin_um=bin_um)
        info = {
            "kind": "spots",
            "n_spots": spots.n_spots,
            "n_genes": spots.n_genes,
            "bin_um": spots.bin_um,
            "footprint": spots.footprint,
            "mpp": spots.mpp,
            "layout": layout,
            "library_id": spots.library_id,
            "n_in_tissue": int(spots.in_tissue.sum()),
        }
        if layout == "visium_hd":
            info["bin_sizes_um"] = available_bin_sizes(path)
        return info
    if path.is_dir():
        msg = (
            f"{path}: folder is not Space Ranger output (expected spatial/tissue_positions*.csv, "
            "binned_outputs/square_NNNum/ or a .h5ad); point to the 'outs' folder"
        )
        raise StmapInputError(msg)
    return _describe_slide(path, mpp)


def _describe_slide(path: Path, mpp: float | None) -> dict:
    from .slide import open_slide

    slide = open_slide(path, mpp=mpp)
    return {
        "kind": "slide",
        "shape_yx": list(slide.shape_yx),
        "levels": slide.n_levels,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "path": str(path),
    }
