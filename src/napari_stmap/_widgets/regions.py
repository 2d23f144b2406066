"""Dock "Regions": drawn shapes and spot grids -> predicted expression table, bar chart, export.

Shapes are drawn in the Shapes layer ``stmap: regions``; every Shapes layer whose
``metadata["stmap"]["kind"]`` is ``"regions"`` counts too (GeoJSON opened through the reader,
e.g. QuPath annotations). Their data are level-0 px (the layer's scale is µm/px). Shapes that
share a ``feature`` property are one region and ``hole`` shapes subtract
(:func:`~napari_stmap.core.regions.regions_from_shapes`); rows are named by the feature's
``name``, else its class and a count, else ``region k``. Values follow the additive rule: the
dense map from :func:`~napari_stmap.core.engine.ensure_region` summed over each footprint with
exact pixel fractions (:func:`~napari_stmap.core.aggregate.aggregate`), holes subtracted;
normalised expression is ``log1p(1e4 · gene / total)`` after summing
(:func:`~napari_stmap.core.aggregate.normalize_expression`).

With a bin model (MagNet) the sums come from the session's bin prediction
(:meth:`~napari_stmap.core.bins.BinPrediction.region_sums`: each bin adds the fraction of its
area inside the shape); a region reaching bins not predicted yet is NaN (predict that area in
the Predict dock first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._plots import make_canvas, style_axes
from ._session import (
    ANNOTATION_KINDS,
    PREFIX,
    get_session,
    notify_error,
    notify_info,
    owned_layer,
    stmap_kind,
    viewport_bbox_px,
)

logger = logging.getLogger(__name__)

REGIONS_LAYER = f"{PREFIX}regions"
GRID_LAYER = f"{PREFIX}spot grid"
REGION_TIMEOUT_S = 600.0


def shape_footprint(kind: str, vertices_yx: np.ndarray):
    """Footprint (level-0 px) of one napari shape, or None for lines and paths.

    See :func:`napari_stmap.core.regions.shape_footprint`.
    """
    from napari_stmap.core.regions import shape_footprint as footprint

    return footprint(kind, vertices_yx)


@dataclass
class RegionTable:
    """Predicted values of regions: names, footprints, (n, G + 1) counts, areas µm²."""

    names: list[str]
    kinds: list[str]
    centers_yx: np.ndarray
    counts: np.ndarray
    area_um2: np.ndarray
    genes: list[str]

    @property
    def total(self) -> np.ndarray:
        """(n,) predicted all-transcript totals."""
        return self.counts[:, -1]

    def normalised(self) -> np.ndarray:
        """(n, G) ``log1p(1e4 · gene / total)`` after summing."""
        from napari_stmap.core.metrics import normalize_expression

        return normalize_expression(self.counts[:, :-1], self.total)


def compute_regions(source, regions: list, mpp: float) -> RegionTable:
    """Predict what the regions need (blocking) and sum the map over each one (holes subtract)."""
    from napari_stmap.core.aggregate import aggregate
    from napari_stmap.core.predict import ensure_region
    from napari_stmap.core.regions import combine_parts, region_parts

    fps, signs, groups = region_parts(regions)
    boxes = np.array([f.bbox_yx() for f in fps], dtype=float)
    bbox = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
    dense, grid = ensure_region(source, bbox, timeout=REGION_TIMEOUT_S)
    counts = combine_parts(aggregate(dense, grid, fps), signs, groups, len(regions))
    return _region_table(regions, counts, list(source.output_names[:-1]), mpp)


def compute_regions_bins(bins, regions: list, mpp: float) -> RegionTable:
    """Sum a bin prediction over each region (fractional bin coverage; no network run)."""
    from napari_stmap.core.regions import combine_parts, region_parts

    fps, signs, groups = region_parts(regions)
    counts = combine_parts(bins.region_sums(fps), signs, groups, len(regions))
    return _region_table(regions, counts, list(bins.genes), mpp)


def _region_table(regions: list, counts: np.ndarray, genes: list[str], mpp: float) -> RegionTable:
    """The table of ``regions`` (:class:`~napari_stmap.core.geometry.Region`, level-0 px)."""
    centers = np.array([r.center_yx for r in regions], dtype=float).reshape(-1, 2)
    area = np.array([r.area_px for r in regions], dtype=float) * mpp**2
    names, kinds = [r.name for r in regions], [r.kind for r in regions]
    return RegionTable(names, kinds, centers, counts, area, genes)


def build_export(table: RegionTable, mpp: float, slide_path: str):
    """AnnData of the regions (core/export.py conventions)."""
    from napari_stmap.core.export import build_anndata

    return build_anndata(
        table.counts[:, :-1],
        table.total,
        table.genes,
        table.centers_yx,
        mpp=mpp,
        area_um2=table.area_um2,
        footprint=table.kinds,
        names=table.names,
        uns_meta={"slide": slide_path},
    )


class RegionsWidget(QWidget):
    """Drawn regions and spot grids: table of regions × genes, top-gene bars, export."""

    DEBOUNCE_MS = 500

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer, self)
        self.table_data: RegionTable | None = None
        self._worker = None
        self._again = False
        self._build()
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(self.DEBOUNCE_MS)
        self._debounce.timeout.connect(self.recompute)
        self.viewer.layers.events.inserted.connect(self._on_layers_inserted)
        self.viewer.layers.events.removed.connect(self._on_layers_removed)
        for layer in self.viewer.layers:
            self._watch(layer)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        self.draw_btn = QPushButton("Draw regions (rectangle / ellipse / polygon)")
        self.draw_btn.clicked.connect(self._on_draw_clicked)
        lay.addWidget(self.draw_btn)
        form = QFormLayout()
        self.grid_shape = QComboBox()
        self.grid_shape.addItems(["disk", "square"])
        self.grid_size = QDoubleSpinBox(
            decimals=1, minimum=1.0, maximum=5000.0, value=55.0, suffix=" µm"
        )
        self.grid_pitch = QDoubleSpinBox(
            decimals=1, minimum=1.0, maximum=10000.0, value=100.0, suffix=" µm"
        )
        row = QHBoxLayout()
        row.addWidget(self.grid_shape)
        row.addWidget(self.grid_size)
        row.addWidget(QLabel("pitch"))
        row.addWidget(self.grid_pitch)
        form.addRow("spots", row)
        lay.addLayout(form)
        self.grid_btn = QPushButton("Spot grid in selected region (or the view)")
        self.grid_btn.clicked.connect(self._on_grid_clicked)
        lay.addWidget(self.grid_btn)
        row = QHBoxLayout()
        self.values_combo = QComboBox()
        self.values_combo.addItems(["normalised", "counts"])
        self.values_combo.activated.connect(lambda _i: self._fill_table())
        row.addWidget(QLabel("table"))
        row.addWidget(self.values_combo)
        self.update_btn = QPushButton("Update")
        self.update_btn.clicked.connect(self.recompute)
        row.addWidget(self.update_btn)
        lay.addLayout(row)
        self.table = QTableWidget()
        self.table.setMinimumHeight(140)
        self.table.itemSelectionChanged.connect(self._on_table_selection_changed)
        lay.addWidget(self.table)
        self.canvas, self.figure = make_canvas(2.2)
        lay.addWidget(self.canvas)
        self.export_btn = QPushButton("Export .h5ad / .csv…")
        self.export_btn.clicked.connect(self._on_export_clicked)
        lay.addWidget(self.export_btn)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)

    # --- layers ----------------------------------------------------------------------------
    def regions_layer(self, create: bool = True):
        """The ``stmap: regions`` Shapes layer (data in level-0 px), created on demand."""
        layer = owned_layer(self.viewer, REGIONS_LAYER)
        if layer is None and create:
            mpp = self.session.mpp
            layer = self.viewer.add_shapes(
                name=REGIONS_LAYER,
                scale=(mpp, mpp),
                edge_color="#00e5ff",
                face_color="transparent",
                edge_width=3 / max(mpp, 1e-9) * 0.5,
                units=self.session.units,
                metadata={"stmap": {"kind": "regions", "units": "px"}},
            )
        return layer

    def regions_layers(self) -> list:
        """Shapes layers of regions (data level-0 px): drawn here and opened GeoJSON."""
        return [
            ly
            for ly in self.viewer.layers
            if stmap_kind(ly) == "regions" and hasattr(ly, "shape_type")
        ]

    def _watch(self, layer) -> None:
        if stmap_kind(layer) in ANNOTATION_KINDS:
            layer.events.data.connect(self._on_shapes_changed)

    def _ready(self) -> bool:
        s = self.session
        return not s.closed and s.slide is not None and s.model_path is not None

    def _on_layers_inserted(self, event) -> None:
        self._watch(event.value)
        if stmap_kind(event.value) == "regions" and len(event.value.data) and self._ready():
            self._debounce.start()  # opened GeoJSON: its regions join the table

    def _on_layers_removed(self, event) -> None:
        if stmap_kind(event.value) in ANNOTATION_KINDS and self._ready():
            self._debounce.start()

    def _on_draw_clicked(self) -> None:
        if self.session.slide is None:
            notify_error("load a slide in the 'Slide & data' dock first", "regions")
            return
        layer = self.regions_layer()
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"

    def _on_shapes_changed(self, event=None) -> None:
        self._debounce.start()

    def _on_grid_clicked(self) -> None:
        self.make_spot_grid()

    def make_spot_grid(self) -> int:
        """Spots of the chosen size/pitch inside the selected region (else the view)."""
        from napari_stmap.core.geometry import spot_grid

        s = self.session
        if s.slide is None:
            notify_error("load a slide in the 'Slide & data' dock first", "spot grid")
            return 0
        mpp = s.mpp
        region = None
        layer = self._selection_layer()
        if layer is not None and layer.nshapes:
            idx = sorted(layer.selected_data) or [layer.nshapes - 1]
            region = shape_footprint(layer.shape_type[idx[0]], layer.data[idx[0]])
        if region is None:
            region = viewport_bbox_px(self.viewer, mpp, s.slide.shape_yx)
        if region is None:
            notify_error("draw a region or show part of the slide first", "spot grid")
            return 0
        size, pitch = self.grid_size.value() / mpp, self.grid_pitch.value() / mpp
        kind = self.grid_shape.currentText()
        try:
            centers, _ = spot_grid(region, size_px=size, pitch_px=pitch, footprint=kind)
        except Exception as exc:
            notify_error(exc, "spot grid")
            return 0
        if len(centers) == 0:
            notify_error(
                "no spot of that size fits in the region; draw a larger one or use smaller spots",
                "spot grid",
            )
            return 0
        meta = {"stmap": {"kind": "spot grid", "size_px": size, "footprint": kind}}
        grid = owned_layer(self.viewer, GRID_LAYER)
        if grid is not None:
            self.viewer.layers.remove(grid)
        self.viewer.add_points(
            centers,
            name=GRID_LAYER,
            size=size,
            symbol="disc" if kind == "disk" else "square",
            scale=(mpp, mpp),
            face_color="transparent",
            border_color="#ffd54f",
            border_width=0.08,
            units=s.units,
            metadata=meta,
        )
        notify_info(f"{len(centers)} {kind} spots of {self.grid_size.value():g} µm")
        self._debounce.start()
        return len(centers)

    def _selection_layer(self):
        """The active regions layer, else ``stmap: regions`` (None when there is none)."""
        active = self.viewer.layers.selection.active
        if active is not None and any(active is ly for ly in self.regions_layers()):
            return active
        return self.regions_layer(create=False)

    # --- computation -----------------------------------------------------------------------
    def regions(self) -> list:
        """Regions (level-0 px) of every regions layer, in layer order, then the spot grid.

        Each is a :class:`~napari_stmap.core.geometry.Region`; names are made unique.
        """
        from napari_stmap.core.geometry import Region, disks, squares
        from napari_stmap.core.io.regions import unique_names
        from napari_stmap.core.regions import regions_from_shapes

        out = []
        for layer in self.regions_layers():
            out += regions_from_shapes(layer.shape_type, layer.data, layer.features)
        grid = owned_layer(self.viewer, GRID_LAYER)
        if grid is not None and len(grid.data):
            meta = grid.metadata["stmap"]
            build = disks if meta["footprint"] == "disk" else squares
            spots = build(np.asarray(grid.data)[:, -2:], meta["size_px"])
            out += [Region(f"spot {k + 1}", [(fp, 1.0)]) for k, fp in enumerate(spots)]
        for region, name in zip(out, unique_names([r.name for r in out]), strict=True):
            region.name = name
        return out

    def recompute(self):
        """Recompute the table in a worker (a second call while running queues one more)."""
        if self._worker is not None:
            self._again = True
            return None
        regions = self.regions()
        if not regions:
            self.table_data = None
            self._fill_table()
            return None
        mpp = self.session.mpp
        if self.session.is_bins:
            bins = self.session.bins
            if bins is None:
                text = (
                    "a bin model gives regions from its bin prediction: press 'Predict view' first"
                )
                self.status.setText(text)
                notify_info(text)
                return None
            self.update_btn.setEnabled(False)
            self.status.setText(f"summing {len(regions)} regions over {bins.n} predicted bins…")
            self._start(compute_regions_bins, bins, regions, mpp)
            return self._worker
        self.update_btn.setEnabled(False)
        self.status.setText(f"computing {len(regions)} regions…")
        self.session.with_predictor(
            lambda pred: self._start(compute_regions, pred, regions, mpp),
            on_fail=self._on_worker_finished,
        )
        return self._worker

    def _start(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the session's worker (the button is re-enabled when it ends)."""
        self._worker = self.session.run(
            fn,
            *args,
            on_done=self._on_regions_computed,
            on_finally=self._on_worker_finished,
            what="computing regions",
        )

    def _on_regions_computed(self, table: RegionTable) -> None:
        self.table_data = table
        text = f"{len(table.names)} regions × {len(table.genes)} genes"
        missing = int(np.isnan(table.total).sum())
        if missing:
            text += f"; {missing} reach bins not predicted yet (NaN): predict their area first"
        self.status.setText(text)
        self._fill_table()

    def _on_worker_finished(self) -> None:
        self._worker = None
        self.update_btn.setEnabled(True)
        if self._again:
            self._again = False
            self._debounce.start()

    # --- display ---------------------------------------------------------------------------
    MAX_ROWS = 500

    def _fill_table(self) -> None:
        t = self.table_data
        self.table.clear()
        if t is None:
            self.table.setRowCount(0)
            self.table.setColumnCount(0)
            self._draw_bars(None)
            return
        values = (
            t.normalised() if self.values_combo.currentText() == "normalised" else t.counts[:, :-1]
        )
        headers = ["area µm²", "total counts", *t.genes]
        n = min(len(t.names), self.MAX_ROWS)
        self.table.setColumnCount(len(headers))
        self.table.setRowCount(n)
        self.table.setHorizontalHeaderLabels(headers)
        self.table.setVerticalHeaderLabels(t.names[:n])
        for i in range(n):
            row = [t.area_um2[i], t.total[i], *values[i]]
            for j, v in enumerate(row):
                self.table.setItem(i, j, QTableWidgetItem(f"{v:.4g}"))
        if n:
            self.table.selectRow(0)

    def _on_table_selection_changed(self) -> None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        self._draw_bars(rows[0].row() if rows else None)

    def _draw_bars(self, row: int | None, top: int = 10) -> None:
        self.figure.clear()
        t = self.table_data
        if t is None or row is None or row >= len(t.names):
            self.canvas.draw_idle()
            return
        values = t.normalised()[row]
        order = np.argsort(np.nan_to_num(values, nan=-np.inf))[::-1][:top]
        ax = self.figure.add_subplot(111)
        ax.barh([t.genes[k] for k in order][::-1], values[order][::-1], color="#4fc3f7")
        ax.set_xlabel("log1p(10⁴ · gene / total)", fontsize=8)
        ax.set_title(f"top genes of {t.names[row]}", fontsize=9)
        style_axes(ax)
        self.canvas.draw_idle()

    # --- export ----------------------------------------------------------------------------
    def _on_export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export regions",
            "regions.h5ad",
            "AnnData (*.h5ad);;CSV (*.csv)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )
        if not path:
            return
        overwrite = False
        if Path(path).exists():
            answer = QMessageBox.question(self, "Replace file?", f"{path} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        self.export(path, overwrite=overwrite)

    def export(self, path: str | Path, *, overwrite: bool = False) -> Path | None:
        """Write the current table to ``.h5ad`` or ``.csv`` (core/export.py)."""
        from napari_stmap.core.export import write_regions

        if self.table_data is None:
            notify_error("nothing to export: draw regions or make a spot grid first", "export")
            return None
        try:
            adata = build_export(self.table_data, self.session.mpp, str(self.session.slide.path))
            out = write_regions(adata, path, overwrite=overwrite)
        except Exception as exc:
            notify_error(exc, "export")
            return None
        notify_info(f"wrote {out}")
        return out
