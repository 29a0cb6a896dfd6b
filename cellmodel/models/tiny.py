"""A tiny CNN backbone for tests and the quickstart: a forward in milliseconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(nn.Module):
    """Four strided conv blocks and global average pooling, with timm's backbone interface."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = _block(in_chans, widths[0], 2)  # named like Xception's first convolution
        stages, cin = [], widths[0]
        for w in widths[1:]:
            stages.append(_block(cin, w, 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.num_features = cin

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.conv1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))
