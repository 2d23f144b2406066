"""Dock widgets of napari-stmap: thin Qt views over :mod:`napari_stmap.core`.

One file per dock; all docks of a viewer share one :class:`~._session.Session` (the slide,
the measured spots, the model and the :class:`~napari_stmap.core.predict.Predictor`).
"""
