"""Two-phase training: the plain PyTorch loop, the phase-1 feature cache, the Ray Train adapter.

``run_training(cfg)`` runs a whole job on Ray Train, ``run_local(cfg)`` the same in one
process; both drive ``PhaseTrainer`` (one phase's step, schedule, EMA and augmentation).
"""

from cellmodel.train.features import CachedForward, FeatureCache, build_cache
from cellmodel.train.history import read_history, write_history
from cellmodel.train.local import run_local
from cellmodel.train.loop import make_loss, make_optimizer, summarize
from cellmodel.train.ray_trainer import TrainResult, run_training
from cellmodel.train.trainer import MemoryBatches, PhaseTrainer, run_phases

__all__ = [
    "CachedForward",
    "FeatureCache",
    "MemoryBatches",
    "PhaseTrainer",
    "TrainResult",
    "build_cache",
    "make_loss",
    "make_optimizer",
    "read_history",
    "run_local",
    "run_phases",
    "run_training",
    "summarize",
    "write_history",
]
