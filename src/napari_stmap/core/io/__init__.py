"""File readers and writers at the bottom of the core: slides, measured spots, GeoJSON shapes.

- :mod:`.slide`: :func:`~.slide.open_slide` -> :class:`~.slide.Slide` (a lazy dask pyramid,
  level-0 px in (y, x) order, with its µm/px) and :func:`~.slide.read_at_mpp`, the one place
  where a slide window is resampled to a model's µm/px.
- :mod:`.spots`: ``read_*`` -> :class:`~.spots.Spots` (Space Ranger Visium, Visium HD, h5ad).
- :mod:`.regions`: QuPath GeoJSON in and out (:class:`~.regions.Annotation`).

Nothing is imported here, so ``import napari_stmap.core.io`` stays light; import the modules.
"""
