"""What each Ray Train worker runs: restore, phase 1 (CNN frozen), phase 2 (thawed), report.

The worker builds the model, restores the latest checkpoint if Ray hands one over (after a
worker failure, or when a run with the same name is started again), then runs the epochs
that remain. Every epoch ends with one ``ray.train.report`` carrying the metrics and, from
rank 0, a checkpoint in the foundation's format plus the training state needed to resume.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConsistencyMode
from safetensors.torch import load_file

from cellmodel import storage
from cellmodel.config import PhaseSection, TrainConfig
from cellmodel.models import build_from_config, load_pretrained, save_checkpoint
from cellmodel.train.features import CachedForward, build_cache
from cellmodel.train.history import write_history
from cellmodel.train.loop import (
    evaluate,
    make_loss,
    make_optimizer,
    reduce_sums,
    summarize,
    train_epoch,
    use_amp,
    use_channels_last,
)

STATE_FILE, OPTIM_FILE = "train_state.json", "optimizer.pt"
EVENTS_DIR = "events"


def _image_batches(it, batch_size: int, shuffle_buffer: int = 0, seed: int | None = None):
    """``((x,), y)`` torch batches from a Ray Data iterator of ``x``/``label`` rows."""
    kwargs = {}
    if shuffle_buffer > 0:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    for b in it.iter_torch_batches(
        batch_size=batch_size, dtypes={"x": torch.float32, "label": torch.int64}, **kwargs
    ):
        yield (b["x"],), b["label"]


def _fresh_state() -> dict:
    return {"epoch": -1, "phase": 1, "phase_epoch": -1, "history": [], "attempt": 0}


def _restore(model, optimizer_holder: dict) -> dict:
    """Load weights (and remember the optimizer state) from Ray's latest checkpoint, if any."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return _fresh_state()
    with ckpt.as_directory() as d:
        model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=True)
        state = json.loads(Path(d, STATE_FILE).read_text())
        opt = Path(d, OPTIM_FILE)
        if opt.exists():
            optimizer_holder["state"] = torch.load(opt, map_location="cpu", weights_only=True)
    state["attempt"] = state.get("attempt", 0) + 1
    return state


def _event(run_dir: str, epoch: int, attempt: int) -> None:
    """An audit trail of epoch starts: after a failure, a repeated epoch shows up twice here."""
    name = f"epoch-{epoch:04d}-{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
    body = json.dumps({"epoch": epoch, "attempt": attempt, "time": time.time()}).encode()
    storage.write_bytes(storage.join(run_dir, EVENTS_DIR, name), body)


def _maybe_crash(cfg: TrainConfig, run_dir: str, epoch: int, rank: int) -> None:
    """Fault injection (``debug.crash_at_epoch``): exit the process hard, once per run."""
    if cfg.debug.crash_at_epoch != epoch or cfg.debug.crash_rank != rank:
        return
    marker = storage.join(run_dir, EVENTS_DIR, "crash-injected")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, f"rank {rank} pid {os.getpid()} epoch {epoch}\n".encode())
    os._exit(17)  # no cleanup, no exception: what a killed or OOM-ed worker looks like to Ray


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function; ``config`` is {"train": TrainConfig dict, "run_dir": URI}."""
    cfg = TrainConfig.from_dict(config["train"])
    run_dir = config["run_dir"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)

    model = build_from_config(cfg.model_config())
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    holder: dict = {}
    state = _restore(model, holder)
    model.to(device)
    loss_fn = make_loss(cfg.loss.label_smoothing)
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    rows: list[dict] = state["history"]
    epoch = state["epoch"]

    for phase_no, phase in ((1, cfg.phase1), (2, cfg.phase2)):
        if phase_no < state["phase"]:
            continue
        first = state["phase_epoch"] + 1 if phase_no == state["phase"] else 0
        if first >= phase.epochs:
            continue
        opt_state = holder.pop("state", None) if phase_no == state["phase"] and first > 0 else None
        epoch = _run_phase(
            cfg, phase_no, phase, first, epoch, model, loss_fn, opt_state,
            train_it, val_it, rows, run_dir, rank, device, state["attempt"],
        )  # fmt: skip


def _run_phase(
    cfg, phase_no: int, phase: PhaseSection, first: int, epoch: int, model, loss_fn,
    opt_state, train_it, val_it, rows: list[dict], run_dir: str, rank: int, device, attempt: int,
) -> int:  # fmt: skip
    """Epochs ``first .. phase.epochs-1`` of one phase; returns the last global epoch number."""
    if phase_no == 1:
        model.freeze_cnn()
    else:
        model.thaw_cnn()
    amp, cl = use_amp(phase, device), use_channels_last(phase, device)
    if cl:
        model.to(memory_format=torch.channels_last)
    bs = cfg.data.batch_size
    cached = phase_no == 1 and phase.feature_cache
    if cached:
        t0 = time.perf_counter()
        train_cache = build_cache(model, _strip(_image_batches(train_it, bs)), device=device, amp=amp, channels_last=cl)  # fmt: skip
        val_cache = build_cache(model, _strip(_image_batches(val_it, bs)), device=device, amp=amp, channels_last=cl)  # fmt: skip
        cache_s = time.perf_counter() - t0
        eval_net = CachedForward(model)
        net = ray.train.torch.prepare_model(eval_net)
    else:
        eval_net = model
        net = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(net.parameters(), phase)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)

    for k in range(first, phase.epochs):
        epoch += 1
        if rank == 0:
            _event(run_dir, epoch, attempt)
        seed = cfg.run.seed * 1_000_003 + epoch * 101 + rank
        if cached:
            train_b = train_cache.batches(bs, shuffle=cfg.data.shuffle_buffer > 0, seed=seed)
            val_b = val_cache.batches(bs)
        else:
            train_b = _image_batches(train_it, bs, cfg.data.shuffle_buffer, seed)
            val_b = _image_batches(val_it, bs)
        t0 = time.perf_counter()
        tr = train_epoch(
            net, train_b, optimizer, loss_fn, device=device, amp=amp, channels_last=cl,
            on_step=lambda step, e=epoch: _maybe_crash(cfg, run_dir, e, rank),
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        va = evaluate(eval_net, val_b, loss_fn, device=device, amp=amp, channels_last=cl)
        tr, va = reduce_sums(tr, device), reduce_sums(va, device)
        metrics = {
            "epoch": epoch,
            "phase": phase_no,
            "phase_epoch": k,
            **summarize(tr, "train"),
            **summarize(va, "val"),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_s": round(time.perf_counter() - t0, 4),
            "images_per_s": round(tr["n"] / max(train_s, 1e-9), 2),
            "cached": cached,
        }
        if cached and k == first:
            metrics["cache_build_s"] = round(cache_s, 4)
        rows.append(metrics)
        if rank == 0:
            print(_epoch_line(metrics), flush=True)
        state = {"epoch": epoch, "phase": phase_no, "phase_epoch": k, "history": rows,
                 "attempt": attempt}  # fmt: skip
        _report(model, optimizer, metrics, state, run_dir, rank, cfg)
    del net, optimizer
    gc.collect()  # drop the DDP reducer (and its gradient hooks) before the next phase wraps again
    return epoch


def _epoch_line(m: dict) -> str:
    return (
        f"epoch {m['epoch']} (phase {m['phase']}{', cached' if m['cached'] else ''}): "
        f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.3f} | val loss "
        f"{m['val_loss']:.4f} acc {m['val_acc']:.3f} | {m['epoch_s']:.1f}s, "
        f"{m['images_per_s']:.0f} img/s"
    )


def _strip(batches):
    """``((x,), y)`` -> ``(x, y)`` for ``build_cache``."""
    for (x,), y in batches:
        yield x, y


def _report(model, optimizer, metrics: dict, state: dict, run_dir: str, rank: int, cfg) -> None:
    """One report per epoch on every worker; rank 0 attaches the checkpoint and writes history."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(model, tmp, metrics=metrics, extra={"run": cfg.run.name, **{
                k: state[k] for k in ("epoch", "phase", "phase_epoch")}})  # fmt: skip
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            torch.save(optimizer.state_dict(), Path(tmp, OPTIM_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            title = f"{cfg.run.name}: {cfg.model.name}"
            write_history(run_dir, state["history"], title=title)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}"
        )
    # Wait until the controller has registered this epoch's checkpoint: a worker that dies
    # early in the next epoch then resumes from this one, so at most one epoch is repeated.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
