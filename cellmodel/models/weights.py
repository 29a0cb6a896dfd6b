"""Pretrained backbone weights from a path or URI: safetensors or a plain state dict, never pickle."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from cellmodel import storage


class WeightsError(RuntimeError):
    """A weights file that cannot be used for the model it was given to."""


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a torch state dict (``weights_only=True``)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise WeightsError(f"weights file not found: {uri}") from e
    if _looks_like_safetensors(data):
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except Exception as e:  # noqa: BLE001 - the library raises several types
            raise WeightsError(
                f"{uri} is not a readable safetensors file ({e}); re-export it with "
                "safetensors.torch.save_file"
            ) from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"{uri} is neither safetensors nor a plain PyTorch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Save weights with "
            "safetensors.torch.save_file or torch.save(model.state_dict(), path)"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri} does not hold a mapping of parameter names to tensors")
    return obj


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON header.
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n < len(data) and data[8:9] == b"{"


_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "AuxLogits.", "aux_logits.")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.")


def load_backbone_weights(backbone: nn.Module, uri: str, *, min_fraction: float = 0.5) -> dict:
    """Load ImageNet-style weights into one CNN backbone.

    Classifier weights in the file are ignored (the backbone has no classifier); wrapper
    prefixes such as ``module.`` are stripped. Returns ``{"loaded", "missing", "unexpected"}``.
    Raises ``WeightsError`` on a shape mismatch or when under ``min_fraction`` of the
    backbone's tensors would be filled, which means the file is for another architecture.
    """
    raw = read_state_dict(uri)
    sd = {}
    for k, v in raw.items():
        for p in _WRAPPER_PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        if not k.startswith(_HEAD_PREFIXES):
            sd[k] = v
    own = backbone.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise WeightsError(
            f"{uri}: {len(mismatched)} tensor(s) have the wrong shape for this backbone, e.g. "
            + "; ".join(mismatched[:3])
            + ". The file is probably for another architecture."
        )
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    matched = len(own) - len(missing)
    if matched < min_fraction * len(own):
        raise WeightsError(
            f"{uri} fills only {matched} of the backbone's {len(own)} tensors (missing e.g. "
            f"{missing[:3]}, unexpected e.g. {unexpected[:3]}); it is not a checkpoint of "
            "this architecture"
        )
    backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing or unexpected:
        warnings.warn(
            f"loaded {matched}/{len(own)} tensors from {uri}; missing {len(missing)} "
            f"(e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})",
            stacklevel=2,
        )
    return {"loaded": matched, "missing": missing, "unexpected": unexpected}


def load_pretrained(model: nn.Module, uris: str | list[str] | tuple[str, ...]) -> list[dict]:
    """Load one weights file per CNN branch of a ``CnnRnnClassifier``."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    cnns = list(model.cnns)
    if len(uris) != len(cnns):
        raise WeightsError(
            f"model {model.cfg.name!r} has {len(cnns)} CNN branch(es) {list(model.cfg.cnn)} but "
            f"{len(uris)} weights file(s) were given; give one per branch, in that order"
        )
    return [load_backbone_weights(m, u) for m, u in zip(cnns, uris)]
