"""Named model variants: the paper's Table 1 family and a tiny one for tests."""

from __future__ import annotations

from collections.abc import Callable

from cellmodel.models.cnn_rnn import CnnRnnClassifier
from cellmodel.models.config import ModelConfig

_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Register a builder of a default ``ModelConfig`` under the function's name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> ModelConfig:
    """The default config of a registered variant with ``overrides`` applied."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    d = _REGISTRY[name]().to_dict()
    unknown = set(overrides) - set(d)
    if unknown:
        raise TypeError(
            f"unknown override(s) {sorted(unknown)} for model {name!r}; valid keys: {sorted(d)}"
        )
    d.update(overrides)
    if "classes" in overrides and "num_classes" not in overrides:
        d["num_classes"] = len(d["classes"])
    return ModelConfig.from_dict(d)


def build_model(name: str, num_classes: int | None = None, **overrides) -> CnnRnnClassifier:
    """Build a registered variant with random weights, e.g. ``build_model("xception_bilstm")``."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
        if "classes" not in overrides and num_classes != len(model_config(name).classes):
            overrides["classes"] = tuple(f"class_{i}" for i in range(num_classes))
    return build_from_config(model_config(name, **overrides))


def build_from_config(cfg: ModelConfig) -> CnnRnnClassifier:
    return CnnRnnClassifier(cfg)


# Paper-sized BiLSTM: 128 hidden units per direction over the 240 rows of a 320-wide map.
_RNN = dict(rnn_hidden=128, rnn_layers=1, fusion_dim=512)


@register_model
def xception() -> ModelConfig:
    return ModelConfig(name="xception", cnn=("legacy_xception",))


@register_model
def resnet50() -> ModelConfig:
    return ModelConfig(name="resnet50", cnn=("resnet50",))


@register_model
def inception_v3() -> ModelConfig:
    return ModelConfig(name="inception_v3", cnn=("inception_v3",))


@register_model
def xception_bilstm() -> ModelConfig:
    """The paper's model (Xception-LSTM)."""
    return ModelConfig(name="xception_bilstm", cnn=("legacy_xception",), **_RNN)


@register_model
def resnet50_bilstm() -> ModelConfig:
    return ModelConfig(name="resnet50_bilstm", cnn=("resnet50",), **_RNN)


@register_model
def inception_v3_bilstm() -> ModelConfig:
    return ModelConfig(name="inception_v3_bilstm", cnn=("inception_v3",), **_RNN)


@register_model
def xception_resnet50_bilstm() -> ModelConfig:
    return ModelConfig(name="xception_resnet50_bilstm", cnn=("legacy_xception", "resnet50"), **_RNN)


@register_model
def tiny_bilstm() -> ModelConfig:
    """Tests and the quickstart: the same two-branch structure at a fraction of the cost."""
    return ModelConfig(
        name="tiny_bilstm",
        cnn=("tiny_cnn",),
        rnn_hidden=16,
        rnn_downsample=2,
        fusion_dim=32,
        drop_rate=0.1,
        input_size=(3, 120, 160),
    )


@register_model
def compact_bilstm() -> ModelConfig:
    """The two-branch network at bundling size: a MobileNetV3 CNN branch (about 3 M weights)
    with the paper's BiLSTM branch over a half-resolution map, at 192x144."""
    return ModelConfig(
        name="compact_bilstm",
        cnn=("mobilenetv3_large_100",),
        rnn_hidden=96,
        rnn_downsample=2,
        fusion_dim=256,
        input_size=(3, 144, 192),
    )
