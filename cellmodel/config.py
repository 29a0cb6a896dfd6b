"""The typed run configuration: one TOML file, a few ``section.key=value`` overrides.

A run is described by ``TrainConfig`` (sections ``run``, ``data``, ``model``, ``scaling``,
``phase1``, ``phase2``, ``loss``, ``debug``). ``load_config(path, overrides)`` reads the
file, applies the overrides and checks every key and type, so a typo fails before any
cluster work starts. ``TrainConfig.to_toml()`` writes the resolved config back out; the
trainer saves it in the run directory, where it can be passed to ``--config`` again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
AMP_MODES = ("auto", "bf16", "off")


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


@dataclass(kw_only=True)
class RunSection:
    """Where and under which name a run lives; the run directory is ``storage/name``."""

    name: str = ""  # empty: the config file's stem ("paper" for paper.toml)
    storage: str = "runs"  # local folder or s3:// URI holding one folder per run
    seed: int = 0
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    resume: bool = True  # a run directory that already exists is resumed, not overwritten


@dataclass(kw_only=True)
class DataSection:
    """The Parquet shard dataset (``manifest.json`` + ``<split>/part-*.parquet``)."""

    uri: str = ""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 32  # per worker
    shuffle_buffer: int = 256  # rows in Ray Data's local shuffle buffer; 0 turns shuffling off


@dataclass(kw_only=True)
class ModelSection:
    """A registered model variant plus ``ModelConfig`` overrides (e.g. a smaller input)."""

    name: str = "xception_bilstm"
    overrides: dict = field(default_factory=dict)  # e.g. {input_size = [3, 120, 160]}
    pretrained: list = field(default_factory=list)  # one backbone weights URI per CNN branch


@dataclass(kw_only=True)
class ScalingSection:
    """Ray Train workers: DDP over ``num_workers`` processes (nccl on GPUs, gloo on CPUs)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclass(kw_only=True)
class PhaseSection:
    """One training phase: its length, optimizer and numerics."""

    epochs: int = 0
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # RMSProp / SGD only
    amp: str = "auto"  # "auto": bf16 autocast on CUDA, off on CPU; "bf16"; "off"
    channels_last: str = "auto"  # "auto": on CUDA only; "on"; "off"
    feature_cache: bool = False  # phase 1 only: compute frozen-CNN features once, reuse each epoch


@dataclass(kw_only=True)
class LossSection:
    label_smoothing: float = 0.1


@dataclass(kw_only=True)
class DebugSection:
    """Fault injection for testing recovery: worker ``crash_rank`` exits hard once, mid-epoch."""

    crash_at_epoch: int = -1  # -1: never
    crash_rank: int = 0


def _phase1() -> PhaseSection:
    return PhaseSection(epochs=100, optimizer="rmsprop", lr=1e-3, feature_cache=True)


def _phase2() -> PhaseSection:
    return PhaseSection(epochs=70, optimizer="adam", lr=1e-4)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training run needs; defaults are the paper's two-phase schedule."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    phase1: PhaseSection = field(default_factory=_phase1)
    phase2: PhaseSection = field(default_factory=_phase2)
    loss: LossSection = field(default_factory=LossSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def validate(self) -> TrainConfig:
        """Check values that types alone cannot; returns self. Raises ``ConfigError``."""
        problems = []
        if not self.data.uri:
            problems.append("data.uri is empty: set it to the dataset folder or s3:// URI")
        if not self.run.name:
            problems.append("run.name is empty: name the run (it is also the resume key)")
        for key, p in (("phase1", self.phase1), ("phase2", self.phase2)):
            if p.epochs < 0:
                problems.append(f"{key}.epochs must be >= 0, got {p.epochs}")
            if p.optimizer not in OPTIMIZERS:
                problems.append(f"{key}.optimizer {p.optimizer!r}: choose one of {OPTIMIZERS}")
            if p.amp not in AMP_MODES:
                problems.append(f"{key}.amp {p.amp!r}: choose one of {AMP_MODES}")
            if p.channels_last not in ("auto", "on", "off"):
                problems.append(f"{key}.channels_last {p.channels_last!r}: auto, on or off")
            if p.lr <= 0:
                problems.append(f"{key}.lr must be > 0, got {p.lr}")
        if self.phase1.epochs + self.phase2.epochs == 0:
            problems.append("phase1.epochs + phase2.epochs is 0: nothing to train")
        if self.scaling.num_workers < 1:
            problems.append(f"scaling.num_workers must be >= 1, got {self.scaling.num_workers}")
        if self.data.batch_size < 1:
            problems.append(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        if not 0.0 <= self.loss.label_smoothing < 1.0:
            problems.append(
                f"loss.label_smoothing must be in [0, 1), got {self.loss.label_smoothing}"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def model_config(self):
        """The ``ModelConfig`` this run trains (registry defaults plus ``model.overrides``)."""
        from cellmodel.models import model_config

        try:
            return model_config(self.model.name, **self.model.overrides)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"[model] {e.args[0] if e.args else e}") from e

    @property
    def run_dir(self) -> str:
        from cellmodel import storage

        return storage.join(self.run.storage, self.run.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML that ``load_config`` reads back to an equal config."""
        lines: list[str] = []
        for sec_name, sec in self.to_dict().items():
            lines.append(f"[{sec_name}]")
            tables = []
            for k, v in sec.items():
                if isinstance(v, dict):
                    tables.append((k, v))
                else:
                    lines.append(f"{k} = {_toml_value(v)}")
            for k, v in tables:
                lines.append(f"\n[{sec_name}.{k}]")
                lines.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d, "")

    @classmethod
    def from_toml(cls, text: str) -> TrainConfig:
        """Parse TOML text (such as a run's saved ``config.toml``); not validated."""
        return _build(cls, tomllib.loads(text), "")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def _check_type(value, tp, where: str):
    """Coerce ints to floats for float fields; refuse anything else that does not fit."""
    origin = typing.get_origin(tp) or tp
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - no unions today
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, origin):
        raise ConfigError(
            f"{where} must be {origin.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the config"
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    if cls is TrainConfig:
        # Sections left out keep their own defaults (phase1 is not phase2's default).
        for name, f in fields.items():
            kwargs.setdefault(name, f.default_factory())
        for key in ("phase1", "phase2"):
            if key in d:
                base = fields[key].default_factory()
                kwargs[key] = _build(
                    PhaseSection, {**dataclasses.asdict(base), **d[key]}, key + "."
                )
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """``"phase1.epochs=3"`` -> (["phase1", "epochs"], 3). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: the key {key!r} is not a dotted section.key path")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # model.name=resnet50 without quotes
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set each ``section.key=value`` in the nested dict ``d`` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = d
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p!r} is a value, not a section")
        node[path[-1]] = value
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config (or start from defaults with ``path=None``), apply overrides, validate.

    ``run.name`` defaults to the file's stem, so running the same config again resumes.
    """
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass --config FILE.toml")
        try:
            d = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
    apply_overrides(d, list(overrides or []))
    cfg = TrainConfig.from_dict(d)
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg.validate()
