"""The plain PyTorch training loop: loss, optimizers, one epoch, evaluation.

Nothing here knows about Ray: a batch is ``(inputs, y)`` where ``inputs`` is a tuple of
tensors handed to ``forward`` (one image tensor, or cached CNN features and a grayscale map),
so the same ``train_epoch`` runs the full model and the phase-1 feature-cache path.
Metrics are returned as sums (loss * n, correct, n) so that workers can add them up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from cellmodel.config import PhaseSection

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


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


def _to(inputs: tuple[torch.Tensor, ...], device: torch.device, channels_last: bool):
    out = []
    for t in inputs:
        t = t.to(device, non_blocking=True)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return tuple(out)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns sums {"loss", "correct", "n"} over this process."""
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    for step, (inputs, y) in enumerate(batches):
        inputs, y = _to(inputs, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(*inputs)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Accumulate on the device; one host sync at the end of the epoch, not per step.
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        n += y.numel()
        if on_step is not None:
            on_step(step)
    return {"loss": float(loss_sum), "correct": int(correct), "n": n}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: nn.Module,
    *,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss and accuracy sums over ``batches`` with the model in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for inputs, y in batches:
        inputs, y = _to(inputs, device, channels_last), y.to(device)
        with autocast(device, amp):
            logits = model(*inputs).float()
        loss_sum += float(loss_fn(logits, y)) * y.numel()
        correct += int((logits.argmax(1) == y).sum())
        n += y.numel()
    model.train(was_training)
    return {"loss": loss_sum, "correct": correct, "n": n}


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
