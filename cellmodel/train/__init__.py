"""Two-phase training: the plain PyTorch loop, the phase-1 feature cache, the Ray Train adapter.

``run_training(cfg)`` runs a whole job on Ray Train; ``train_epoch`` and ``evaluate`` are
the plain loop it is built from (usable without Ray).
"""

from cellmodel.train.features import CachedForward, FeatureCache, build_cache
from cellmodel.train.history import read_history, write_history
from cellmodel.train.loop import evaluate, make_loss, make_optimizer, summarize, train_epoch
from cellmodel.train.ray_trainer import TrainResult, run_training

__all__ = [
    "CachedForward",
    "FeatureCache",
    "TrainResult",
    "build_cache",
    "evaluate",
    "make_loss",
    "make_optimizer",
    "read_history",
    "run_training",
    "summarize",
    "train_epoch",
    "write_history",
]
