"""Plots of the docks: small matplotlib canvases (bar chart, scatter plot) and a colour bar.

The colour bar is painted with Qt: it is redrawn whenever contrast limits change, and a
matplotlib redraw there cost the Qt thread ~100-150 ms each time.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRectF, Qt
from qtpy.QtGui import QImage, QPainter, QPalette
from qtpy.QtWidgets import QSizePolicy, QWidget


def make_canvas(height_in: float = 2.4):
    """A (FigureCanvas, Figure) pair sized for a dock, with a dark-theme-friendly face."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, height_in), dpi=100, layout="constrained")
    fig.patch.set_facecolor("#262930")
    canvas = FigureCanvasQTAgg(fig)
    canvas.setMinimumHeight(int(height_in * 70))
    return canvas, fig


def style_axes(ax) -> None:
    """Light text on the napari dark theme."""
    ax.set_facecolor("#262930")
    for spine in ax.spines.values():
        spine.set_color("#aaaaaa")
    ax.tick_params(colors="#dddddd", labelsize=7)
    ax.xaxis.label.set_color("#dddddd")
    ax.yaxis.label.set_color("#dddddd")
    ax.title.set_color("#dddddd")


def draw_scatter(canvas, figure, x, y, *, title: str, xlabel: str, ylabel: str) -> None:
    """Scatter plot of the finite pairs of ``x`` and ``y`` (1-D) on ``figure``, then redraw."""
    x, y = np.asarray(x), np.asarray(y)
    ok = np.isfinite(x) & np.isfinite(y)
    figure.clear()
    ax = figure.add_subplot(111)
    ax.scatter(x[ok], y[ok], s=3, alpha=0.4, color="#4fc3f7", linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    style_axes(ax)
    canvas.draw_idle()


def draw_top_bars(canvas, figure, labels, values, *, title: str, xlabel: str, top: int = 10):
    """Horizontal bars of the ``top`` largest ``values`` (NaN last), largest on top; redraw."""
    values = np.asarray(values)
    order = np.argsort(np.nan_to_num(values, nan=-np.inf))[::-1][:top]
    figure.clear()
    ax = figure.add_subplot(111)
    ax.barh([labels[k] for k in order][::-1], values[order][::-1], color="#4fc3f7")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    style_axes(ax)
    canvas.draw_idle()


def clear_plot(canvas, figure) -> None:
    """Empty ``figure`` and redraw."""
    figure.clear()
    canvas.draw_idle()


def colormap_rgba(colormap, n: int = 256) -> np.ndarray:
    """``(n, 4)`` RGBA floats in 0..1 of a napari :class:`~napari.utils.Colormap`."""
    return np.clip(np.asarray(colormap.map(np.linspace(0, 1, n)), dtype=float)[:, :4], 0, 1)


class ColorBar(QWidget):
    """Horizontal colour bar: gradient, low / middle / high values and a unit label."""

    def __init__(self) -> None:
        super().__init__()
        self.setMinimumHeight(52)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self._image: QImage | None = None
        self._pixels = np.zeros((1, 1, 4), np.uint8)
        self.limits: tuple[float, float] | None = None
        self.label = ""

    def set_bar(self, rgba: np.ndarray, limits: tuple[float, float], label: str) -> None:
        """Show the colours ``rgba`` ((n, 4) floats in 0..1) from ``limits[0]`` to ``limits[1]``."""
        bgra = (np.asarray(rgba, dtype=float)[:, [2, 1, 0, 3]] * 255).round().astype(np.uint8)
        self._pixels = np.ascontiguousarray(bgra[None])  # the QImage shares this buffer
        n = self._pixels.shape[1]
        self._image = QImage(self._pixels.data, n, 1, 4 * n, QImage.Format.Format_ARGB32)
        self.limits = (float(limits[0]), float(limits[1]))
        self.label = label
        self.setToolTip(label)
        self.update()

    def clear_bar(self) -> None:
        """Show nothing."""
        self._image, self.limits, self.label = None, None, ""
        self.setToolTip("")
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        if self._image is None or self.limits is None:
            return
        p = QPainter(self)
        try:
            fm = p.fontMetrics()
            th, w = fm.height(), self.width()
            bar = QRectF(6, 2, max(w - 12, 1), 14)
            p.drawImage(bar, self._image)
            p.setPen(self.palette().color(QPalette.ColorRole.WindowText))  # follows the theme
            lo, hi = self.limits
            y = bar.bottom() + 3
            for frac, align in (
                (0.0, Qt.AlignmentFlag.AlignLeft),
                (0.5, Qt.AlignmentFlag.AlignHCenter),
                (1.0, Qt.AlignmentFlag.AlignRight),
            ):
                x = bar.left() + frac * bar.width()
                p.drawLine(int(x), int(bar.bottom()), int(x), int(y))
                p.drawText(
                    QRectF(x - 120 * frac, y, 120, th), align, f"{lo + frac * (hi - lo):.3g}"
                )
            text = fm.elidedText(self.label, Qt.TextElideMode.ElideRight, max(w - 12, 1))
            p.drawText(QRectF(6, y + th, max(w - 12, 1), th), Qt.AlignmentFlag.AlignLeft, text)
        finally:
            p.end()
