"""SpatialData (scverse) zarr stores: a table, the shapes it annotates, their transformation.

A store written by ``spatialdata`` / ``spatialdata-io`` (Visium, Visium HD, Xenium, ...) holds
measured spots as a **table** (AnnData, ``uns['spatialdata_attrs']`` = ``region``,
``region_key``, ``instance_key``) that annotates a **shapes** element (circles: points with a
``radius`` column; squares or other polygons), each shape placed in one or more coordinate
systems by a transformation. :func:`read_spots_spatialdata` turns them into the project's
:class:`~napari_stmap.core.io.spots.Spots`: centres in level-0 px of the H&E slide, (y, x),
with the same alignment checks as the Space Ranger readers.

Which frame is "level-0 px of the slide" (the *target*): with ``E`` the H&E image element
(``image=``, else the finest RGB(A) image sharing a coordinate system with the shapes), the
first coordinate system shared by the shapes and ``E`` in which

1. both are the identity (``E`` is the full-resolution image, the shapes in its px);
2. the shapes are the identity and ``E`` a pure scale (Space Ranger's convention as
   spatialdata-io keeps it: positions in full-resolution px, only the downscaled hires/lowres
   images in the store);
3. ``E`` is the identity (shapes in other units, e.g. µm, scaled into ``E``'s px);
4. else ``E``'s own pixels (e.g. Xenium: shapes in µm, the H&E aligned by an affine).

µm per target px (``mpp``): the table's ``uns['spatial'][library]['scalefactors']`` (what
spatialdata-io writes for Visium, and the project's exports), else the Visium HD table name
``square_NNNum`` (spatialdata-io's naming) with the square side in px, else the caller's ``mpp``
(the slide's).

Footprints: circles of one radius are disks, polygons that are squares of one size are square
bins; anything else (cells: circles of many radii, cell outlines) is summed into square
**pseudo-spots** of ``bin_um`` µm (default :data:`DEFAULT_PSEUDO_SPOT_UM`) on a grid aligned with
the target's axes: each cell's counts go to the square holding its centroid (so a cell on a
border counts wholly on one side), and only squares holding cells are kept.

Reading never writes to the store. spatialdata is imported only here, inside functions.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ...errors import StmapInputError
from ._checks import bbox_text, check_finite, check_scalefactor_images, warn_input
from ._container import Spots
from ._spaceranger import (
    VISIUM_PITCH_UM,
    VISIUM_SCALED_DIAMETER_UM,
    counts_dtype,
    physical_scale,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "napari-stmap[spatialdata]"'
#: Side of the square pseudo-spots that cells are summed into, µm (when none is asked for).
DEFAULT_PSEUDO_SPOT_UM = 16.0
_SQUARE_NAME = re.compile(r"square_(\d+(?:\.\d+)?)um$")
#: Shapes whose sizes differ by more than this (relative) are cells, not bins.
_SIZE_TOLERANCE = 0.02
_THUMB_PX = 2000


# ------------------------------------------------------------------------------ detection
def _zarr_attrs(folder: Path) -> dict | None:
    """Attributes of a zarr group folder (v3 ``zarr.json`` or v2 ``.zattrs``), None if not one."""
    v3, v2 = folder / "zarr.json", folder / ".zgroup"
    try:
        if v3.is_file():
            meta = json.loads(v3.read_text())
            return meta.get("attributes", {}) if meta.get("node_type") == "group" else None
        if v2.is_file():
            attrs = folder / ".zattrs"
            return json.loads(attrs.read_text()) if attrs.is_file() else {}
    except (OSError, ValueError):
        return None
    return None


def _is_root(folder: Path) -> bool:
    """A SpatialData store root: a zarr group with ``spatialdata_attrs`` (or element groups)."""
    attrs = _zarr_attrs(folder)
    if attrs is None or "stmap" in attrs:  # a prediction store is not SpatialData
        return False
    if "spatialdata_attrs" in attrs:
        return True
    kinds = ("images", "labels", "points", "shapes", "tables")
    return any(_zarr_attrs(folder / k) is not None for k in kinds)


def spatialdata_location(path: str | Path) -> tuple[Path, str | None] | None:
    """``(store root, table name or None)`` when ``path`` is a SpatialData store or a table in one.

    ``path`` may be the store (``data.zarr``) or one of its tables (``data.zarr/tables/NAME``).
    Reads two small JSON files at most; never raises, never writes.
    """
    try:
        p = Path(path).expanduser()
        if not p.is_dir():
            return None
        if p.parent.name == "tables" and _is_root(p.parent.parent):
            return p.parent.parent, p.name
        if _is_root(p):
            return p, None
    except OSError:
        return None
    return None


def table_names(root: Path) -> list[str]:
    """Names of the tables of a SpatialData store (folders under ``tables/``), sorted."""
    folder = root / "tables"
    if not folder.is_dir():
        return []
    return sorted(
        c.name
        for c in folder.iterdir()
        if not c.name.startswith(".") and _zarr_attrs(c) is not None
    )


def _bin_tables(names: list[str]) -> dict[float, str]:
    """``{bin_um: table}`` for tables named like spatialdata-io's Visium HD ``square_NNNum``."""
    return {float(m.group(1)): n for n in names if (m := _SQUARE_NAME.search(n))}


def spatialdata_bin_sizes(path: str | Path) -> list[float]:
    """Visium HD bin sizes (µm) of a SpatialData store's ``square_NNNum`` tables; [] otherwise.

    A path to one table gives that table's size only.
    """
    loc = spatialdata_location(path)
    if loc is None:
        return []
    root, table = loc
    names = [table] if table is not None else table_names(root)
    return sorted(_bin_tables(names))


def describe_path(path: str | Path) -> str:
    """What ``path`` is, for messages: missing, a file, or a folder (zarr or not) and its entries."""
    p = Path(path).expanduser()
    if not p.exists():
        return "no such file or folder"
    if p.is_file():
        return f"it is a {p.suffix or 'plain'} file"
    entries = sorted(c.name for c in p.iterdir() if not c.name.startswith("."))
    kind = "a zarr group" if _zarr_attrs(p) is not None else "a folder"
    if "zarr.json" in entries:
        entries.remove("zarr.json")
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return f"it is {kind} holding {shown or 'nothing'}"


def table_path(path: str | Path, table: str) -> Path:
    """``STORE/tables/TABLE`` for a SpatialData store ``path`` and a table name (checked).

    Raises :class:`StmapInputError` (one line) when ``path`` is no SpatialData store (saying
    what it is) or has no table ``table`` (naming the tables present).
    """
    loc = spatialdata_location(path)
    if loc is None:
        msg = f"{path}: --table {table} needs a SpatialData .zarr store, but {describe_path(path)}"
        raise StmapInputError(msg)
    root, in_path = loc
    if in_path is not None and in_path != table:
        msg = f"{path} is table {in_path!r}, not {table!r}; pass the store with --table {table}"
        raise StmapInputError(msg)
    names = table_names(root)
    if table not in names:
        msg = f"{root}: no table {table!r}; tables present: {', '.join(names) or 'none'}"
        raise StmapInputError(msg)
    return root / "tables" / table


def _import_spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        msg = f"reading a SpatialData store needs spatialdata: {INSTALL_HINT}"
        raise StmapInputError(msg) from err
    return spatialdata


# ------------------------------------------------------------------------------ the table
def _choose_table(root: Path, table: str | None, bin_um: float | None) -> tuple[str, bool]:
    """The table to read and whether ``bin_um`` chose it (a Visium HD bin size)."""
    names = table_names(root)
    if not names:
        msg = f"{root}: this SpatialData store has no tables; add one that annotates the spots"
        raise StmapInputError(msg)
    if table is not None:
        if table not in names:
            msg = f"{root}: no table {table!r}; tables present: {', '.join(names)}"
            raise StmapInputError(msg)
        return table, False
    bins = _bin_tables(names)
    if bins and (bin_um is not None or len(names) > 1):
        if bin_um is None:
            size = 8.0 if 8.0 in bins else min(bins)
            return bins[size], True
        for size, name in bins.items():
            if math.isclose(size, float(bin_um)):
                return name, True
        sizes = ", ".join(f"{s:g}" for s in sorted(bins))
        msg = f"{root}: no {float(bin_um):g} µm bins; bin tables present: {sizes} µm"
        raise StmapInputError(msg)
    if len(names) > 1:
        msg = (
            f"{root}: {len(names)} tables ({', '.join(names)}); pass --table NAME (or open "
            f"{root.name}/tables/NAME)"
        )
        raise StmapInputError(msg)
    return names[0], False


def _annotated_shapes(sdata: Any, adata: Any, root: Path, name: str) -> tuple[Any, Any, str]:
    """(table rows, shapes rows in table order, shapes name) of the table's one region."""
    attrs = adata.uns.get("spatialdata_attrs") or {}
    region, key, inst = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or key is None or inst is None:
        msg = (
            f"{root}: table {name!r} annotates no element (no region/region_key/instance_key in "
            "uns['spatialdata_attrs']); parse it with spatialdata's TableModel"
        )
        raise StmapInputError(msg)
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    if len(regions) > 1:
        msg = (
            f"{root}: table {name!r} annotates {len(regions)} elements ({', '.join(regions)}); "
            "split it into one table per section (spatialdata's match_table_to_element)"
        )
        raise StmapInputError(msg)
    region = regions[0]
    if region not in sdata.shapes:
        what = "a labels element" if region in sdata.labels else "no shapes element"
        msg = (
            f"{root}: table {name!r} annotates {region!r}, {what}; measured spots must be shapes "
            f"(circles or polygons); shapes present: {', '.join(sdata.shapes) or 'none'}"
        )
        raise StmapInputError(msg)
    rows = adata[adata.obs[key].astype(str).to_numpy() == region]
    shapes = sdata.shapes[region]
    ids = rows.obs[inst].to_numpy()
    missing = ~np.isin(ids, shapes.index.to_numpy())
    if missing.any():
        msg = (
            f"{root}: {int(missing.sum())} of {len(ids)} rows of table {name!r} have no shape in "
            f"{region!r} (instance_key {inst!r}, e.g. {ids[missing][0]!r}); the table and shapes "
            "come from different runs"
        )
        raise StmapInputError(msg)
    return rows, shapes.loc[ids], region


# ------------------------------------------------------------------------------ the frame
def _matrix(transform: Any) -> np.ndarray:
    """3 × 3 affine matrix of a spatialdata transformation on (x, y)."""
    return np.asarray(
        transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


def _pure_scale(m: np.ndarray) -> float | None:
    """The factor of a 3 × 3 matrix that is an isotropic scale without shift, else None."""
    s = m[0, 0]
    ok = s > 0 and np.allclose(m, np.diag([s, s, 1.0]), rtol=1e-6, atol=1e-9 * max(1.0, s))
    return float(s) if ok else None


def _transforms(element: Any) -> dict[str, np.ndarray]:
    from spatialdata.transformations import get_transformation

    return {cs: _matrix(t) for cs, t in get_transformation(element, get_all=True).items()}


def _image_shape(image: Any) -> tuple[int, int, int]:
    """(c, y, x) of an image element's finest level."""
    from spatialdata import get_pyramid_levels

    data = get_pyramid_levels(image, n=0) if hasattr(image, "children") else image
    sizes = dict(data.sizes)
    return int(sizes.get("c", 1)), int(sizes["y"]), int(sizes["x"])


def _choose_image(sdata: Any, shapes_cs: set[str], image: str | None, root: Path) -> str | None:
    """The H&E element: ``image``, else the finest RGB(A) image in a coordinate system of the
    shapes (the first by name on a tie); None when the store has none."""
    if image is not None:
        if image not in sdata.images:
            have = ", ".join(sdata.images) or "none"
            msg = f"{root}: no image {image!r}; images present: {have}"
            raise StmapInputError(msg)
        return image
    best, best_px = None, math.inf
    for name in sorted(sdata.images):
        el = sdata.images[name]
        if _image_shape(el)[0] not in (3, 4):
            continue
        common = shapes_cs & set(_transforms(el))
        for cs in sorted(common):
            m = _transforms(el)[cs]
            px = math.sqrt(abs(np.linalg.det(m[:2, :2])))  # target units per image px
            if px < best_px * (1 - 1e-9):
                best, best_px = name, px
    return best


def _frame(sdata: Any, shapes: Any, image: str | None, root: Path) -> dict[str, Any]:
    """Where level-0 px of the slide are: the coordinate system (or image) and the matrices.

    Returns ``{"target": cs name or image name, "shapes_to_target": 3×3, "image": name or
    None, "image_scale": target px per image px (pure scale) or None, "rule": text}``.
    """
    shape_t = _transforms(shapes)
    name = _choose_image(sdata, set(shape_t), image, root)
    if name is not None:
        img_t = _transforms(sdata.images[name])
        common = sorted(set(shape_t) & set(img_t))
        scales = {cs: (_pure_scale(shape_t[cs]), _pure_scale(img_t[cs])) for cs in common}
        rules = (
            (lambda a, b: a == 1.0 and b == 1.0, "shapes and H&E image are the identity"),
            (lambda a, b: a == 1.0 and b is not None, "full-resolution px (Space Ranger)"),
            (lambda a, b: b == 1.0, "the H&E image is the identity"),
        )
        for test, rule in rules:
            for cs in common:
                if test(*scales[cs]):
                    return _frame_dict(cs, shape_t[cs], name, scales[cs][1], rule)
        if not common:
            msg = (
                f"{root}: the shapes ({', '.join(sorted(shape_t))}) and image {name!r} "
                f"({', '.join(sorted(img_t))}) share no coordinate system; register them first"
            )
            raise StmapInputError(msg)
        cs = common[0]
        m = np.linalg.inv(img_t[cs]) @ shape_t[cs]
        return _frame_dict(name, m, name, 1.0, f"pixels of image {name!r} (via {cs!r})")
    ident = [cs for cs, m in sorted(shape_t.items()) if _pure_scale(m) == 1.0]
    cs = ident[0] if ident else sorted(shape_t)[0]
    warn_input(
        f"{root}: no H&E image in the store; spot positions are taken in its coordinate system "
        f"{cs!r}, which must be level-0 px of the slide"
    )
    return _frame_dict(cs, shape_t[cs], None, None, f"coordinate system {cs!r}")


def _frame_dict(target, m, image, scale, rule) -> dict[str, Any]:
    return {
        "target": target,
        "shapes_to_target": m,
        "image": image,
        "image_scale": scale,
        "rule": rule,
    }


# ------------------------------------------------------------------------------ geometry
def _geometry(shapes: Any, m: np.ndarray, root: Path, region: str) -> dict[str, Any]:
    """Centres (y, x) in target px, sizes in target px, and the kind of the shapes.

    ``kind``: ``"disk"`` (circles of one radius), ``"square"`` (squares of one size) or
    ``"cells"`` (anything else). ``size_px``: disk diameter or square side (median).
    """
    geom = shapes.geometry
    types = set(geom.geom_type.unique())
    lin = m[:2, :2]
    scale = math.sqrt(abs(np.linalg.det(lin)))
    if types <= {"Point"}:
        if "radius" not in shapes:
            msg = (
                f"{root}: shapes {region!r} are points without a 'radius' column; measured spots "
                "must be circles (ShapesModel with radius) or polygons"
            )
            raise StmapInputError(msg)
        xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
        sizes = 2.0 * shapes["radius"].to_numpy(float) * scale
        kind = "disk"
    elif types <= {"Polygon", "MultiPolygon"}:
        cen = geom.centroid
        xy = np.column_stack([cen.x.to_numpy(), cen.y.to_numpy()])
        area, perim = geom.area.to_numpy(float), geom.length.to_numpy(float)
        sizes = np.sqrt(area) * scale
        squareness = perim**2 / np.maximum(16.0 * area, 1e-300)
        kind = "square" if np.allclose(squareness, 1.0, atol=0.01) else "cells"
    else:
        msg = (
            f"{root}: shapes {region!r} hold {sorted(types)} geometries; measured spots must be "
            "circles or polygons"
        )
        raise StmapInputError(msg)
    xy_t = xy @ m[:2, :2].T + m[:2, 2]
    med = float(np.median(sizes)) if len(sizes) else float("nan")
    if kind != "cells" and len(sizes) and np.abs(sizes / med - 1).max() > _SIZE_TOLERANCE:
        kind = "cells"
    if kind != "cells" and not _is_similarity(lin):
        msg = (
            f"{root}: the shapes' transformation to the slide shears or stretches them "
            f"(matrix {np.round(lin, 6).tolist()}); bins must keep their shape"
        )
        raise StmapInputError(msg)
    return {"centers_yx": xy_t[:, ::-1].copy(), "size_px": med, "kind": kind}


def _is_similarity(lin: np.ndarray) -> bool:
    """Rotation × isotropic scale (× a flip)."""
    gram = lin.T @ lin
    return bool(np.allclose(gram, gram[0, 0] * np.eye(2), rtol=1e-4, atol=1e-12))


# ------------------------------------------------------------------------------ the scale
def _scalefactors(adata: Any, root: Path, name: str) -> tuple[str, dict]:
    """(library id, Space Ranger scale factors) from ``uns['spatial']``; ``(name, {})`` if none."""
    libs = adata.uns.get("spatial") if hasattr(adata.uns, "get") else None
    if not isinstance(libs, dict) or not libs:
        return name, {}
    if len(libs) > 1:
        logger.info(
            "%s: table %r has %d libraries in uns['spatial']; using the first",
            root,
            name,
            len(libs),
        )
    lib = next(iter(libs))
    return str(lib), dict(dict(libs[lib]).get("scalefactors", {}))


def _physical(
    geo: dict, sf: dict, name: str, region: str, mpp: float | None, root: Path, bin_um: float | None
) -> dict[str, Any]:
    """Footprint, sizes, µm/px and pitch (the keywords of :class:`Spots` from the scale).

    Space Ranger scale factors decide when they describe these shapes (``bin_size_um``, or
    Visium circles of ``spot_diameter_fullres``); else the ``square_NNNum`` name; else the
    geometry at the scale factors' ``microns_per_pixel`` or the caller's ``mpp``.
    """
    kind, size_px = geo["kind"], geo["size_px"]
    sf_mpp = sf.get("microns_per_pixel")
    mpp = float(sf_mpp) if sf_mpp else mpp
    if kind == "cells":
        if mpp is None or not mpp > 0:
            _unknown_mpp(root, name)
        size_um = float(bin_um or DEFAULT_PSEUDO_SPOT_UM)
        return _scale_dict("square", size_um, size_um / mpp, float(mpp), size_um)
    diameter = float(sf.get("spot_diameter_fullres") or 0.0)
    visium = kind == "disk" and diameter > 0 and abs(size_px / diameter - 1) < _SIZE_TOLERANCE
    if "bin_size_um" in sf or visium:
        out = physical_scale(sf, kind="hd" if kind == "square" else "auto", source=root)
        if out["footprint"] == kind:
            return out
    if kind == "disk" and not sf and _visium_lattice(size_px, geo.get("pitch_px")):
        # spatialdata-io keeps no scale factors: Space Ranger's circles are 65 µm across
        return physical_scale({"spot_diameter_fullres": size_px}, kind="auto", source=root)
    named = _SQUARE_NAME.search(name) or _SQUARE_NAME.search(region)
    if kind == "square" and named:
        size_um = float(named.group(1))
        return _scale_dict("square", size_um, size_px, size_um / size_px, size_um)
    if mpp is None or not mpp > 0:
        _unknown_mpp(root, name)
    return _scale_dict(kind, size_px * float(mpp), size_px, float(mpp), None)


def _visium_lattice(diameter_px: float, pitch_px: float | None) -> bool:
    """Circles on a Visium lattice: diameter / pitch = 65 µm / 100 µm (Space Ranger's sizes)."""
    if not pitch_px or not diameter_px > 0:
        return False
    return abs(diameter_px / pitch_px / (VISIUM_SCALED_DIAMETER_UM / VISIUM_PITCH_UM) - 1) < 0.03


def _array_pitch(rows: Any, centers_yx: np.ndarray) -> float | None:
    """Visium pitch in px from ``obs`` array_row/array_col: 2 columns apart (None if absent)."""
    obs = rows.obs
    if "array_row" not in obs or "array_col" not in obs or len(centers_yx) < 3:
        return None
    design = np.column_stack(
        [obs["array_row"].to_numpy(float), obs["array_col"].to_numpy(float), np.ones(len(obs))]
    )
    coef, *_ = np.linalg.lstsq(design, centers_yx, rcond=None)
    return float(2.0 * np.linalg.norm(coef[1]))


def _unknown_mpp(root: Path, name: str) -> None:
    msg = (
        f"{root}: µm/px unknown for table {name!r} (no uns['spatial'] scale factors, no "
        "square_NNNum name); pass the slide (--slide) or its µm/px"
    )
    raise StmapInputError(msg)


def _scale_dict(footprint, size_um, size_px, mpp, pitch) -> dict[str, Any]:
    return {
        "footprint": footprint,
        "bin_um": float(size_um),
        "size_um": float(size_um),
        "size_px": float(size_px),
        "mpp": float(mpp),
        "pitch_um": pitch,
    }


# ------------------------------------------------------------------------------ cells
def _pseudo_spots(centers_yx: np.ndarray, counts: sp.csr_matrix, side_px: float):
    """Cells summed into squares of ``side_px`` by centroid: (centres, counts, array_rc, names).

    The grid starts at the floor of the smallest centroid; only squares holding a cell are
    kept, in row-major order.
    """
    origin = np.floor(centers_yx.min(axis=0) / side_px) * side_px
    rc = np.floor((centers_yx - origin) / side_px).astype(np.int64)
    keys, inverse = np.unique(rc, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    assign = sp.csr_matrix(
        (np.ones(len(rc)), (inverse, np.arange(len(rc)))), shape=(len(keys), len(rc))
    )
    summed = counts_dtype(sp.csr_matrix(assign @ counts.astype(np.float64)))
    centres = origin + (keys + 0.5) * side_px
    names = np.array([f"pseudo_r{r}_c{c}" for r, c in keys], dtype=str)
    return centres, summed, keys, names


# ------------------------------------------------------------------------------ checks
def _attach_image(spots: Spots, sdata: Any, frame: dict) -> None:
    """The H&E element's level nearest 2000 px as ``images['hires']`` with its scale factor,
    so the Space Ranger image check (:func:`check_scalefactor_images`) applies to it."""
    name, s = frame["image"], frame["image_scale"]
    if name is None or s is None:
        return
    from spatialdata import get_pyramid_levels

    el = sdata.images[name]
    levels = get_pyramid_levels(el) if hasattr(el, "children") else [el]
    base_y = levels[0].sizes["y"]
    level = next(
        (lv for lv in levels if max(lv.sizes["y"], lv.sizes["x"]) <= _THUMB_PX), levels[-1]
    )
    arr = np.asarray(level.transpose("y", "x", "c").data)[..., :3]
    if arr.dtype != np.uint8:
        top = float(np.nanmax(arr, initial=0.0))
        arr = np.clip(arr * (255.0 / top if top <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    spots.images["hires"] = np.ascontiguousarray(arr)
    spots.scalefactors["tissue_hires_scalef"] = level.sizes["y"] / base_y / s
    spots.scalefactors.pop("tissue_lowres_scalef", None)


# ------------------------------------------------------------------------------ reading
def read_spots_spatialdata(
    path: str | Path,
    *,
    table: str | None = None,
    bin_um: float | None = None,
    image: str | None = None,
    mpp: float | None = None,
) -> Spots:
    """Read measured spots from a SpatialData zarr store (see the module notes for the rules).

    Parameters
    ----------
    path : str or Path
        The store (``data.zarr``) or one of its tables (``data.zarr/tables/NAME``).
    table : str, optional
        Table to read; default: the one in ``path``, the only table, or for Visium HD stores
        (tables ``square_NNNum``) the ``bin_um`` one (8 µm when present, else the smallest).
    bin_um : float, optional
        Visium HD bin size (picks the table), or the side of the pseudo-spots cells are summed
        into (µm; default :data:`DEFAULT_PSEUDO_SPOT_UM`).
    image : str, optional
        The H&E image element whose level-0 px the spots are placed in (default: the finest
        RGB(A) image).
    mpp : float, optional
        µm per level-0 px of the slide, used when the store does not say (cells, plain shapes).

    Returns
    -------
    Spots
        Centres in level-0 px (y, x); counts from ``layers['counts']`` if present, else ``X``.
    """
    loc = spatialdata_location(path)
    if loc is None:
        msg = (
            f"{path}: not a SpatialData zarr store (no zarr group with spatialdata_attrs); "
            f"{describe_path(path)}"
        )
        raise StmapInputError(msg)
    root, in_path = loc
    if in_path is not None and table is not None and table != in_path:
        msg = f"{path} is table {in_path!r} but table={table!r} was asked for; pass one of them"
        raise StmapInputError(msg)
    name, by_size = _choose_table(root, table or in_path, bin_um)
    sd = _import_spatialdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata's format notes, not the user's business
        sdata = sd.read_zarr(root, selection=("tables", "shapes", "images"))
    adata = sdata.tables[name]
    rows, shapes, region = _annotated_shapes(sdata, adata, root, name)
    frame = _frame(sdata, shapes, image, root)
    geo = _geometry(shapes, frame["shapes_to_target"], root, region)
    check_finite(geo["centers_yx"], root)
    geo["pitch_px"] = _array_pitch(rows, geo["centers_yx"])
    lib, sf = _scalefactors(rows, root, name)
    scale = _physical(geo, sf, name, region, mpp, root, None if by_size else bin_um)
    if bin_um is not None and not by_size and geo["kind"] != "cells":
        _check_not_finer(float(bin_um), scale, root, name)
    spots = _build(rows, geo, scale, sf, lib, root, name)
    _attach_image(spots, sdata, frame)
    check_scalefactor_images(spots)
    logger.info("read %r from %s (table %r, %s)", spots, root, name, frame["rule"])
    return spots


def _check_not_finer(bin_um: float, scale: dict, root: Path, name: str) -> None:
    """Refuse a scale finer than the table's spots (spots can be summed, never split)."""
    if bin_um < scale["size_um"] * (1 - 1e-6):
        msg = (
            f"{root}: table {name!r} holds {scale['size_um']:g} µm {scale['footprint']} spots, "
            f"finer {bin_um:g} µm units cannot be built from them"
        )
        raise StmapInputError(msg)


def _build(rows, geo, scale, sf, lib, root, name) -> Spots:
    from ._h5ad import _h5ad_counts, _h5ad_genes, _h5ad_obs_arrays

    counts = _h5ad_counts(rows, root)
    genes, gene_ids = _h5ad_genes(rows)
    centers, barcodes = geo["centers_yx"], np.asarray(rows.obs_names, dtype=str)
    in_tissue, array_rc = _h5ad_obs_arrays(rows, len(centers))
    if geo["kind"] == "cells":
        centers, counts, array_rc, barcodes = _pseudo_spots(centers, counts, scale["size_px"])
        in_tissue = np.ones(len(centers), bool)
        logger.info(
            "%s: %d cells of table %r summed into %d pseudo-spots of %g µm (span %s)",
            root,
            rows.n_obs,
            name,
            len(centers),
            scale["size_um"],
            bbox_text(centers),
        )
    return Spots(
        centers_yx=centers,
        counts=counts,
        genes=genes,
        gene_ids=gene_ids,
        barcodes=barcodes,
        in_tissue=in_tissue,
        array_rc=array_rc,
        library_id=lib,
        scalefactors=dict(sf),
        source=root / "tables" / name,
        **scale,
    )
