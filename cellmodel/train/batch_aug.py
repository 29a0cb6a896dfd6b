"""Online augmentation of a training batch, on the batch's own device (CPU or GPU).

Works on normalised model input (N, 3, H, W) and returns the same shape: one affine warp
per image for flips, zoom and shift (edges reflected, so no black borders appear), then
colour in RGB (brightness, contrast, saturation) and stain in optical density, where each
dye's absorbance scales with how much of it the slide took up. ``mix`` then blends pairs of
images (mixup) or pastes a box of one into another (cutmix); the loss blends their targets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cellmodel.config import AugmentSection


class BatchAugment:
    """``aug(x)`` -> randomly augmented ``x``; draws from ``generator`` when given."""

    def __init__(self, cfg: AugmentSection, mean, std) -> None:
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def geometric(self) -> bool:
        c = self.cfg
        return c.flips or c.scale != (1.0, 1.0) or c.translate > 0

    @property
    def photometric(self) -> bool:
        c = self.cfg
        return any(v > 0 for v in (c.brightness, c.contrast, c.saturation, c.stain))

    @property
    def active(self) -> bool:
        return self.geometric or self.photometric

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.active:
            return x
        if self.geometric:
            x = self._warp(x, generator)
        if self.photometric:
            x = self._colour(x, generator)
        return x

    @property
    def mixing(self) -> bool:
        return self.cfg.mixup > 0 or self.cfg.cutmix > 0

    def mix(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Mixup or cutmix of each image with another of the batch: ``(x, y_other, lam)``,
        where the loss is ``lam * loss(y) + (1 - lam) * loss(y_other)``; ``(x, None, 1.0)``
        when this batch is not mixed. One weight per batch, drawn from Beta(alpha, alpha);
        for cutmix it becomes the share of the image left unpasted."""
        c, g, n = self.cfg, generator, x.shape[0]
        if not self.mixing or n < 2 or float(torch.rand((), generator=g)) >= c.mix_prob:
            return x, None, 1.0
        cut = c.cutmix > 0 and (c.mixup == 0 or float(torch.rand((), generator=g)) < 0.5)
        alpha = c.cutmix if cut else c.mixup
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        perm = torch.randperm(n, generator=g).to(x.device)
        if not cut:
            return x * lam + x[perm] * (1 - lam), y[perm], lam
        h, w = x.shape[-2:]
        side = (1 - lam) ** 0.5
        bh, bw = round(h * side), round(w * side)
        cy, cx = (int(torch.randint(0, d, (1,), generator=g)) for d in (h, w))
        y0, y1 = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return out, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)

    def _uniform(self, n: int, lo: float, hi: float, x: torch.Tensor, g) -> torch.Tensor:
        return torch.rand(n, generator=g).to(x.device) * (hi - lo) + lo

    def _warp(self, x: torch.Tensor, g) -> torch.Tensor:
        n, c = x.shape[0], self.cfg
        zoom = self._uniform(n, *c.scale, x, g)
        sx = sy = 1.0 / zoom
        if c.flips:
            sx = sx * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(x.device)
            sy = sy * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(x.device)
        t = c.translate * 2
        tx, ty = self._uniform(n, -t, t, x, g), self._uniform(n, -t, t, x, g)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)  # fmt: skip
        return out.contiguous(memory_format=torch.channels_last) if _is_cl(x) else out

    def _colour(self, x: torch.Tensor, g) -> torch.Tensor:
        n, c = x.shape[0], self.cfg
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        rgb = (x.float() * std + mean).clamp(0, 1)

        def factor(s: float) -> torch.Tensor:
            return self._uniform(n, 1 - s, 1 + s, x, g).view(n, 1, 1, 1)

        if c.stain > 0:  # Beer-Lambert: absorbance per channel scales with the dye taken up
            od = -torch.log(rgb.clamp_min(1 / 255))
            scale = self._uniform(n * 3, 1 - c.stain, 1 + c.stain, x, g).view(n, 3, 1, 1)
            rgb = torch.exp(-od * scale)
        if c.brightness > 0:
            rgb = rgb * factor(c.brightness)
        gray = (rgb * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
            1, keepdim=True
        )
        if c.contrast > 0:
            m = gray.mean(dim=(2, 3), keepdim=True)
            rgb = (rgb - m) * factor(c.contrast) + m
        if c.saturation > 0:
            rgb = (rgb - gray) * factor(c.saturation) + gray
        return (rgb.clamp(0, 1) - mean) / std


def _is_cl(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
