"""Feature-map pictures (like the paper's Figures 7 and 8): what the CNN branch sees.

The first convolution's activations and the outputs of three later stages, captured with
forward hooks for one image. Layers are found generically: timm's ``feature_info`` names
the stage outputs of its backbones (legacy_xception, resnet50, inception_v3); any other
backbone (the tiny one) falls back to its top-level children after the first convolution,
expanding a container (``nn.Sequential``) when there are fewer than three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cellmodel.data.transforms import decode_image, to_array


def _backbone(model: nn.Module, branch: int) -> nn.Module:
    cnns = getattr(model, "cnns", None)
    if not cnns:
        raise ValueError(
            f"model {getattr(model, 'cfg', None) and model.cfg.name!r} has no CNN branch, so "
            "there are no convolutional feature maps to draw"
        )
    if not 0 <= branch < len(cnns):
        raise ValueError(f"CNN branch {branch} does not exist; the model has {len(cnns)}")
    return cnns[branch]


def _first_conv(backbone: nn.Module) -> str:
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError("the CNN branch has no Conv2d layer")


def _evenly(names: Sequence[str], k: int) -> list[str]:
    if len(names) <= k:
        return list(names)
    idx = np.round(np.linspace(0, len(names) - 1, k)).astype(int)
    return [names[i] for i in idx]


def _fallback_candidates(backbone: nn.Module, first: str) -> list[str]:
    names = [n for n, _ in backbone.named_children()]
    top = first.split(".")[0]
    after = names[names.index(top) + 1 :] if top in names else names
    if len(after) >= 3:
        return after
    expanded = []
    for n in after:
        m = backbone.get_submodule(n)
        kids = [f"{n}.{k}" for k, _ in m.named_children()]
        expanded += kids if isinstance(m, (nn.Sequential, nn.ModuleList)) and kids else [n]
    return expanded


def feature_layers(model: nn.Module, branch: int = 0, later: int = 3) -> list[str]:
    """Module names (within the CNN branch) to draw: the first Conv2d, then ``later`` stages."""
    backbone = _backbone(model, branch)
    first = _first_conv(backbone)
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[0], dict) and "module" in info[0]:
        # Skip timm's first stage: it sits right after the first convolution.
        stages = [d["module"] for d in info[1:] if d["module"] != first]
        return [first, *_evenly(stages, later)]
    candidates = _fallback_candidates(backbone, first)
    # Keep only modules that output a 4-D map, in the order the forward pass reaches them.
    order = _capture(backbone, _probe(model), candidates)
    return [first, *_evenly([n for n, _ in order], later)]


def _probe(model: nn.Module) -> torch.Tensor:
    c, h, w = model.cfg.input_size
    return torch.zeros(1, c, h, w)


def _capture(backbone: nn.Module, x: torch.Tensor, names: Sequence[str]):
    out: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(_m, _inp, y):
            if isinstance(y, torch.Tensor) and y.ndim == 4:
                # Clone: a later in-place activation would overwrite this tensor.
                out.append((name, y.detach().float().cpu().clone()))

        return fn

    handles = [backbone.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            backbone(x.to(next(backbone.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    seen, uniq = set(), []
    for n, t in out:  # a module called twice keeps its first output
        if n not in seen:
            seen.add(n)
            uniq.append((n, t))
    return uniq


def capture_feature_maps(
    model: nn.Module, x: np.ndarray, layers: Sequence[str] | None = None, branch: int = 0
) -> list[tuple[str, np.ndarray]]:
    """Activations (C, H, W) of ``layers`` (default ``feature_layers``) for one input (3, H, W)."""
    backbone = _backbone(model, branch)
    layers = list(layers or feature_layers(model, branch))
    known = dict(backbone.named_modules())
    bad = [n for n in layers if n not in known]
    if bad:
        raise ValueError(f"no layer named {', '.join(bad)} in the CNN branch")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    got = dict(_capture(backbone, t, layers))
    return [(n, got[n][0].numpy()) for n in layers if n in got]


def feature_maps_png(
    model: nn.Module,
    image: bytes,
    *,
    layers: Sequence[str] | None = None,
    channels: int = 8,
    branch: int = 0,
    title: str = "",
) -> bytes:
    """A PNG: one row per layer, the input image then its ``channels`` strongest maps."""
    from cellmodel.evaluate.plots import _png, plt

    cfg = model.cfg
    x = to_array(decode_image(image), cfg)
    maps = capture_feature_maps(model, x, layers, branch)
    shown = np.clip(x.transpose(1, 2, 0) * np.asarray(cfg.std) + np.asarray(cfg.mean), 0, 1)
    cols = channels + 1
    fig, axes = plt.subplots(
        len(maps), cols, figsize=(1.7 * cols, 1.5 * len(maps) + 0.6), squeeze=False
    )
    for row, (name, a) in zip(axes, maps):
        for ax in row:
            ax.axis("off")
        row[0].imshow(shown)
        row[0].set_title(f"{name}\n{a.shape[0]}x{a.shape[1]}x{a.shape[2]}", fontsize=7)
        # The channels with the largest mean activation carry most of what the layer saw.
        order = np.argsort(-a.reshape(a.shape[0], -1).mean(axis=1))[:channels]
        for ax, c in zip(row[1:], order):
            ax.imshow(a[c], cmap="viridis")
            ax.set_title(f"ch {c}", fontsize=7)
    fig.suptitle(title or f"Feature maps of {cfg.name} (CNN branch {branch})", fontsize=10)
    return _png(fig)
