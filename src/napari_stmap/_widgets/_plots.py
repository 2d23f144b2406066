"""Small matplotlib canvases for the docks (colour bar, bar chart, scatter plot)."""

from __future__ import annotations

import numpy as np


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


def napari_cmap(colormap):
    """A matplotlib colormap from a napari :class:`~napari.utils.Colormap`."""
    from matplotlib.colors import ListedColormap

    values = np.linspace(0, 1, 256)
    return ListedColormap(np.asarray(colormap.map(values))[:, :4])
