"""The expression model: genes, their categories and their profiles over expression components.

A gene's expected density (UMI per µm² at the reference depth) is a weighted sum of components:
cell-type area fractions, tissue, ambient, smooth field products (``"fibroblast*ecm"``) and
"load" times a noise field. Markers follow one cell type, smooth genes a field, noise genes a
share of all other expression times a field that nothing in the image predicts, housekeeping
genes every cell type.
"""

from __future__ import annotations

import numpy as np

from ._fields import CELL_TYPES

_COMPONENTS = (
    *CELL_TYPES, "tissue", "ambient", "fibroblast*ecm", "tissue*ecm", "tumour*hypoxia",
    "load*noise1", "load*noise2", "load*noise3",
)  # fmt: skip
# Total expression of each cell type per µm² of cell body, of tissue, and everywhere (ambient),
# in UMI at the reference depth. "load" = the density of all non-noise genes together: noise
# genes are a fixed share of it times their noise field, so their normalised expression
# (gene / total) depends on the noise fields only and nothing in the image predicts it.
_TYPE_RATE = (2.0, 2.4, 1.2, 1.8, 0.15)
_TISSUE_RATE = 0.12
_AMBIENT_RATE = 0.01

_MARKERS = {
    "tumour": ("ERBB2", "GRB7", "STARD3", "PGAP3", "MKI67", "CCND1", "TOP2A", "MUC1"),
    "lymphocyte": ("CD3E", "PTPRC", "CD2", "MS4A1", "CD52", "CD79A", "CCL5", "CD8A"),
    "fibroblast": ("COL1A1", "COL1A2", "DCN", "LUM", "COL3A1", "PDGFRB", "FAP", "FBLN1"),
    "epithelial": ("KRT5", "KRT14", "KRT17", "KRT8", "KRT18", "EPCAM", "ELF3", "CLDN4"),
    "adipocyte": ("ADIPOQ", "PLIN1", "FABP4", "LEP", "CIDEA", "LPL"),
}
_SMOOTH = (
    ("POSTN", "fibroblast*ecm"), ("CA9", "tumour*hypoxia"), ("SPARC", "tissue*ecm"),
    ("VEGFA", "tumour*hypoxia"), ("FN1", "fibroblast*ecm"), ("MMP11", "tissue*ecm"),
)  # fmt: skip
_HOUSEKEEPING = (
    "ACTB",
    "GAPDH",
    "B2M",
    "RPLP0",
    "EEF1A1",
    "TPT1",
    "MALAT1",
    "RPS27A",
    "UBC",
    "PPIA",
)


def _gene_list(n_genes: int) -> list[dict]:
    """Names and categories: markers (round-robin over types), smooth, noise, housekeeping.

    Genes without a real name are called ``GENE0001``, ... in order; ids are ``SYNG00000001``, ...
    """
    n_hk, n_noise, n_smooth = (max(1, round(f * n_genes)) for f in (0.1, 0.12, 0.12))
    n_marker = n_genes - n_hk - n_noise - n_smooth
    genes = [
        *_marker_genes(n_marker),
        *_smooth_genes(n_smooth),
        *_noise_genes(n_noise),
        *_housekeeping_genes(n_hk),
    ]
    serial = 0
    for index, gene in enumerate(genes):
        if gene["name"] is None:
            serial += 1
            gene["name"] = f"GENE{serial:04d}"
        gene["id"] = f"SYNG{index + 1:08d}"
    return genes


def _marker_genes(n: int) -> list[dict]:
    """Marker genes, round-robin over the cell types (name None past the known markers)."""
    genes = []
    for i in range(n):
        kind = CELL_TYPES[i % len(CELL_TYPES)]
        names = _MARKERS[kind]
        rank = i // len(CELL_TYPES)
        genes.append(
            {
                "name": names[rank] if rank < len(names) else None,
                "category": "marker",
                "cell_type": kind,
                "component": kind,
            }
        )
    return genes


def _smooth_genes(n: int) -> list[dict]:
    """Genes that follow a cell type or the tissue times a smooth field (ECM, hypoxia)."""
    genes = []
    for i in range(n):
        name, comp = _SMOOTH[i] if i < len(_SMOOTH) else (None, _SMOOTH[i % 3][1])
        kind, _, field = comp.partition("*")
        genes.append(
            {
                "name": name,
                "category": "smooth",
                "cell_type": kind if kind in CELL_TYPES else None,
                "field": field,
                "component": comp,
            }
        )
    return genes


def _noise_genes(n: int) -> list[dict]:
    """Genes that are a share of the load times one of the three noise fields."""
    return [
        {
            "name": None,
            "category": "noise",
            "field": f"noise{i % 3 + 1}",
            "component": f"load*noise{i % 3 + 1}",
        }
        for i in range(n)
    ]


def _housekeeping_genes(n: int) -> list[dict]:
    """Genes expressed by every cell type in proportion to its rate."""
    return [
        {
            "name": _HOUSEKEEPING[i] if i < len(_HOUSEKEEPING) else None,
            "category": "housekeeping",
        }
        for i in range(n)
    ]


def _gene_table(n_genes: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Genes and their profiles (gene, component) in UMI per µm² at the reference depth."""
    genes = _gene_list(n_genes)
    rng = np.random.default_rng([seed, 9])
    weight = rng.lognormal(0.0, 0.6, size=len(genes))
    col = {name: k for k, name in enumerate(_COMPONENTS)}
    rate = np.asarray(_TYPE_RATE)
    profiles = np.zeros((len(genes), len(_COMPONENTS)))
    groups: dict[str, list[int]] = {}
    for g, gene in enumerate(genes):
        groups.setdefault(gene.get("component") or gene["category"], []).append(g)
    for key, members in groups.items():
        share = weight[members] / weight[members].sum()
        if key == "housekeeping":
            profiles[np.ix_(members, range(len(rate)))] = 0.22 * share[:, None] * rate
        elif key in CELL_TYPES:
            level = 0.45 * share[:, None] * rate
            profiles[np.ix_(members, range(len(rate)))] = 0.03 * level
            profiles[members, col[key]] = level[:, CELL_TYPES.index(key)]
        else:
            left = key.partition("*")[0]
            scale = {"load": 0.05, "tissue": 0.6 * _TISSUE_RATE}.get(left)
            profiles[members, col[key]] = share * (
                scale if scale else 0.3 * rate[CELL_TYPES.index(left)]
            )
    expression = profiles[:, : len(rate)].mean(axis=1) + profiles[:, len(rate) + 2 :].mean(axis=1)
    expression[[gene["category"] == "noise" for gene in genes]] = 0.0  # noise: load share only
    share = expression / expression.sum()
    profiles[:, col["tissue"]] += _TISSUE_RATE * share
    profiles[:, col["ambient"]] += _AMBIENT_RATE * share
    return genes, profiles


def _load_weights(genes: list[dict], profiles: np.ndarray) -> dict[str, float]:
    """Weights of the non-load components in "load": the column sums over non-noise genes."""
    keep = [g for g, gene in enumerate(genes) if gene["category"] != "noise"]
    sums = profiles[keep].sum(axis=0)
    return {c: float(sums[k]) for k, c in enumerate(_COMPONENTS) if not c.startswith("load")}
