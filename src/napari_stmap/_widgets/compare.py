"""Dock "Compare": measured vs predicted at chosen bin sizes.

The PCC table is :func:`~napari_stmap.core.evaluate.evaluate_measured`, the function behind
``stmap evaluate`` (same units, depth factor and metrics), scored on the predictions of the
viewer's store: the network runs once per tile, only for tiles the store does not have yet,
and the table, the scatter plot and the ``stmap: measured GENE`` / ``stmap: residual GENE``
layers all use the same predicted values (the additive rule over the same base bins). The
command line predicts with :func:`~napari_stmap.core.predict_dense.predict_spots` instead;
both tile the same seamless map, so the numbers agree up to the store's float16 embeddings.

A bin model (MagNet) has no store: :func:`run_compare_bins` predicts once at the measured
units' centres, exactly as ``stmap evaluate`` does (the same numbers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._plots import make_canvas, style_axes
from ._session import PREFIX, get_session, notify_error, owned_layer

logger = logging.getLogger(__name__)

EXTRA_SCALES_UM = (32.0, 55.0)


@dataclass
class CompareResult:
    """What the Compare dock shows: the evaluation JSON and per-unit values per scale."""

    result: dict
    genes: list[str]
    units: dict = field(default_factory=dict)  # key -> Units
    predicted: dict = field(default_factory=dict)  # key -> (n, G + 1) predicted counts
    base_spots: object = None


def scale_choices(spots, path=None) -> list[tuple[float, bool]]:
    """(size µm, checked by default) offered for ``spots``: native, sums of bins, 55 µm disks."""
    from napari_stmap.core.io.spots import available_bin_sizes

    if spots.footprint != "square":
        return [(float(spots.bin_um), True)]
    try:
        sizes = [s for s in available_bin_sizes(path or spots.source) if s >= spots.bin_um]
    except Exception:
        sizes = []
    sizes = sorted(set(sizes) | {float(spots.bin_um)} | set(EXTRA_SCALES_UM))
    return [(s, s in (spots.bin_um, 16.0, 32.0)) for s in sizes]


def _store_predictions(pred, meas, units: dict) -> dict:
    """Predicted counts (n, G_model + 1) of every unit from the predictor's store."""
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.predict import ensure_region, spot_footprints

    def summed(fps):
        boxes = np.array([f.bbox_yx() for f in fps])
        bbox = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
        dense, grid = ensure_region(pred, bbox, timeout=1800)
        return aggregate(dense, grid, fps)

    out, base = {}, None
    for key, u in units.items():
        if u.n == 0:
            out[key] = np.zeros((0, len(pred.output_names)))
        elif u.members is not None:
            if base is None:
                base = summed(spot_footprints(meas.spots))
            out[key] = np.asarray(u.members @ base)
        else:
            out[key] = summed(spot_footprints(u))
    return out


def run_compare(pred, model_path, slide, spots_path, scales_um) -> CompareResult:
    """Worker: ``stmap evaluate``'s metrics on the store's predictions, plus plot data.

    Missing tiles are predicted by ``pred`` (a :class:`~napari_stmap.core.engine.Predictor`),
    once; tiles already in the store are reused.
    """
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.measured import load_measured

    measured = load_measured(spots_path, scales_um=scales_um, slide=slide)
    model = pred.model  # already loaded: genes and metadata; it runs in the predictor only
    seen: dict = {}

    def predict(meas, units: dict) -> dict:
        seen["meas"], seen["units"] = meas, units
        seen["preds"] = _store_predictions(pred, meas, units)
        return seen["preds"]

    return _compare_result(
        evaluate_measured(model, slide, measured, scales_um, predict=predict),
        model,
        model_path,
        seen,
    )


def run_compare_bins(model, model_path, slide, spots_path, scales_um, device="cpu"):
    """Worker: ``stmap evaluate``'s metrics for a bin model (predicted at the units' centres).

    The same predictions as the command line (:func:`~napari_stmap.core.evaluate.evaluate_measured`
    without ``predict``), kept for the plot and the layers.
    """
    from napari_stmap.core.evaluate import evaluate_measured
    from napari_stmap.core.measured import load_measured
    from napari_stmap.core.predict import predict_units

    measured = load_measured(spots_path, scales_um=scales_um, slide=slide)
    seen: dict = {}

    def predict(meas, units: dict) -> dict:
        seen["meas"], seen["units"] = meas, units
        seen["preds"] = predict_units(
            model, slide, meas, units, device=device, tile_px=None, batch_size=4, tta=False
        )
        return seen["preds"]

    return _compare_result(
        evaluate_measured(model, slide, measured, scales_um, predict=predict),
        model,
        model_path,
        seen,
    )


def _compare_result(result: dict, model, model_path, seen: dict) -> CompareResult:
    result["model"]["path"] = str(model_path)
    meas, units = seen["meas"], seen["units"]
    names = list(meas.genes)
    cols = [model.genes.index(g) for g in names] + [model.num_outputs - 1]
    predicted = {k: v[:, cols] for k, v in seen["preds"].items()}
    return CompareResult(result, names, units, predicted, meas.spots)


def unit_values(res: CompareResult, key: str, gene: str) -> tuple[np.ndarray, np.ndarray]:
    """(measured, predicted) normalised expression ``log1p(1e4·g/total)`` of ``gene``."""
    from napari_stmap.core.metrics import normalize_expression

    u, p = res.units[key], res.predicted[key]
    g = res.genes.index(gene)
    measured = normalize_expression(u.counts[:, [g]], u.total)[:, 0]
    predicted = normalize_expression(p[:, [g]], p[:, -1])[:, 0]
    return measured, predicted


def unit_spots(res: CompareResult, key: str, mpp: float):
    """A :class:`~napari_stmap.core.io.spots.Spots` of the units of one scale (for layers)."""
    from napari_stmap.core.io.spots import Spots

    u, base = res.units[key], res.base_spots
    if u.members is None:
        return base
    n = u.n
    return Spots(
        centers_yx=u.centers_yx,
        footprint=u.footprint,
        size_px=u.size_px,
        size_um=u.bin_um,
        mpp=mpp,
        counts=u.counts,
        genes=np.asarray(res.genes),
        gene_ids=np.asarray(res.genes),
        barcodes=np.array([f"u{k}" for k in range(n)]),
        bin_um=u.bin_um,
        pitch_um=None,
        in_tissue=np.ones(n, bool),
        array_rc=None,
        library_id=base.library_id,
        source=base.source,
    )


class _Item(QTableWidgetItem):
    """A table cell that sorts by number (NaN last)."""

    def __init__(self, value: float) -> None:
        super().__init__("nan" if not np.isfinite(value) else f"{value:.3f}")
        self.value = float(value) if np.isfinite(value) else -np.inf

    def __lt__(self, other) -> bool:
        return self.value < getattr(other, "value", -np.inf)


class CompareWidget(QWidget):
    """Per-gene PCC at chosen bin sizes, scatter plot, measured and residual layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.data: CompareResult | None = None
        self._worker = None
        self._build()
        self.session.changed.connect(self._on_session_changed)
        self._on_session_changed("spots")

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Bin sizes (µm): native, sums of bins, Visium-like disks"))
        self.scales = QListWidget()
        self.scales.setMaximumHeight(90)
        lay.addWidget(self.scales)
        self.run_btn = QPushButton("Compare measured vs predicted")
        self.run_btn.clicked.connect(self._on_run_clicked)
        lay.addWidget(self.run_btn)
        self.summary = QLabel("Load measured data and a model in 'Slide & data'.")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.summary)
        self.table = QTableWidget()
        self.table.setSortingEnabled(True)
        self.table.setMinimumHeight(150)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        lay.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(QLabel("scatter at"))
        self.scale_combo = QComboBox()
        self.scale_combo.activated.connect(lambda _i: self._on_table_selection_changed())
        row.addWidget(self.scale_combo)
        self.layers_btn = QPushButton("Show measured + residual layers")
        self.layers_btn.clicked.connect(self._on_layers_clicked)
        row.addWidget(self.layers_btn)
        lay.addLayout(row)
        self.canvas, self.figure = make_canvas(2.6)
        lay.addWidget(self.canvas)

    # --- inputs ----------------------------------------------------------------------------
    def _on_session_changed(self, what: str) -> None:
        if what != "spots":
            return
        self.scales.clear()
        spots = self.session.spots
        if spots is None:
            return
        for size, checked in scale_choices(spots, self.session.spots_path):
            item = QListWidgetItem(f"{size:g}")
            item.setData(Qt.ItemDataRole.UserRole, size)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
            self.scales.addItem(item)

    def set_scales(self, sizes) -> None:
        """Tick exactly the bin sizes ``sizes`` (µm)."""
        wanted = {float(s) for s in sizes}
        for k in range(self.scales.count()):
            item = self.scales.item(k)
            on = float(item.data(Qt.ItemDataRole.UserRole)) in wanted
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def chosen_scales(self) -> list[float]:
        """Ticked bin sizes (µm)."""
        return [
            float(self.scales.item(k).data(Qt.ItemDataRole.UserRole))
            for k in range(self.scales.count())
            if self.scales.item(k).checkState() == Qt.CheckState.Checked
        ]

    # --- run -------------------------------------------------------------------------------
    def _on_run_clicked(self) -> None:
        self.run()

    def run(self):
        """Evaluate in a worker (predicting what is needed); returns the worker or None."""
        s = self.session
        if s.spots_path is None or s.model_path is None or s.slide is None:
            notify_error(
                "load a slide, measured data and a model in 'Slide & data' first", "compare"
            )
            return None
        scales = self.chosen_scales()
        if not scales:
            notify_error("tick at least one bin size", "compare")
            return None
        self.run_btn.setEnabled(False)

        def start(fn, source, *extra) -> None:
            self._worker = s.run(
                fn,
                source,
                s.model_path,
                s.slide,
                s.spots_path,
                scales,
                *extra,
                on_done=self._on_compare_done,
                on_finally=self._on_worker_finished,
                what="compare",
                progress={"total": 0, "desc": "stmap: compare"},
            )

        if s.is_bins:
            self.summary.setText("predicting at the measured bins and comparing…")
            s.with_bin_model(
                lambda model: start(run_compare_bins, model, s.device),
                on_fail=self._on_worker_finished,
            )
        else:
            self.summary.setText("predicting and comparing… (the network runs once per tile)")
            s.with_predictor(
                lambda pred: start(run_compare, pred), on_fail=self._on_worker_finished
            )
        return self._worker

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)

    def _on_compare_done(self, data: CompareResult) -> None:
        self.data = data
        res = data.result
        keys = list(res["scales"])
        lines = ["<table><tr><th>µm</th><th>n</th><th>PCC@F</th><th>PCC@S</th><th>PCC@M</th></tr>"]
        for k in keys:
            m = res["scales"][k]
            f = [("nan" if m[x] is None else f"{m[x]:.3f}") for x in ("pcc_f", "pcc_s", "pcc_m")]
            lines.append(
                f"<tr><td>{k}</td><td>{m['n_spots']}</td><td>{f[0]}</td><td>{f[1]}</td><td>{f[2]}</td></tr>"
            )
        lines.append(
            "</table><small>normalised log1p(1e4·g/total); <tt>stmap evaluate</tt>'s metrics on the viewer's predictions</small>"
        )
        self.summary.setText("".join(lines))
        self.table.setSortingEnabled(False)
        self.table.clear()
        self.table.setColumnCount(1 + len(keys))
        self.table.setHorizontalHeaderLabels(["gene", *[f"PCC {k} µm" for k in keys]])
        genes = list(res["genes"][keys[0]]) if keys else []
        self.table.setRowCount(len(genes))
        for i, g in enumerate(genes):
            self.table.setItem(i, 0, QTableWidgetItem(g))
            for j, k in enumerate(keys):
                r = res["genes"][k].get(g)
                self.table.setItem(i, 1 + j, _Item(np.nan if r is None else r))
        self.table.setSortingEnabled(True)
        if keys:
            self.table.sortItems(len(keys), Qt.SortOrder.DescendingOrder)
        self.scale_combo.clear()
        self.scale_combo.addItems(keys)
        if genes:
            self.table.selectRow(0)

    def per_gene(self, key: str) -> dict[str, float | None]:
        """PCC per gene at scale ``key`` as shown in the table."""
        return {} if self.data is None else dict(self.data.result["genes"][key])

    # --- plots and layers ------------------------------------------------------------------
    def selected_gene(self) -> str | None:
        """Gene of the selected table row."""
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return item.text() if item is not None else None

    def _on_table_selection_changed(self) -> None:
        gene, key = self.selected_gene(), self.scale_combo.currentText()
        self.figure.clear()
        if self.data is None or gene is None or key not in self.data.units:
            self.canvas.draw_idle()
            return
        meas, pred = unit_values(self.data, key, gene)
        ok = np.isfinite(meas) & np.isfinite(pred)
        ax = self.figure.add_subplot(111)
        ax.scatter(meas[ok], pred[ok], s=3, alpha=0.4, color="#4fc3f7", linewidths=0)
        r = self.data.result["genes"][key].get(gene)
        ax.set_title(f"{gene} at {key} µm: r = {'nan' if r is None else f'{r:.3f}'}", fontsize=9)
        ax.set_xlabel("measured log1p(10⁴·g/total)", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        style_axes(ax)
        self.canvas.draw_idle()

    def _on_layers_clicked(self) -> None:
        self.show_layers()

    def show_layers(self, gene: str | None = None, key: str | None = None) -> None:
        """Add/update ``stmap: measured GENE`` and ``stmap: residual GENE`` (normalised)."""
        from .._layers import spots_layer

        gene = gene or self.selected_gene()
        key = key or self.scale_combo.currentText()
        if self.data is None or gene is None or key not in self.data.units:
            notify_error("run a comparison and select a gene first", "compare")
            return
        meas, pred = unit_values(self.data, key, gene)
        spots = unit_spots(self.data, key, self.session.mpp)
        hi = (
            float(np.nanpercentile(np.abs(pred - meas), 99))
            if np.isfinite(pred - meas).any()
            else 1.0
        )
        for what, values, cmap, limits in (
            ("measured", meas, "magma", None),
            ("residual", pred - meas, "PiYG", (-max(hi, 1e-6), max(hi, 1e-6))),
        ):
            name = f"{PREFIX}{what} {gene}"
            data, kwargs, kind = spots_layer(
                spots, values=values.astype(np.float32), label=f"{what} {gene}", name=name
            )
            kwargs["name"] = name
            kwargs["metadata"]["stmap"].update({"kind": what, "gene": gene, "scale": key})
            old = owned_layer(self.viewer, name)
            if old is not None:
                self.viewer.layers.remove(old)
            if kind == "image":
                kwargs["colormap"] = cmap
                if limits is not None:
                    kwargs["contrast_limits"] = limits
            else:
                kwargs["face_colormap"] = cmap
                if limits is not None:
                    kwargs["face_contrast_limits"] = limits
            getattr(self.viewer, f"add_{kind}")(data, **kwargs)
