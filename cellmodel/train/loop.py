"""Pieces of the training step that know nothing of Ray: loss, optimizers, numerics, sums.

``PhaseTrainer`` (``trainer.py``) assembles them. Metrics travel as sums (loss * n,
correct, n) so that workers can add them up.
Metrics are returned as sums (loss * n, correct, n) so that workers can add them up.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from cellmodel.config import PhaseSection


def make_loss(label_smoothing: float) -> nn.Module:
    """Cross-entropy against the one-hot target mixed with the uniform distribution."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_optimizer(params, phase: PhaseSection) -> torch.optim.Optimizer:
    """The phase's optimizer over the parameters that train (``requires_grad``)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is the whole model frozen?")
    wd = phase.weight_decay
    if phase.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=phase.lr, momentum=phase.momentum, weight_decay=wd)
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=wd)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=wd)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=wd)
    raise ValueError(f"unknown optimizer {phase.optimizer!r}")


def use_amp(phase: PhaseSection, device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA; on CPU it is slower for these models, so "auto" skips it."""
    return phase.amp == "bf16" or (phase.amp == "auto" and device.type == "cuda")


def use_channels_last(phase: PhaseSection, device: torch.device) -> bool:
    return phase.channels_last == "on" or (phase.channels_last == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Add the per-process sums over all DDP workers (a no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([sums["loss"], sums["correct"], sums["n"]], dtype=torch.float64)
        t = t.to(device)
        dist.all_reduce(t)
        sums = {"loss": float(t[0]), "correct": int(t[1]), "n": int(t[2])}
    return sums


def summarize(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Mean loss and accuracy from sums: {"<prefix>_loss", "<prefix>_acc", "<prefix>_n"}."""
    n = max(int(sums["n"]), 1)
    return {
        f"{prefix}_loss": sums["loss"] / n,
        f"{prefix}_acc": sums["correct"] / n,
        f"{prefix}_n": int(sums["n"]),
    }
