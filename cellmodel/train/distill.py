"""Knowledge distillation: one network learns from the softened answers of several.

A seed ensemble (the same recipe trained with a few seeds, ``cellmodel.infer.ensemble``)
answers better than any of its members, at a cost of one forward pass per member. With
``[distill]`` in a training config the network being trained (the student) learns from
the labels and from the ensemble's answers (the teachers) on the very images of each
step, augmented and mixed as the student sees them, so that one network may keep part of
the ensemble's gain at the cost of one.

The loss of a step is ``(1 - weight) * label loss + weight * T^2 * KL(teacher || student)``
at temperature ``T``, where the teachers' distribution is the mean of their softmaxes at
``T``. The ``T^2`` keeps the gradient's size independent of ``T``. A phase that trains
on cached CNN features (a frozen CNN) learns from the labels alone.

A teacher must not have learned from the split the student is validated on, or the
student's validation scores would carry the teacher's memory of those cells:
:func:`check_teachers` refuses a teacher whose checkpoint says it trained on that split
of the same dataset, and one whose checkpoint does not say which split it trained on
(written before checkpoints recorded it) unless ``distill.unchecked`` is set. A final fit
(a run that trains on its own validation split) may learn from teachers fitted alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellmodel import storage
from cellmodel.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def distill_loss(student: torch.Tensor, teacher_probs: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 * KL(teacher || student)``, averaged over the batch: ``student`` are logits,
    ``teacher_probs`` the teachers' mean distribution at temperature ``t``."""
    log_q = F.log_softmax(student.float() / t, dim=1)
    return F.kl_div(log_q, teacher_probs, reduction="batchmean") * (t * t)


def _dataset_id(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(uri)


def check_teachers(cfg: TrainConfig, classes: Sequence[str]) -> list[dict]:
    """The teachers' checkpoint metadata, once each is known to answer over ``classes`` and
    not to have learned from ``cfg``'s validation split; ``ConfigError`` otherwise, naming
    the teacher and what to do. A teacher trained on another dataset cannot be checked
    against this one's cells: it is logged, and the user answers for it."""
    from cellmodel.models.checkpoint import (
        CheckpointError,
        expand_checkpoints,
        read_checkpoint_meta,
    )

    d = cfg.distill
    try:
        teachers = expand_checkpoints(d.teachers)  # an ensemble folder: its members
    except CheckpointError as e:
        raise ConfigError(f"distill.teachers: {e}") from e
    if len(set(teachers)) < len(teachers):
        raise ConfigError(f"distill.teachers names a checkpoint twice: {teachers}")
    metas, problems = [], []
    ours = _dataset_id(cfg.data.uri)
    # A final fit trains on its validation split itself: its validation is in-sample already
    # (the run says so), and teachers fitted the same way are what it should learn from.
    in_sample = cfg.data.val_split in cfg.data.train_split.split("+")
    for uri in teachers:
        try:
            meta = read_checkpoint_meta(uri)
        except CheckpointError as e:
            problems.append(f"distill.teachers: {e}")
            continue
        metas.append(meta)
        if list(meta["classes"]) != list(classes):
            problems.append(
                f"teacher {uri} answers over {list(meta['classes'])}, this run over "
                f"{list(classes)}: distil from checkpoints trained on the same classes"
            )
            continue
        data = meta.get("data") or {}
        if not data.get("uri") or _dataset_id(data["uri"]) != ours:
            log.warning(
                "teacher %s learned from %s, not from %s: make sure it never saw the cells of "
                "this run's validation split",
                uri,
                data.get("uri", "an unrecorded dataset"),
                cfg.data.uri,
            )
            continue
        if in_sample:
            continue
        split = data.get("train_split")
        if split is None:
            if not d.unchecked:
                problems.append(
                    f"teacher {uri} does not record which split of {cfg.data.uri} it trained "
                    "on (a checkpoint written before that was recorded), so it may have learned "
                    f"the cells of {cfg.data.val_split!r} that this run validates on; retrain "
                    "it, or set distill.unchecked = true if you know it did not"
                )
        elif cfg.data.val_split in split.split("+"):
            problems.append(
                f"teacher {uri} trained on {split!r} of {cfg.data.uri}, which holds this run's "
                f"validation split {cfg.data.val_split!r}: the student would learn the "
                "validation cells from it; distil from teachers trained without them"
            )
    if problems:
        raise ConfigError("; ".join(problems))
    return metas


class Teachers(nn.Module):
    """The teachers' mean softmax at a temperature, fed the student's own input.

    ``student_pre`` is the student's preprocessing (``ModelConfig.preprocessing()``): a
    batch normalised for the student is brought back to pixels and normalised (and
    resized, when a teacher reads another input size) for each teacher.
    """

    def __init__(self, uris: Sequence[str], student_pre: dict, device: torch.device) -> None:
        from cellmodel.models.checkpoint import expand_checkpoints, load_checkpoint

        super().__init__()
        self.members = nn.ModuleList()
        self._pre: list[dict] = []
        for uri in expand_checkpoints(uris):
            # Building a network draws its random initial weights: drawn here from a forked
            # generator, they leave the student's random stream (augmentation, mixing) as it
            # would be without teachers.
            with torch.random.fork_rng(devices=[]):
                model, meta = load_checkpoint(uri, map_location=device)
            model.requires_grad_(False).eval()
            self.members.append(model)
            self._pre.append(meta["preprocessing"])
        self.student_pre = student_pre

    def train(self, mode: bool = True) -> Teachers:  # teachers never leave eval mode
        return super().train(False)

    @staticmethod
    def _stats(pre: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(pre["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(pre["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return mean, std

    def inputs(self, x: torch.Tensor, pre: dict) -> torch.Tensor:
        """The student's normalised batch as a teacher with preprocessing ``pre`` reads it."""
        s_mean, s_std = self._stats(self.student_pre, x)
        t_mean, t_std = self._stats(pre, x)
        out = x
        if not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)):
            out = (x * s_std + s_mean - t_mean) / t_std
        h, w = pre["input_size"][1:]
        if tuple(out.shape[-2:]) != (h, w):
            mode = pre.get("interpolation", "bilinear")
            mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            out = F.interpolate(out, size=(h, w), mode=mode, **kw)
        return out

    @torch.no_grad()
    def probs(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Mean of the teachers' softmaxes at temperature ``t`` (float32)."""
        ps = [
            F.softmax(m(self.inputs(x, pre)).float() / t, dim=1)
            for m, pre in zip(self.members, self._pre)
        ]
        return torch.stack(ps).mean(0)


class Distiller:
    """What a training step needs: the teachers and the loss that blends them in."""

    def __init__(self, cfg: TrainConfig, student_pre: dict, device: torch.device) -> None:
        self.weight, self.t = cfg.distill.weight, cfg.distill.temperature
        self.teachers = Teachers(cfg.distill.teachers, student_pre, device)

    def blend(self, label_loss: torch.Tensor, logits: torch.Tensor, x) -> torch.Tensor:
        """The step's loss: the label loss blended with the teachers' on the input ``x``."""
        if self.weight == 0 or isinstance(x, (tuple, list)):  # cached features: labels only
            return label_loss
        target = self.teachers.probs(x, self.t)
        return (1 - self.weight) * label_loss + self.weight * distill_loss(logits, target, self.t)
