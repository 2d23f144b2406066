"""Model files: safetensors tensors + JSON metadata; never unpickled.

A model file is a plain ``.safetensors`` file. Its header's ``__metadata__`` maps the key
``"napari_stmap"`` to a JSON string with: ``format_version``, ``napari_stmap_version``,
``arch``, ``config`` (rebuilds the network), ``encoder``, ``genes``, ``mpp``, ``stride``,
``halo_px``, ``align_px``, ``exact_tiling``, ``normalisation``, ``input_kind`` and whatever the
caller adds (``training`` data, ``metrics``, ...).

Loading rebuilds the architecture from ``config`` (random init, no download) and copies the
tensors in. Pickle-based files (``.pt``/``.pth``/``.ckpt``, torch zip files) are refused before
a single byte of them is interpreted: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_stmap.core.errors import StmapInputError

if TYPE_CHECKING:
    from .base import StmapModel

__all__ = ["FORMAT_VERSION", "load_model", "read_model_metadata", "save_model"]

_logger = logging.getLogger(__name__)

#: Version of the model-file layout written by this napari-stmap; files up to it can be read.
FORMAT_VERSION = 1
_METADATA_KEY = "napari_stmap"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".zip")
_MAX_HEADER_BYTES = 100_000_000
_CONVERT_HINT = (
    "convert with napari_stmap.core.model.save_model(model, 'model.safetensors') in an "
    "environment where you trust the file"
)


def save_model(
    model: StmapModel, path: str | Path, *, metadata: dict[str, Any] | None = None
) -> None:
    """Write ``model`` to ``path`` (.safetensors) with JSON metadata.

    Parameters
    ----------
    model : StmapModel
        The network; its :meth:`~StmapModel.describe` goes into the metadata.
    path : path
        Output file; ``.safetensors`` is the expected suffix.
    metadata : dict, optional
        JSON-serialisable extras, e.g. ``{"training": {...}, "metrics": {...}}``. Keys must not
        clash with the ones napari-stmap writes.
    """
    from safetensors.torch import save_file

    import napari_stmap

    meta = {
        **model.describe(),
        "format_version": FORMAT_VERSION,
        "napari_stmap_version": napari_stmap.__version__,
    }
    clash = sorted(set(metadata or {}) & set(meta))
    if clash:
        msg = f"metadata keys {clash} are written by napari-stmap itself; use other names"
        raise StmapInputError(msg)
    meta.update(metadata or {})
    try:
        text = json.dumps(meta, allow_nan=True)
    except TypeError as exc:
        msg = f"model metadata is not JSON-serialisable ({exc}); pass plain dicts/lists/numbers"
        raise StmapInputError(msg) from exc
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={_METADATA_KEY: text})
    _logger.info("saved %s model (%d tensors) to %s", meta["arch"], len(tensors), path)


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, without loading tensors (or torch).

    Raises
    ------
    StmapInputError
        Missing file, a pickle, not a safetensors file, no napari-stmap metadata, or a file
        made by a newer napari-stmap.
    """
    p = Path(path)
    header = _read_safetensors_header(p)
    text = (header.get("__metadata__") or {}).get(_METADATA_KEY)
    if text is None:
        msg = f"{p} is a safetensors file without napari-stmap metadata; it is not a napari-stmap model"
        raise StmapInputError(msg)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{p} has corrupt napari-stmap metadata ({exc.msg}); re-export the model"
        raise StmapInputError(msg) from exc
    _check_format_version(p, meta)
    return meta


def load_model(path: str | Path, *, device: Any = "cpu") -> StmapModel:
    """Rebuild and load the model in ``path``, in eval mode on ``device``.

    Raises
    ------
    StmapInputError
        As :func:`read_model_metadata`, or if the tensors do not fit the architecture.
    """
    from safetensors.torch import load_file

    from .registry import create_model

    p = Path(path)
    meta = read_model_metadata(p)
    missing = [k for k in ("arch", "config", "genes") if k not in meta]
    if missing:
        msg = f"{p} metadata lacks {missing}; it was not written by save_model"
        raise StmapInputError(msg)
    config = {k: v for k, v in meta["config"].items() if k != "genes"}
    config.update(pretrained=False, encoder_weights=None)  # the file holds all weights
    model = create_model(meta["arch"], genes=meta["genes"], **config)
    state = load_file(str(p), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        msg = f"{p}: tensors do not match the {meta['arch']} architecture in its metadata ({first})"
        raise StmapInputError(msg) from exc
    model.metadata = meta
    return model.to(device).eval()


def _read_safetensors_header(p: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file after refusing pickles/zips by content."""
    if not p.is_file():
        msg = f"model file {p} does not exist"
        raise StmapInputError(msg)
    with p.open("rb") as f:
        head = f.read(8)
        if p.suffix.lower() in _PICKLE_SUFFIXES or _looks_like_pickle(head):
            msg = f"{p} is a pickle; napari-stmap only loads .safetensors model files; {_CONVERT_HINT}"
            raise StmapInputError(msg)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= n <= min(_MAX_HEADER_BYTES, p.stat().st_size - 8):
            msg = f"{p} is not a safetensors model file (bad header); napari-stmap models are .safetensors"
            raise StmapInputError(msg)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{p} is not a safetensors model file (unreadable header); napari-stmap models are .safetensors"
        raise StmapInputError(msg) from exc
    if not isinstance(header, dict):
        msg = f"{p} is not a safetensors model file (header is not a JSON object)"
        raise StmapInputError(msg)
    return header


def _looks_like_pickle(head: bytes) -> bool:
    """Pickle protocol ≥ 2 (``\\x80`` + version) or a zip archive (torch.save's default)."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def _check_format_version(p: Path, meta: dict[str, Any]) -> None:
    import napari_stmap

    version = meta.get("format_version")
    if not isinstance(version, int):
        msg = f"{p} has no valid format_version in its metadata; re-export the model"
        raise StmapInputError(msg)
    if version > FORMAT_VERSION:
        made_by = meta.get("napari_stmap_version", "?")
        msg = (
            f"{p} was made by napari-stmap {made_by} (model format {version}), which is newer "
            f"than this napari-stmap {napari_stmap.__version__} (reads formats up to "
            f"{FORMAT_VERSION}): upgrade napari-stmap"
        )
        raise StmapInputError(msg)
