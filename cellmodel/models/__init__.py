"""Model variants, weight loading and checkpoints."""

from cellmodel.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from cellmodel.models.cnn_rnn import CnnRnnClassifier
from cellmodel.models.config import ModelConfig
from cellmodel.models.registry import (
    build_from_config,
    build_model,
    list_models,
    model_config,
    register_model,
)
from cellmodel.models.weights import WeightsError, load_backbone_weights, load_pretrained

__all__ = [
    "CheckpointError",
    "CnnRnnClassifier",
    "ModelConfig",
    "WeightsError",
    "build_from_config",
    "build_model",
    "list_models",
    "load_backbone_weights",
    "load_checkpoint",
    "load_pretrained",
    "model_config",
    "read_checkpoint_meta",
    "register_model",
    "save_checkpoint",
]
