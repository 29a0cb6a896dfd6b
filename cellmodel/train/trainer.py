"""The training step and the two-phase driver, the same under Ray Train and in one process.

``PhaseTrainer`` holds one phase's state (network, optimizer, learning-rate schedule, weight
EMA, batch augmentation) and steps over plain ``(x, y)`` batches, where ``x`` is a uint8 or
float image batch (or, in a cached phase, the cached ``(features, gray)`` pair).
``run_phases`` runs phase 1 then phase 2 from wherever a restored state left off, handing
each epoch's metrics to a ``Reporter`` (Ray Train's report, or checkpoint folders on disk).
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cellmodel.config import PhaseSection, TrainConfig
from cellmodel.data.transforms import normalize
from cellmodel.models import save_checkpoint
from cellmodel.train.batch_aug import BatchAugment
from cellmodel.train.distill import Distiller
from cellmodel.train.features import CachedForward, build_cache
from cellmodel.train.loop import (
    autocast,
    make_loss,
    make_optimizer,
    reduce_sums,
    summarize,
    use_amp,
    use_channels_last,
)

Batch = tuple[Any, torch.Tensor]
STATE_FILE, TRAINER_FILE = "train_state.json", "trainer.pt"


class BatchSource(Protocol):
    """Where a worker's batches come from: uint8 or float ``(x, y)`` torch batches."""

    def train(self, seed: int) -> Iterable[Batch]: ...

    def val(self) -> Iterable[Batch]: ...


class Reporter(Protocol):
    """Where each epoch goes: metrics, and a checkpoint of ``trainer.save_model`` on rank 0."""

    def restore(self, model: nn.Module) -> dict: ...

    def report(self, trainer: PhaseTrainer, metrics: dict, state: dict) -> None: ...


def lr_factor(phase: PhaseSection, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier of ``phase.lr``: linear warm-up from 1/100, then constant or cosine."""
    total = max(1, phase.epochs * steps_per_epoch)
    warm = min(int(round(phase.warmup_epochs * steps_per_epoch)), total)

    def f(step: int) -> float:
        if step < warm:
            return 0.01 + 0.99 * step / max(1, warm)
        if phase.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        lo = phase.min_lr_ratio
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class PhaseTrainer:
    """One phase of training: what trains, how it steps, and which weights count."""

    def __init__(
        self,
        model: nn.Module,
        phase: PhaseSection,
        cfg: TrainConfig,
        *,
        device: torch.device,
        steps_per_epoch: int,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        distiller: Distiller | None = None,
    ) -> None:
        self.model, self.phase, self.device = model, phase, device
        self.distiller = distiller
        self.cached = phase.freeze_cnn and phase.feature_cache
        if phase.freeze_cnn:
            model.freeze_cnn()
        else:
            model.thaw_cnn()
        self.amp, self.channels_last = use_amp(phase, device), use_channels_last(phase, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = CachedForward(model) if self.cached else model
        self.net = wrap(self.module) if wrap is not None else self.module
        self.optimizer = make_optimizer(self.net.parameters(), phase)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(phase, steps_per_epoch)
        )
        self.ema = None
        if phase.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=phase.ema_decay, use_warmup=True)
        self.loss_fn = make_loss(cfg.loss.label_smoothing)
        pre = model.cfg.preprocessing()
        self.pre = pre
        self.augment = BatchAugment(cfg.augment, pre["mean"], pre["std"])
        self.steps = 0
        self.train_cache = self.val_cache = None

    # -- weights ------------------------------------------------------------------------------
    @property
    def save_model(self) -> nn.Module:
        """The weights that are evaluated, selected, saved and served: EMA's when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        d = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "steps": self.steps}  # fmt: skip
        if self.ema is not None:  # the checkpoint holds EMA weights; the raw ones resume training
            d["ema"] = self.ema.state_dict()
            d["raw"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return d

    def load_state_dict(self, d: dict) -> None:
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        self.steps = int(d.get("steps", 0))
        if "raw" in d:
            self.model.load_state_dict(d["raw"])
        if self.ema is not None and "ema" in d:
            self.ema.load_state_dict(d["ema"])

    # -- batches ------------------------------------------------------------------------------
    def _input(self, x) -> Any:
        if isinstance(x, (tuple, list)):  # cached (features, gray)
            return tuple(t.to(self.device, non_blocking=True) for t in x)
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize(x, self.pre)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def build_cache(self, train: Iterable[Batch], val: Iterable[Batch]) -> float:
        """Phase 1 with a frozen CNN: its features once per image; returns the seconds taken."""
        t0 = time.perf_counter()
        self.train_cache = self._cache(train)
        self.val_cache = self._cache(val)
        return time.perf_counter() - t0

    def _cache(self, batches: Iterable[Batch]):
        xs = ((self._input(x), y) for x, y in batches)
        return build_cache(self.model, xs, device=self.device, amp=self.amp,
                           channels_last=self.channels_last)  # fmt: skip

    def _forward(self, net: nn.Module, x) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return (net(*x) if isinstance(x, tuple) else net(x)).float()

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(
        self, batches: Iterable[Batch], on_step: Callable[[int], None] | None = None
    ) -> dict:
        """One pass; returns sums {"loss", "correct", "n"} over this process."""
        self.net.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for step, (x, y) in enumerate(batches):
            x, y = self._input(x), y.to(self.device, non_blocking=True)
            y_other, lam = None, 1.0
            if not isinstance(x, tuple):
                x = self.augment(x)
                x, y_other, lam = self.augment.mix(x, y)
            logits = self._forward(self.net, x)
            loss = self.loss_fn(logits, y)
            if y_other is not None:  # a mixed batch: targets blended as the images were
                loss = lam * loss + (1 - lam) * self.loss_fn(logits, y_other)
            if self.distiller is not None:  # the teachers answer on the same (mixed) images
                loss = self.distiller.blend(loss, logits, x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.steps)
            # Accumulate on the device: one host sync per epoch, not per step.
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            n += y.numel()
            if on_step is not None:
                on_step(step)
        return {"loss": float(loss_sum), "correct": int(correct), "n": n}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict:
        """Loss and accuracy sums of the saved weights (EMA's when on) over ``batches``."""
        net = self.save_model
        net = CachedForward(net) if self.cached else net
        was = net.training
        net.eval()
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in batches:
            x, y = self._input(x), y.to(self.device)
            logits = self._forward(net, x)
            loss_sum += float(self.loss_fn(logits, y)) * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            n += y.numel()
        net.train(was)
        return {"loss": loss_sum, "correct": correct, "n": n}

    def train_batches(self, data: BatchSource, seed: int, batch_size: int) -> Iterable[Batch]:
        if self.cached:
            return self.train_cache.batches(batch_size, shuffle=True, seed=seed)
        return data.train(seed)

    def val_batches(self, data: BatchSource, batch_size: int) -> Iterable[Batch]:
        return self.val_cache.batches(batch_size) if self.cached else data.val()


def fresh_state() -> dict:
    return {"epoch": -1, "phase": 1, "phase_epoch": -1, "history": [], "attempt": 0}


def run_phases(
    cfg: TrainConfig,
    model: nn.Module,
    data: BatchSource,
    reporter: Reporter,
    *,
    device: torch.device,
    steps_per_epoch: int,
    rank: int = 0,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Phase 1 then phase 2, resuming from the state the reporter restores; returns it."""
    from cellmodel.train.tracking import Tracker

    state = reporter.restore(model)
    model.to(device)
    bs = cfg.data.batch_size
    distiller = None
    if cfg.distill.teachers:  # loaded once per worker, for both phases
        distiller = Distiller(cfg, model.cfg.preprocessing(), device)
    tracker = Tracker(cfg, rank)
    try:
        _phases(cfg, model, data, reporter, state, tracker, device=device, bs=bs,
                steps_per_epoch=steps_per_epoch, rank=rank, wrap=wrap, on_step=on_step,
                on_epoch=on_epoch, log=log, distiller=distiller)  # fmt: skip
    finally:
        tracker.close()
    return state


def _phases(cfg, model, data, reporter, state, tracker, *, device, bs, steps_per_epoch, rank,
            wrap, on_step, on_epoch, log, distiller=None) -> None:  # fmt: skip
    for phase_no, phase in ((1, cfg.phase1), (2, cfg.phase2)):
        if phase_no < state["phase"]:
            continue
        first = state["phase_epoch"] + 1 if phase_no == state["phase"] else 0
        if first >= phase.epochs:
            continue
        trainer = PhaseTrainer(model, phase, cfg, device=device, steps_per_epoch=steps_per_epoch,
                               wrap=wrap, distiller=distiller)  # fmt: skip
        resumed = state.pop("trainer", None)
        if resumed is not None and phase_no == state["phase"] and first > 0:
            trainer.load_state_dict(resumed)
        cache_s = trainer.build_cache(data.train(0), data.val()) if trainer.cached else None
        for k in range(first, phase.epochs):
            epoch = state["epoch"] + 1
            seed = cfg.run.seed * 1_000_003 + epoch * 101 + rank
            if on_epoch is not None:
                on_epoch(epoch, state["attempt"])
            t0 = time.perf_counter()
            step_hook = (lambda s, e=epoch: on_step(e, s)) if on_step else None
            tr = trainer.train_epoch(trainer.train_batches(data, seed, bs), step_hook)
            train_s = time.perf_counter() - t0
            va = trainer.evaluate(trainer.val_batches(data, bs))
            tr, va = reduce_sums(tr, device), reduce_sums(va, device)
            metrics = {
                "epoch": epoch, "phase": phase_no, "phase_epoch": k,
                **summarize(tr, "train"), **summarize(va, "val"),
                "lr": trainer.optimizer.param_groups[0]["lr"],
                "epoch_s": round(time.perf_counter() - t0, 4),
                "images_per_s": round(tr["n"] / max(train_s, 1e-9), 2),
                "cached": trainer.cached, "ema": trainer.ema is not None,
            }  # fmt: skip
            if cache_s is not None and k == first:
                metrics["cache_build_s"] = round(cache_s, 4)
            state["history"].append(metrics)
            state.update(epoch=epoch, phase=phase_no, phase_epoch=k)
            if rank == 0:
                log(epoch_line(metrics))
            reporter.report(trainer, metrics, state)
            tracker.log_epoch(metrics)
        del trainer
        gc.collect()  # drop the DDP reducer (and its gradient hooks) before the next phase wraps


def epoch_line(m: dict) -> str:
    tags = ", ".join(t for t, on in (("cached", m["cached"]), ("ema", m.get("ema"))) if on)
    return (
        f"epoch {m['epoch']} (phase {m['phase']}{', ' + tags if tags else ''}): "
        f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f} | val loss "
        f"{m['val_loss']:.4f} acc {m['val_acc']:.3f} | {m['epoch_s']:.1f}s, "
        f"{m['images_per_s']:.0f} img/s"
    )


class MemoryBatches:
    """Decoded uint8 images kept in memory, reshuffled every epoch.

    The first ``train`` call reads the whole split from its source (decoding it) before it
    yields the first batch, and keeps it; every epoch, the first included, is a seeded
    permutation of the kept tensors. Decoding never runs beside a training step: on a few
    cores, decode tasks that share the CPU with the step's threads slow both.
    ``keep=False`` streams from the source every epoch instead (for splits larger than
    memory).
    """

    def __init__(
        self,
        train: Callable[[int], Iterable[Batch]],
        val: Callable[[], Iterable[Batch]],
        batch_size: int,
        keep: bool = True,
    ) -> None:
        self._train_src, self._val_src, self.batch_size = train, val, batch_size
        self.keep = keep
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: list[Batch] | None = None

    def train(self, seed: int) -> Iterator[Batch]:
        if not self.keep:
            yield from self._train_src(seed)
            return
        if self._train is None:
            xs, ys = [], []
            for x, y in self._train_src(seed):
                xs.append(x)
                ys.append(y)
            if not xs:
                return
            self._train = (torch.cat(xs), torch.cat(ys))
        x, y = self._train
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(y), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield x[idx], y[idx]

    def val(self) -> Iterator[Batch]:
        if not self.keep:
            yield from self._val_src()
            return
        if self._val is None:
            self._val = list(self._val_src())
        yield from self._val


def write_epoch_checkpoint(
    folder: str, trainer: PhaseTrainer, metrics: dict, state: dict, cfg: TrainConfig, data: dict
) -> None:
    """A checkpoint folder: the saved weights (EMA's when on) and JSON, plus resume state."""
    keep = {k: state[k] for k in ("epoch", "phase", "phase_epoch")}
    if cfg.model.pretrained:  # where the CNN branches started (ImageNet or domain weights)
        keep["pretrained"] = list(cfg.model.pretrained)
    if cfg.distill.teachers:  # whose answers it learned from, besides the labels
        keep["distill"] = cfg.distill.model_dump(mode="json")
    save_checkpoint(trainer.save_model, folder, metrics=metrics, data=data,
                    extra={"run": cfg.run.name, **keep})  # fmt: skip
    Path(folder, STATE_FILE).write_text(
        json.dumps({k: v for k, v in state.items() if k != "trainer"})
    )
    torch.save(trainer.state_dict(), Path(folder, TRAINER_FILE))
