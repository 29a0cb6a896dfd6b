"""Evaluation: metrics, confusion matrix, calibration, feature maps and a readable report."""

from cellmodel.evaluate.data import ClassFolders, EvalDataError, ShardDataset, open_data
from cellmodel.evaluate.featuremaps import capture_feature_maps, feature_layers, feature_maps_png
from cellmodel.evaluate.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    log_loss,
    per_class_scores,
    source_intervals,
    source_scores,
    wilson_interval,
)
from cellmodel.evaluate.run import EvalOutputError, Predictions, evaluate_checkpoint, predict_data

__all__ = [
    "ClassFolders",
    "EvalDataError",
    "EvalOutputError",
    "Predictions",
    "ShardDataset",
    "calibration_bins",
    "capture_feature_maps",
    "classification_metrics",
    "confusion_matrix",
    "evaluate_checkpoint",
    "expected_calibration_error",
    "feature_layers",
    "feature_maps_png",
    "log_loss",
    "open_data",
    "per_class_scores",
    "predict_data",
    "source_intervals",
    "source_scores",
    "wilson_interval",
]
