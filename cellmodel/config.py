"""Settings for every job: typed pydantic models, one TOML file, ``section.key=value`` overrides.

One mechanism serves training, ingest, the slide job and Serve:

- a settings class is a pydantic model whose fields are sections (themselves models) or
  values, with unknown keys refused (``extra="forbid"``);
- ``load_settings(cls, path, overrides)`` reads the TOML file, applies the overrides and
  validates, reporting every problem at once in one ``ConfigError``;
- ``to_toml(settings)`` writes the resolved settings back out, in a form ``load_settings``
  reads to an equal object (a training run saves it as ``config.toml``).

A training run is ``TrainConfig`` (sections ``run``, ``data``, ``model``, ``scaling``,
``phase1``, ``phase2``, ``augment``, ``loss``, ``distill``, ``tracking``, ``debug``);
``load_config`` is ``load_settings(TrainConfig, ...)`` plus the run-name default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
AMP_MODES = ("auto", "bf16", "off")

S = TypeVar("S", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# -- training -----------------------------------------------------------------------------------
class RunSection(Section):
    """Where and under which name a run lives; the run directory is ``storage/name``."""

    name: str = ""  # empty: the config file's stem ("paper" for paper.toml)
    storage: str = "runs"  # local folder or s3:// URI holding one folder per run
    seed: int = 0
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the latest checkpoint
    resume: bool = True  # a run directory that already exists is resumed, not overwritten


class DataSection(Section):
    """The Parquet shard dataset (``manifest.json`` + ``<split>/part-*.parquet``)."""

    uri: str = ""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = Field(32, ge=1)  # per worker
    shuffle_buffer: int = Field(256, ge=0)  # rows in the local shuffle buffer; 0: no shuffle
    # Keep each worker's decoded (uint8, model-sized) images in memory after the first epoch
    # and reshuffle them there: decoding leaves the critical path. Off: stream every epoch.
    cache_decoded: bool = True


class ModelSection(Section):
    """A registered model variant plus ``ModelConfig`` overrides (e.g. a smaller input).

    ``pretrained`` holds one weights file (path or s3:// URI) per CNN branch, in branch order;
    ``preprocessing`` names the normalisation those weights expect (``"imagenet"``, or
    ``"inception"``: mean = std = 0.5, as TF-ported Xception and InceptionV3 weights want):
    one name sets the input's normalisation, one per CNN branch gives each branch its own
    (the input then keeps the first). Both travel in the checkpoint.
    Classes default to the dataset's (its manifest) when ``overrides.classes`` is not set.
    """

    name: str = "xception_bilstm"
    overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {input_size = [3, 120, 160]}
    pretrained: list[str] = Field(default_factory=list)
    preprocessing: list[Literal["imagenet", "inception"]] = Field(default_factory=list)


class ScalingSection(Section):
    """Ray Train workers: DDP over ``num_workers`` processes (nccl on GPUs, gloo on CPUs)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class PhaseSection(Section):
    """One training phase: its length, what trains, the optimizer, schedule and numerics."""

    epochs: int = Field(0, ge=0)
    freeze_cnn: bool = False  # phase 1 of the paper: the CNN branch fixed, the rest trains
    optimizer: Literal["rmsprop", "adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)  # RMSProp / SGD only
    schedule: Literal["constant", "cosine"] = "constant"  # per-step learning-rate schedule
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from lr/100, then the schedule
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    ema_decay: float = Field(0.0, ge=0, lt=1)  # >0: evaluate, select and save EMA weights
    amp: Literal["auto", "bf16", "off"] = "auto"  # "auto": bf16 autocast on CUDA only
    channels_last: Literal["auto", "on", "off"] = "auto"  # "auto": on CUDA only
    feature_cache: bool = False  # frozen CNN only: compute its features once, reuse each epoch


class AugmentSection(Section):
    """Online augmentation of each training batch (on top of ingest's offline rotations).

    All off by default (the paper's protocol). Colour and stain jitter model slides stained
    and imaged on other days; scale and shift jitter model other framings of the cell; mixup
    and cutmix train on blends of two cells with blended targets (a regulariser).
    """

    flips: bool = False  # random horizontal and vertical flips
    scale: tuple[float, float] = (1.0, 1.0)  # random zoom factor range (1, 1: off)
    translate: float = Field(0.0, ge=0, le=0.5)  # random shift, as a fraction of the size
    brightness: float = Field(0.0, ge=0, le=1)  # multiplicative, 1 +- brightness
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    stain: float = Field(0.0, ge=0, le=1)  # per-channel optical-density scale, 1 +- stain
    # Mixing two training images (and their targets) in a batch: the mixing weight is drawn
    # from Beta(alpha, alpha), 0 turns it off. With both on, each batch takes one at random.
    mixup: float = Field(0.0, ge=0)  # blend whole images
    cutmix: float = Field(0.0, ge=0)  # paste a box of the other image
    mix_prob: float = Field(1.0, ge=0, le=1)  # share of batches that are mixed


class LossSection(Section):
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class DistillSection(Section):
    """Knowledge distillation (``cellmodel.train.distill``): learn from the labels and from
    the mean answer of ``teachers`` (checkpoints, e.g. a seed ensemble of this recipe)."""

    teachers: list[str] = []  # checkpoint folders or URIs; empty: no distillation
    weight: float = Field(0.5, ge=0, le=1)  # share of the loss that comes from the teachers
    temperature: float = Field(2.0, gt=0)  # softens both distributions
    # A teacher that does not record its training split cannot be checked for having seen
    # the validation cells; true runs it anyway (the user vouches for it).
    unchecked: bool = False


class TrackingSection(Section):
    """Experiment tracking: ``mlflow`` logs params and per-epoch metrics to ``uri``."""

    mlflow: bool = False
    uri: str = "mlruns"  # a local folder (file store) or a tracking server URL
    experiment: str = "cellmodel"


class DebugSection(Section):
    """Fault injection for testing recovery: worker ``crash_rank`` exits hard once, mid-epoch."""

    crash_at_epoch: int = -1  # -1: never
    crash_rank: int = 0


PHASE_DEFAULTS = {
    "phase1": {"epochs": 100, "freeze_cnn": True, "optimizer": "rmsprop", "lr": 1e-3,
               "feature_cache": True},
    "phase2": {"epochs": 70, "optimizer": "adam", "lr": 1e-4},
}  # fmt: skip


class TrainConfig(Section):
    """Everything one training run needs; defaults are the paper's two-phase schedule."""

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    phase1: PhaseSection = Field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["phase1"]))
    phase2: PhaseSection = Field(default_factory=lambda: PhaseSection(**PHASE_DEFAULTS["phase2"]))
    augment: AugmentSection = Field(default_factory=AugmentSection)
    loss: LossSection = Field(default_factory=LossSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @model_validator(mode="before")
    @classmethod
    def _phase_defaults(cls, d: Any) -> Any:
        """A ``[phase1]`` table fills in from phase 1's defaults, not from phase 2's."""
        if isinstance(d, dict):
            d = dict(d)
            for key, base in PHASE_DEFAULTS.items():
                if isinstance(d.get(key), dict):
                    d[key] = {**base, **d[key]}
        return d

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        problems = []
        if self.phase1.epochs + self.phase2.epochs == 0:
            problems.append("phase1.epochs + phase2.epochs is 0: nothing to train")
        for key in ("phase1", "phase2"):
            p = getattr(self, key)
            if p.feature_cache and not p.freeze_cnn:
                problems.append(f"{key}.feature_cache needs {key}.freeze_cnn = true")
        lo, hi = self.augment.scale
        if not 0 < lo <= hi:
            problems.append(f"augment.scale must be (low, high) with 0 < low <= high, got {lo, hi}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def validate_run(self) -> TrainConfig:
        """Check what a run needs beyond the types (a dataset and a name); returns self."""
        problems = []
        if not self.data.uri:
            problems.append("data.uri is empty: set it to the dataset folder or s3:// URI")
        if not self.run.name:
            problems.append("run.name is empty: name the run (it is also the resume key)")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def build_model_config(self, classes: list[str] | None = None):
        """The ``ModelConfig`` this run trains: registry defaults, then the dataset's
        ``classes`` (unless ``model.overrides`` sets them), then ``model.overrides``."""
        from cellmodel.models import model_config
        from cellmodel.models.config import PREPROCESSING

        kwargs: dict[str, Any] = {}
        if classes is not None and "classes" not in self.model.overrides:
            kwargs.update(classes=list(classes), num_classes=len(classes))
        pre = self.model.preprocessing
        if pre:
            kwargs.update(PREPROCESSING[pre[0]])
        if len(pre) > 1:
            kwargs["branch_norms"] = tuple(pre)
        kwargs.update(self.model.overrides)
        if "classes" in kwargs and "num_classes" not in kwargs:
            kwargs["num_classes"] = len(kwargs["classes"])
        try:
            return model_config(self.model.name, **kwargs)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"[model] {e.args[0] if e.args else e}") from e

    @property
    def run_dir(self) -> str:
        from cellmodel import storage

        return storage.join(self.run.storage, self.run.name)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return to_toml(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return validate_settings(cls, d)

    @classmethod
    def from_toml(cls, text: str) -> TrainConfig:
        """Parse TOML text (such as a run's saved ``config.toml``)."""
        return validate_settings(cls, tomllib.loads(text))


# -- the mechanism ------------------------------------------------------------------------------
def _problem(err: dict, cls: type[BaseModel]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or cls.__name__
    if err["type"] == "extra_forbidden":
        known = _known_keys(cls, err["loc"][:-1])
        return f"unknown key {where}; known keys there: {', '.join(known)}"
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{where}: {err['msg']}{shown}"


def _known_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = cls
    for part in loc:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return []
        node = field.annotation
    return sorted(getattr(node, "model_fields", {}))


def validate_settings(cls: type[S], d: dict) -> S:
    """``cls`` built from the nested dict ``d``; every problem in one ``ConfigError``."""
    try:
        return cls.model_validate(d)
    except ValidationError as e:
        problems = [_problem(err, cls) for err in e.errors(include_url=False)]
        raise ConfigError("; ".join(problems)) from None


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


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config FILE.toml")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from e


def load_settings(
    cls: type[S], path: str | Path | None = None, overrides: list[str] | None = None
) -> S:
    """Settings of type ``cls`` from a TOML file (or the defaults with ``path=None``) plus
    ``section.key=value`` overrides, validated."""
    d = read_toml(path) if path is not None else {}
    apply_overrides(d, list(overrides or []))
    return validate_settings(cls, d)


def to_toml(settings: BaseModel) -> str:
    """TOML that ``load_settings`` reads back to equal settings."""
    return tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A training config: ``load_settings(TrainConfig, ...)``; ``run.name`` defaults to the
    file's stem, so running the same config again resumes."""
    cfg = load_settings(TrainConfig, path, overrides)
    if not cfg.run.name and path is not None:
        cfg.run.name = Path(path).stem
    return cfg.validate_run()
