"""What each Ray Train worker runs: restore, ``run_phases`` over its share of the shards, report.

The worker builds the model from the resolved model config the driver hands over, restores
the latest checkpoint if Ray hands one over (after a worker failure, or when a run with the
same name is started again), then runs the epochs that remain. Every epoch ends with one
``ray.train.report`` carrying the metrics and, from rank 0, a checkpoint in the foundation's
format plus the training state needed to resume.
"""

from __future__ import annotations

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
from cellmodel.config import TrainConfig
from cellmodel.models import build_from_config, load_pretrained
from cellmodel.models.config import ModelConfig
from cellmodel.train.history import write_history
from cellmodel.train.trainer import (
    STATE_FILE,
    TRAINER_FILE,
    MemoryBatches,
    PhaseTrainer,
    fresh_state,
    run_phases,
    write_epoch_checkpoint,
)

EVENTS_DIR = "events"


def _ray_batches(it, batch_size: int, shuffle_buffer: int = 0, seed: int | None = None):
    """``(x uint8, y)`` torch batches from a Ray Data iterator of ``x``/``label`` rows."""
    kwargs = {}
    if shuffle_buffer > 0:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    # No partial ``dtypes``: Ray 2.60 looks every column up in it. x stays uint8.
    for b in it.iter_torch_batches(batch_size=batch_size, **kwargs):
        yield b["x"], b["label"].to(torch.int64)


class RayReporter:
    """Restores from Ray's latest checkpoint; reports each epoch with a checkpoint from rank 0."""

    def __init__(self, cfg: TrainConfig, run_dir: str, rank: int, data_meta: dict) -> None:
        self.cfg, self.run_dir, self.rank, self.data_meta = cfg, run_dir, rank, data_meta

    def restore(self, model) -> dict:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return fresh_state()
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=True)
            state = json.loads(Path(d, STATE_FILE).read_text())
            trainer = Path(d, TRAINER_FILE)
            if trainer.exists():
                state["trainer"] = torch.load(trainer, map_location="cpu", weights_only=True)
        state["attempt"] = state.get("attempt", 0) + 1
        return state

    def report(self, trainer: PhaseTrainer, metrics: dict, state: dict) -> None:
        """One report per epoch on every worker; rank 0 attaches the checkpoint and history."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                write_epoch_checkpoint(tmp, trainer, metrics, state, self.cfg, self.data_meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                title = f"{self.cfg.run.name}: {self.cfg.model.name}"
                write_history(self.run_dir, state["history"], title=title)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}"
            )
        # Wait until the controller has registered this epoch's checkpoint: a worker that dies
        # early in the next epoch then resumes from this one, so at most one epoch is repeated.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def _event(run_dir: str, epoch: int, attempt: int) -> None:
    """An audit trail of epoch starts: after a failure, a repeated epoch shows up twice here."""
    name = f"epoch-{epoch:04d}-{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
    body = json.dumps({"epoch": epoch, "attempt": attempt, "time": time.time()}).encode()
    storage.write_bytes(storage.join(run_dir, EVENTS_DIR, name), body)


def crash_hook(cfg: TrainConfig, run_dir: str, rank: int):
    """Fault injection (``debug.crash_at_epoch``): exit the process hard, once per run."""

    def hook(epoch: int, step: int) -> None:
        if cfg.debug.crash_at_epoch != epoch or cfg.debug.crash_rank != rank:
            return
        marker = storage.join(run_dir, EVENTS_DIR, "crash-injected")
        if storage.exists(marker):
            return
        storage.write_bytes(marker, f"rank {rank} pid {os.getpid()} epoch {epoch}\n".encode())
        os._exit(17)  # no cleanup, no exception: what a killed or OOM-ed worker looks like

    return hook


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function; ``config`` holds the TrainConfig dict, the resolved
    model config, the run directory, the dataset facts and the steps per epoch."""
    cfg = TrainConfig.from_dict(config["train"])
    run_dir = config["run_dir"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)

    model = build_from_config(ModelConfig.from_dict(config["model"]))
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    bs, buf = cfg.data.batch_size, cfg.data.shuffle_buffer
    data = MemoryBatches(
        lambda seed: _ray_batches(train_it, bs, buf, seed),
        lambda: _ray_batches(val_it, bs),
        bs,
        keep=cfg.data.cache_decoded,
    )
    reporter = RayReporter(cfg, run_dir, rank, config.get("data_meta", {}))

    def on_epoch(epoch: int, attempt: int) -> None:
        if rank == 0:
            _event(run_dir, epoch, attempt)

    run_phases(
        cfg, model, data, reporter, device=device, steps_per_epoch=config["steps_per_epoch"],
        rank=rank, wrap=ray.train.torch.prepare_model, on_step=crash_hook(cfg, run_dir, rank),
        on_epoch=on_epoch,
    )  # fmt: skip
