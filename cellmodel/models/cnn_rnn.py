"""The two-branch CNN + BiLSTM network (and the CNN-only baselines) as one module.

CNN branch(es): ImageNet-style backbones pooled to a vector.
RNN branch: a bidirectional LSTM that reads the rows of a grayscale map of the same image.
The two vectors are projected to one width and merged by element-wise multiplication,
then a linear layer gives the class logits (softmax is applied by the loss or the caller).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cellmodel.models.config import PREPROCESSING, ModelConfig
from cellmodel.models.tiny import TinyCNN

# ITU-R BT.601 luma weights: the grayscale map the RNN reads.
_LUMA = (0.299, 0.587, 0.114)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """A pooled feature extractor (no classifier) with a ``num_features`` attribute."""
    if name == "tiny_cnn":
        return TinyCNN(**kwargs)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    # Some backbones (MobileNetV3) end in a head layer wider than ``num_features``.
    m.num_features = getattr(m, "head_hidden_size", None) or m.num_features
    return m


class CnnRnnClassifier(nn.Module):
    """CNN branch(es) and/or a BiLSTM branch fused by multiplication, then a linear head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cnns = nn.ModuleList(create_backbone(n, **cfg.cnn_kwargs) for n in cfg.cnn)
        self.cnn_dim = sum(int(m.num_features) for m in self.cnns)
        self._cnn_frozen = False
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.register_buffer("in_mean", mean, persistent=False)
        self.register_buffer("in_std", std, persistent=False)
        # Per-branch normalisation: (scale, shift) mapping the input's normalisation to the
        # one each branch's weights expect, x_b = x * scale + shift.
        for i, name in enumerate(cfg.branch_norms):
            b = PREPROCESSING[name]
            bm, bs = (
                torch.tensor(b["mean"]).view(1, 3, 1, 1),
                torch.tensor(b["std"]).view(1, 3, 1, 1),
            )
            self.register_buffer(f"branch{i}_scale", std / bs, persistent=False)
            self.register_buffer(f"branch{i}_shift", (mean - bm) / bs, persistent=False)

        if cfg.has_rnn:
            self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
            self.rnn = nn.LSTM(
                input_size=cfg.width // cfg.rnn_downsample,
                hidden_size=cfg.rnn_hidden,
                num_layers=cfg.rnn_layers,
                batch_first=True,
                bidirectional=True,
            )
            rnn_dim = 2 * cfg.rnn_hidden
            if self.cnns:
                self.cnn_proj = nn.Linear(self.cnn_dim, cfg.fusion_dim)
                self.rnn_proj = nn.Linear(rnn_dim, cfg.fusion_dim)
                norm = nn.LayerNorm if cfg.fusion_norm else (lambda _: nn.Identity())
                self.cnn_norm, self.rnn_norm = norm(cfg.fusion_dim), norm(cfg.fusion_dim)
                self.num_features = cfg.fusion_dim
            else:
                self.num_features = rnn_dim
        else:
            self.num_features = self.cnn_dim
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(self.num_features, cfg.num_classes)

    # -- branches ---------------------------------------------------------------------------
    def forward_cnn(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled CNN features, concatenated over branches: (B, cnn_dim)."""
        if self.cfg.branch_norms:
            feats = [
                m(x * getattr(self, f"branch{i}_scale") + getattr(self, f"branch{i}_shift"))
                for i, m in enumerate(self.cnns)
            ]
        else:
            feats = [m(x) for m in self.cnns]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)

    def gray_map(self, x: torch.Tensor) -> torch.Tensor:
        """The single-channel map the RNN reads, in [0, 1] pixel units: (B, H', W')."""
        rgb = x * self.in_std + self.in_mean
        gray = (rgb * self.luma).sum(dim=1, keepdim=True)
        if self.cfg.rnn_downsample > 1:
            gray = F.avg_pool2d(gray, self.cfg.rnn_downsample)
        return gray.squeeze(1)

    def forward_rnn(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states of both directions of the last LSTM layer: (B, 2 * hidden)."""
        return self.rnn_from_gray(self.gray_map(x))

    def rnn_from_gray(self, gray: torch.Tensor) -> torch.Tensor:
        """The RNN branch over an already computed grayscale map (the phase-1 cache keeps it)."""
        _, (h, _) = self.rnn(gray)
        return torch.cat([h[-2], h[-1]], dim=1)

    # -- timm-style API ---------------------------------------------------------------------
    def fuse(self, cnn_feats: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Merge precomputed CNN features with the RNN branch over ``x`` (the phase-1 path)."""
        return self.fuse_gray(cnn_feats, self.gray_map(x) if self.cfg.has_rnn else None)

    def fuse_gray(self, cnn_feats: torch.Tensor | None, gray: torch.Tensor | None) -> torch.Tensor:
        """``fuse`` given the grayscale map instead of the image: the single merge rule."""
        if not self.cfg.has_rnn:
            return cnn_feats
        r = self.rnn_from_gray(gray)
        if cnn_feats is None:
            return r
        return self.cnn_norm(self.cnn_proj(cnn_feats)) * self.rnn_norm(self.rnn_proj(r))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.forward_cnn(x) if self.cnns else None, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- training phases --------------------------------------------------------------------
    def cnn_parameters(self):
        return self.cnns.parameters()

    def freeze_cnn(self) -> None:
        """Phase 1: CNN weights fixed and its batch-norm statistics frozen (eval mode)."""
        for p in self.cnns.parameters():
            p.requires_grad_(False)
        self._cnn_frozen = True
        self.cnns.eval()

    def thaw_cnn(self) -> None:
        """Phase 2: every weight trains."""
        for p in self.cnns.parameters():
            p.requires_grad_(True)
        self._cnn_frozen = False
        self.cnns.train(self.training)

    @property
    def cnn_frozen(self) -> bool:
        return self._cnn_frozen

    def train(self, mode: bool = True) -> CnnRnnClassifier:
        super().train(mode)
        if self._cnn_frozen:
            self.cnns.eval()  # a frozen branch must not update its running statistics
        return self
