"""Several checkpoints answering as one: the mean of their class probabilities.

Typical use is a seed ensemble (the same recipe trained with different seeds), which steadies
the run-to-run spread of a single model. Every member must agree on what it classifies and
on what it reads: the same classes in the same order, the same input size and the same
preprocessing. ``Ensemble`` then offers the ``Predictor`` calls that evaluation uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cellmodel.data.transforms import stack_bytes
from cellmodel.infer.predictor import Predictor


class EnsembleError(ValueError):
    """The checkpoints cannot be combined; the message says which one differs and how."""


class Ensemble:
    """Mean softmax of ``checkpoints`` (two or more folders or URIs).

    Keyword arguments go to each member's ``Predictor`` (``device``, ``backend``, ``tta``...).
    ``model``, ``cfg`` and ``meta`` are the first member's (what reports draw); ``members``
    holds every ``Predictor``; ``weights_sha256`` names the combination (order-independent).
    """

    def __init__(self, checkpoints: Sequence[str], **kwargs) -> None:
        checkpoints = list(checkpoints)
        if len(checkpoints) < 2:
            raise EnsembleError(
                f"an ensemble needs two or more checkpoints, got {len(checkpoints)}; "
                "pass a single checkpoint to Predictor instead"
            )
        self.members = [Predictor(c, **kwargs) for c in checkpoints]
        first = self.members[0]
        for uri, m in zip(checkpoints[1:], self.members[1:]):
            _check_compatible(checkpoints[0], first, uri, m)
        self.checkpoints = checkpoints
        self.model, self.cfg, self.meta = first.model, first.cfg, dict(first.meta)
        self.meta["ensemble"] = [
            {"checkpoint": c, "weights_sha256": m.weights_sha256}
            for c, m in zip(checkpoints, self.members)
        ]
        self.classes = list(first.classes)
        self.tta = first.tta
        digest = hashlib.sha256()
        for sha in sorted(m.weights_sha256 for m in self.members):
            digest.update(sha.encode())
        self.weights_sha256 = digest.hexdigest()

    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Mean of the members' probabilities for a preprocessed float32 batch."""
        return np.mean([m.predict_arrays(x) for m in self.members], axis=0)

    def predict_uint8(self, x: np.ndarray) -> np.ndarray:
        return self.predict_arrays(self.members[0].normalize_uint8(x))

    def predict_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        return self.predict_arrays(stack_bytes(images, self.cfg))


def _check_compatible(uri_a: str, a: Predictor, uri_b: str, b: Predictor) -> None:
    pa, pb = (p.cfg.preprocessing() for p in (a, b))
    if problems := member_differences(a.classes, pa, b.classes, pb):
        raise EnsembleError(
            f"{uri_b} cannot join an ensemble with {uri_a}: "
            + "; ".join(problems)
            + ". Ensemble checkpoints trained on the same data with the same input settings"
        )


def member_differences(classes_a, pre_a: dict, classes_b, pre_b: dict) -> list[str]:
    """How member b reads or answers unlike member a (classes, input size, pixel
    preprocessing), one phrase each; empty when they may join one ensemble. ``pre_*`` is a
    ``preprocessing()`` dict, as a checkpoint records it."""
    problems = []
    if list(classes_a) != list(classes_b):
        problems.append(f"classes {list(classes_b)} instead of {list(classes_a)}")
    size_a, size_b = tuple(pre_a["input_size"]), tuple(pre_b["input_size"])
    if size_a != size_b:
        problems.append(f"input size {size_b} instead of {size_a}")
    pa, pb = (_pixels(p) for p in (pre_a, pre_b))
    if pa != pb:
        problems.append(f"preprocessing {pb} instead of {pa}")
    return problems


def _pixels(pre: dict) -> dict:
    return {k: pre.get(k) for k in ("mean", "std", "interpolation", "branch_norms")}


def load_predictor(checkpoints: str | Sequence[str], **kwargs):
    """A ``Predictor`` for one checkpoint, an ``Ensemble`` for several."""
    if isinstance(checkpoints, str):
        return Predictor(checkpoints, **kwargs)
    checkpoints = list(checkpoints)
    if len(checkpoints) == 1:
        return Predictor(checkpoints[0], **kwargs)
    return Ensemble(checkpoints, **kwargs)
