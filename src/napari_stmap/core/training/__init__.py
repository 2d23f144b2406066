"""Training of expression networks on measured spots or bins (PixNet, SpotNet, MagNet, any arch).

The public face: :func:`train_model` with a :class:`TrainConfig`, and the parts it is made of.
Modules: :mod:`.config` (the run's settings), :mod:`.data` (units, genes, depth),
:mod:`.augment`, :mod:`.batches`, :mod:`.loss`, :mod:`.state` (resumable state, weight
averaging), :mod:`.loop` (the model and the epochs), :mod:`.magnet` (MagNet's groups of bins).
"""

from __future__ import annotations

from .augment import augment_tile, hed_jitter
from .batches import make_spot_batch, make_tile_batch, plan_epoch
from .config import (
    CPU_ENCODER,
    TrainConfig,
    available_threads,
    check_device,
    read_gene_spec,
    resolve_config,
)
from .data import (
    ScaleTable,
    TrainSlide,
    load_training_data,
    prior_density,
    reference_area,
    select_genes,
    target_stats,
)
from .loop import TrainResult, build_model, train_model
from .loss import expression_loss
from .state import load_state, read_state_info, save_state, state_paths

__all__ = [
    "CPU_ENCODER",
    "ScaleTable",
    "TrainConfig",
    "TrainResult",
    "TrainSlide",
    "augment_tile",
    "available_threads",
    "build_model",
    "check_device",
    "expression_loss",
    "hed_jitter",
    "load_state",
    "load_training_data",
    "make_spot_batch",
    "make_tile_batch",
    "plan_epoch",
    "prior_density",
    "read_gene_spec",
    "read_state_info",
    "reference_area",
    "resolve_config",
    "save_state",
    "select_genes",
    "state_paths",
    "target_stats",
    "train_model",
]
