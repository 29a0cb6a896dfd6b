"""Several checkpoints answering as one: the mean of their class probabilities.

Typical use is a seed ensemble (the same recipe trained with different seeds), which steadies
the run-to-run spread of a single model. Every member must agree on what it classifies and
on what it reads: the same classes in the same order, the same input size and the same
preprocessing. ``Ensemble`` then offers the ``Predictor`` calls that evaluation uses.

The mean of calibrated members is less confident than it is right (their disagreements
flatten it), so an ensemble has a temperature of its own, fitted by ``jobs.calibrate`` with
the members named together and stored in every member's ``checkpoint.json`` under the
ensemble's digest (``ensemble_calibration``): the same members, in any order, find it; any
other combination does not.

An ensemble folder (``ensemble.json`` naming member folders inside it; see
``cellmodel.models.checkpoint``) loads as its members: ``load_predictor("models/bundled")``
and ``load_predictor([member, member, member])`` are the same model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cellmodel.data.transforms import frame_of, stack_bytes
from cellmodel.infer.predictor import Predictor, softmax
from cellmodel.models.checkpoint import CheckpointError, expand_checkpoints

CALIBRATION_KEY = "ensemble_calibration"


class EnsembleError(ValueError):
    """The checkpoints cannot be combined; the message says which one differs and how."""


class Ensemble:
    """Mean softmax of ``checkpoints`` (two or more folders or URIs; an ensemble folder
    stands for its members).

    Keyword arguments go to each member's ``Predictor`` (``device``, ``backend``, ``tta``,
    ``num_threads``, ``concurrent_batches``...). ``model``, ``cfg`` and ``meta`` are the
    first member's (what reports draw); ``members`` holds every ``Predictor``;
    ``weights_sha256`` names the combination (order-independent) and ``expected_sha256``, when
    given, must equal it (``CheckpointError`` otherwise: the members changed since it was
    read); ``temperature`` is the one stored for this combination (1.0 when none is).
    ``device``, ``backend`` (the members' backends, "+"-joined where they differ), ``lanes``
    (the fewest of any member) and ``backend_timings`` (the first member's) describe it as a
    ``Predictor`` does.
    """

    def __init__(
        self, checkpoints: Sequence[str], *, expected_sha256: str | None = None, **kwargs
    ) -> None:
        checkpoints = expand_checkpoints(checkpoints)
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
        self.weights_sha256 = combination_digest(m.weights_sha256 for m in self.members)
        if expected_sha256 and expected_sha256 != self.weights_sha256:
            raise CheckpointError(
                f"the ensemble {checkpoints} has weights {self.weights_sha256[:12]}..., not the "
                f"{expected_sha256[:12]}... it was named by: a member changed since it was "
                "read; refusing to load a model other than the one named"
            )
        self.temperature = stored_temperature(checkpoints, [m.meta for m in self.members])
        self.meta["ensemble_temperature"] = self.temperature
        self.device = first.device
        self.num_threads = first.num_threads
        backends = list(dict.fromkeys(m.backend for m in self.members))
        self.backend = "+".join(backends)
        self.backend_timings = first.backend_timings
        self.lanes = min(m.lanes for m in self.members)

    def predict_arrays(self, x: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """Mean of the members' probabilities for a preprocessed float32 batch, sharpened or
        softened by the ensemble's temperature (``softmax(log p / T)``). ``concurrent``: as
        for ``Predictor`` (another batch runs beside this one)."""
        p = np.mean([m.predict_arrays(x, concurrent=concurrent) for m in self.members], axis=0)
        if self.temperature == 1.0:
            return p
        return softmax(np.log(np.clip(p, 1e-30, 1.0)) / self.temperature)

    def predict_uint8(self, x: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        return self.predict_arrays(self.members[0].normalize_uint8(x), concurrent=concurrent)

    def predict_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        return self.predict_arrays(stack_bytes(images, self.cfg))


def combination_digest(shas) -> str:
    """The SHA-256 naming a set of members (their weights' digests, in any order)."""
    digest = hashlib.sha256()
    for sha in sorted(shas):
        digest.update(sha.encode())
    return digest.hexdigest()


def stored_temperature(checkpoints: Sequence[str], metas: Sequence[dict]) -> float:
    """The temperature the members' ``checkpoint.json`` hold for exactly this combination
    (1.0 when none does); members that hold different ones are refused."""
    key = combination_digest(m["weights_sha256"] for m in metas)
    found = {
        c: float(entry["temperature"])
        for c, m in zip(checkpoints, metas)
        if (entry := (m.get(CALIBRATION_KEY) or {}).get(key))
    }
    if len(set(found.values())) > 1:
        raise EnsembleError(
            f"the members hold different temperatures for this ensemble ({found}); fit it "
            "again with python -m jobs.calibrate --checkpoint ... (every member) --write"
        )
    return next(iter(found.values()), 1.0)


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
    keys = ("mean", "std", "interpolation", "branch_norms")
    return {k: pre.get(k) for k in keys} | {"frame": frame_of(pre)}


def load_predictor(checkpoints: str | Sequence[str], **kwargs):
    """A ``Predictor`` for one checkpoint, an ``Ensemble`` for several (an ensemble folder
    counts as its members)."""
    checkpoints = expand_checkpoints(checkpoints)
    if len(checkpoints) == 1:
        return Predictor(checkpoints[0], **kwargs)
    return Ensemble(checkpoints, **kwargs)
