"""The house plan, checked from the source: no import cycles, no import that runs upwards.

The import graph of ``src/napari_stmap`` is built with :mod:`ast` from every ``import`` statement,
at module level and inside functions alike (an import inside a function hides a cycle from
Python, not from this test). Each module belongs to a layer (:data:`LAYERS`, lowest first); a
module may import its own layer and the layers below, never one above. docs/architecture.md
draws the same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_stmap"
PKG = "napari_stmap"

#: Layers from the bottom up: module-name prefixes (relative to ``napari_stmap``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("version and errors", ("", "core.errors")),  # "": the package face, its version only
    ("io, geometry, metrics", ("core.io", "core.geometry", "core.metrics")),
    (
        "maps and files",
        (
            "core.tiling",
            "core.aggregate",
            "core.export",
            "core.extent",
            "core.synthetic",
            "core.display",
        ),
    ),
    ("networks", ("core.model",)),
    ("stores and measurements", ("core.store", "core.measured")),
    ("prediction", ("core.predict",)),
    (
        "evaluation and regions",
        (
            "core.evaluate",
            "core.compare",
            "core.regions",
            "core.contrast",
            "core.cells",
            "core.export_spatialdata",
        ),
    ),
    ("training", ("core.training",)),
    ("descriptions", ("core.info", "core")),
    ("napari glue", ("_layers", "_reader", "_writer", "_sample_data")),
    ("front ends", ("cli", "_widgets", "demo")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if module else []
    if not is_pkg:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    name = ".".join([*base, node.module] if node.module else base)
    return name


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports (any depth, any place in the file)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == PKG]
            targets = [t[len(PKG) + 1 :] if t != PKG else "" for t in targets]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(module, is_pkg, node)
            elif node.module and node.module.split(".")[0] == PKG:
                base = node.module[len(PKG) + 1 :] if node.module != PKG else ""
            else:
                continue
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
            targets = [t if t in known else base for t in targets]
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _layer(module: str) -> int:
    best, rank = -1, None
    for k, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix or (prefix != "" and module.startswith(prefix + "."))
            if hit and len(prefix) > best:
                best, rank = len(prefix), k
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS"
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_face(importer: str, target: str) -> bool:
    """A package's ``__init__`` may import its own submodules (its public face)."""
    return target.startswith(importer + ".") if importer else False


def test_graph_sees_the_code(graph):
    assert "core.io.slide" in graph and graph["cli"], "the graph builder lost the project"
    assert any("core.io.slide" in targets for targets in graph.values())


def test_no_import_cycles(graph):
    faces = {m: {t for t in ts if not _is_package_face(m, t)} for m, ts in graph.items()}
    cycles = _cycles(faces)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_runs_upwards(graph):
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if _layer(t) > _layer(m) and not _is_package_face(m, t)
    ]
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def test_model_is_only_networks(graph):
    """``core.model`` (networks) never reaches training, prediction or evaluation."""
    banned = ("core.training", "core.predict", "core.evaluate", "core.compare", "core.regions")
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith("core.model")
        for t in targets
        if t.startswith(banned)
    ]
    assert not bad, bad


def test_core_never_imports_the_front_ends(graph):
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith("core")
        for t in targets
        if not t.startswith("core") and t != ""  # "": the package's version
    ]
    assert not bad, bad
