"""The README demo: napari with the built-in synthetic sample (slide + measured 8 µm bins).

Run ``make demo`` (set-up included) or ``python -m napari_stmap.demo``. With ``--screenshot
PATH`` the viewer renders once, saves a PNG and exits (used by the docs).
"""

from __future__ import annotations

import argparse
import logging


def build_viewer(show: bool = True):
    """Open a napari viewer with the synthetic sample loaded; returns the viewer."""
    import napari

    from ._layers import show_scale_bar
    from ._sample_data import ensure_sample

    ensure_sample()
    viewer = napari.Viewer(title="napari-stmap demo", show=show)
    viewer.open_sample("napari-stmap", "synthetic")
    show_scale_bar(viewer)
    viewer.reset_view()
    return viewer


def main(argv=None) -> int:
    """Command-line entry of the demo."""
    parser = argparse.ArgumentParser(prog="python -m napari_stmap.demo", description=__doc__)
    parser.add_argument("--screenshot", default=None, help="save a PNG of the window and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stmap: %(message)s")
    import napari

    viewer = build_viewer(show=True)
    if args.screenshot:
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
