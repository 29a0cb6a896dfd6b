"""Inference: a batch predictor over checkpoints, and white-cell finding on slides."""
