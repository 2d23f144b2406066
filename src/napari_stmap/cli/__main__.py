"""``python -m napari_stmap.cli``: the same as the ``stmap`` console script."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
