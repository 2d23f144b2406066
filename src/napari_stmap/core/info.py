"""Short descriptions of slides, measured spots and prediction stores (``stmap info``)."""

from __future__ import annotations

from pathlib import Path

from .errors import StmapInputError


def describe(
    path: str | Path,
    *,
    mpp: float | None = None,
    bin_um: float | None = None,
    backend: str = "auto",
) -> dict:
    """Describe a slide, measured spots/bins or a prediction store as a JSON-ready dict.

    ``backend`` is the slide reader (see :func:`~napari_stmap.core.io.slide.open_slide`).

    Returns
    -------
    dict
        Slide: ``{"kind": "slide", "shape_yx": [H, W], "levels": n, "mpp": µm/px,
        "backend": reader, ...}``.
        Spots: ``{"kind": "spots", "n_spots": n, "n_genes": g, "bin_um": b,
        "footprint": "disk"|"square", "mpp": µm/px, ...}``.
        Prediction store (``stmap predict --out``): ``{"kind": "prediction store", "model":
        path, "slide": path, "tiles": {"done", "off_tissue", "todo", "total"}, "mpp": µm/px,
        "stride": model px per map px, "genes": [...], ...}`` (see :func:`describe_store`).
    """
    from .io.spots import available_bin_sizes, detect_spots_layout, read_spots
    from .store import read_store_meta

    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or folder; check the path"
        raise StmapInputError(msg)
    if read_store_meta(path) is not None:
        return describe_store(path)
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
    if path.is_dir() and path.suffix == ".zarr":
        msg = (
            f"{path}: folder is not a napari-stmap prediction store (no zarr.json with 'stmap' "
            "metadata); "
            "point to a store written by `stmap predict --out STORE.zarr`"
        )
        raise StmapInputError(msg)
    if path.is_dir():
        msg = (
            f"{path}: folder is not Space Ranger output (expected spatial/tissue_positions*.csv, "
            "binned_outputs/square_NNNum/ or a .h5ad); point to the 'outs' folder"
        )
        raise StmapInputError(msg)
    return _describe_slide(path, mpp, backend)


def _describe_slide(path: Path, mpp: float | None, backend: str = "auto") -> dict:
    from .io.slide import open_slide

    slide = open_slide(path, mpp=mpp, backend=backend)
    return {
        "kind": "slide",
        "shape_yx": list(slide.shape_yx),
        "levels": slide.n_levels,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "backend": slide.backend,
        "path": str(path),
    }


def describe_store(path: str | Path) -> dict:
    """Describe a prediction store (what ``stmap predict`` wrote) without changing it.

    Returns
    -------
    dict
        ``kind`` ("prediction store"), ``path``; the ``model`` file (None if not recorded),
        ``model_found``, ``arch``, ``model_sha256``; the ``slide`` file, ``slide_found``, its
        level-0 ``shape_yx`` [H, W] px and ``mpp`` µm/px; ``model_mpp`` µm per model px,
        ``stride`` model px per map px, ``map_pixel_um`` µm per map px; ``tile_px``/``halo_px``
        model px; ``tiles`` {done, off_tissue, todo, total}; ``n_genes``, ``genes``;
        ``embed_dim``, ``embedding_dtype``, ``napari_stmap_version``.
    """
    from .store import open_store

    path = Path(path)
    try:
        store = open_store(path, mode="r")
    except StmapInputError:
        raise
    except (KeyError, OSError, TypeError, ValueError) as exc:
        msg = (
            f"{path}: prediction store is damaged ({type(exc).__name__}: {exc}); predict "
            "again into a new --out"
        )
        raise StmapInputError(msg) from None
    return {"kind": "prediction store", "path": str(path), **_store_fields(store)}


def _store_fields(store) -> dict:
    """:func:`describe_store`'s fields of an open store, from its metadata and done-map."""
    m, sl, c = store.meta["model"], store.meta["slide"], store.counts()
    return {
        "model": m.get("path"),
        "model_found": bool(m.get("path")) and Path(m["path"]).is_file(),
        "arch": m.get("arch") or None,
        "model_sha256": m["sha256"],
        "slide": sl["path"],
        "slide_found": Path(sl["path"]).is_file(),
        "shape_yx": [int(v) for v in sl["shape_yx"]],
        "mpp": float(sl["mpp"]),
        "model_mpp": float(m["mpp"]),
        "stride": int(m["stride"]),
        "map_pixel_um": float(m["mpp"]) * int(m["stride"]),
        "tile_px": int(store.spec.tile_px),
        "halo_px": int(store.spec.halo_px),
        "tiles": {
            "done": c["done"],
            "off_tissue": c["skipped"],
            "todo": c["todo"],
            "total": int(store.spec.n_tiles),
        },
        "n_genes": len(store.genes),
        "genes": list(store.genes),
        "embed_dim": store.embed_dim,
        "embedding_dtype": str(store.dtype),
        "napari_stmap_version": store.meta.get("napari_stmap_version"),
    }
