"""Phase-1 feature cache: run the frozen CNN once per image, then train on what it produced.

In phase 1 the CNN is frozen and in eval mode, and the shards are augmented offline, so its
pooled features for an image never change between epochs. ``build_cache`` computes them once
(together with the grayscale map the BiLSTM reads, and the label); ``CachedForward`` then
computes exactly what ``model(x)`` would, from the cached tensors, in every epoch. The cost
of an epoch drops from a full CNN forward per image to the RNN branch and the head.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cellmodel.train.loop import autocast

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


class CachedForward(nn.Module):
    """``forward(feats, gray)`` equals ``model(x)`` for the image ``x`` they were computed from.

    Calls the model's own ``fuse_gray`` (the merge rule lives in one place); a test checks
    it against the model's forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
        m = self.model
        fused = m.fuse_gray(feats if len(m.cnns) else None, gray if m.cfg.has_rnn else None)
        return m.forward_head(fused)


@dataclass
class FeatureCache:
    """Per-row CNN features (N, D), grayscale maps (N, H', W') and labels (N,), on the CPU."""

    feats: torch.Tensor
    gray: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.feats, self.gray, self.labels))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Batches ``((feats, gray), y)``; a seeded permutation when ``shuffle``."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield (self.feats[idx], self.gray[idx]), self.labels[idx]


@torch.no_grad()
def build_cache(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
) -> FeatureCache:
    """Run the (frozen, eval-mode) CNN branch over ``(x, y)`` batches once and keep the results.

    Features are stored in float32 even under bf16 autocast, so every epoch sees the same
    numbers a full forward pass would have produced.
    """
    if len(model.cnns) and not model.cnn_frozen:
        raise ValueError("the feature cache needs a frozen CNN: call model.freeze_cnn() first")
    model.cnns.eval()
    feats, grays, labels = [], [], []
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        with autocast(device, amp):
            f = model.forward_cnn(x) if len(model.cnns) else x.new_zeros(n, 0)
        g = model.gray_map(x) if model.cfg.has_rnn else x.new_zeros(n, 0)
        feats.append(f.float().cpu())
        grays.append(g.float().cpu())
        labels.append(y.cpu())
    if not labels:
        return FeatureCache(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64))
    return FeatureCache(torch.cat(feats), torch.cat(grays), torch.cat(labels).long())
