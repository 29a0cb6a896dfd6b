"""The model's configuration: architecture plus the preprocessing facts every consumer reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cellmodel import CLASSES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
# Named input normalisations: what pretrained weights expect (TF-ported Xception and
# InceptionV3 weights: "inception"; torchvision/timm ResNets: "imagenet").
PREPROCESSING = {
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "inception": {"mean": INCEPTION_MEAN, "std": INCEPTION_STD},
}

# The smallest input side a CNN backbone can take: InceptionV3's stem and its unpadded
# reductions leave nothing to convolve below 75 pixels. The others here run down to 8.
MIN_INPUT_SIDE = {"inception_v3": 75}


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model and to feed it images.

    ``input_size`` is (channels, height, width); the paper's crops are 320 wide by 240 high.
    """

    name: str
    cnn: tuple[str, ...] = ()  # timm backbone names, one per CNN branch; empty for RNN-only
    rnn_hidden: int = 0  # hidden units per direction of the BiLSTM; 0 means no RNN branch
    rnn_layers: int = 1
    rnn_downsample: int = 1  # average-pool the grayscale map by this factor before the LSTM
    fusion_dim: int = 512  # width both branches are projected to before the multiplication
    # Layer-normalise each projected vector before the multiplication, so the product's scale
    # does not depend on the CNN's activation scale (which jumps when a randomly initialised
    # CNN is thawed and its batch norm switches from running to batch statistics).
    fusion_norm: bool = True
    drop_rate: float = 0.2
    num_classes: int = len(CLASSES)
    classes: tuple[str, ...] = CLASSES
    input_size: tuple[int, int, int] = (3, 240, 320)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    # 0: the model reads the whole picture, as the paper's does. Above 0: the window around
    # the white cell's nucleus, this share of the picture's width, at the input's aspect
    # (``cellmodel.data.transforms.frame_cell``): the cell at a higher resolution for the same
    # input size.
    frame: float = 0.0
    cnn_kwargs: dict = field(default_factory=dict)
    # Per CNN branch, the normalisation its pretrained weights expect ("imagenet" or
    # "inception"), when it differs from the input's ``mean``/``std``: the branch then sees
    # its input re-normalised. Empty: every branch takes the input as it is.
    branch_norms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.cnn = tuple(self.cnn)
        self.classes = tuple(self.classes)
        self.input_size = tuple(int(v) for v in self.input_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.branch_norms = tuple(self.branch_norms)
        if self.branch_norms and len(self.branch_norms) != len(self.cnn):
            raise ValueError(
                f"model {self.name!r}: {len(self.branch_norms)} branch_norms for "
                f"{len(self.cnn)} CNN branch(es); give one per branch"
            )
        unknown = [n for n in self.branch_norms if n not in PREPROCESSING]
        if unknown:
            raise ValueError(f"unknown branch_norms {unknown}; known: {sorted(PREPROCESSING)}")
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"model {self.name!r}: {len(self.classes)} class names for num_classes="
                f"{self.num_classes}; give as many class names as classes"
            )
        if len(self.input_size) != 3 or self.input_size[0] != 3:
            raise ValueError(
                f"model {self.name!r}: input_size must be (3, height, width), got {self.input_size}"
            )
        if not self.cnn and not self.rnn_hidden:
            raise ValueError(f"model {self.name!r} has neither a CNN nor an RNN branch")
        for branch in self.cnn:
            side = MIN_INPUT_SIDE.get(branch, 0)
            if min(self.input_size[1:]) < side:
                _, h, w = self.input_size
                raise ValueError(
                    f"model {self.name!r}: its {branch} branch needs at least {side}x{side} "
                    f"pixels, and input_size is {h} high and {w} wide; raise input_size "
                    f"(e.g. model.overrides.input_size=[3, {max(h, side)}, {max(w, side)}])"
                )
        if not 0.0 <= self.frame <= 1.0:
            raise ValueError(
                f"model {self.name!r}: frame must lie in [0, 1] (0: the whole picture), "
                f"got {self.frame}"
            )
        if self.rnn_downsample < 1:
            raise ValueError("rnn_downsample must be >= 1")

    @property
    def has_rnn(self) -> bool:
        return self.rnn_hidden > 0

    @property
    def height(self) -> int:
        return self.input_size[1]

    @property
    def width(self) -> int:
        return self.input_size[2]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}"
            )
        return cls(**d)

    def preprocessing(self) -> dict:
        """The facts a data pipeline needs, as plain JSON-able values."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "frame": self.frame,
            "classes": list(self.classes),
            "branch_norms": list(self.branch_norms),
        }
