"""The same two-phase run in this process, without Ray: one device, the plain shard reader.

For a single GPU or a laptop where starting Ray costs more than it gives, and as the
baseline the training benchmark holds Ray Train against. The run directory has the same
layout as a Ray Train run's (``epoch-NNNN/`` checkpoints, history, ``model/``, summary), and
running the same name again resumes from the latest epoch.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from cellmodel import storage
from cellmodel.config import TrainConfig
from cellmodel.data.dataset import iter_split
from cellmodel.models import build_from_config, load_pretrained
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


def _epoch_dirs(run_dir: str) -> list[str]:
    fs, root = storage.get_fs(run_dir)
    if not fs.exists(root):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    done = [n for n in names if n.startswith("epoch-") and storage.exists(
        storage.join(run_dir, n, STATE_FILE))]  # fmt: skip
    return sorted(done)


class LocalReporter:
    """Checkpoint folders ``epoch-NNNN`` in the run directory: the best (by validation loss)
    and the latest are kept."""

    def __init__(self, cfg: TrainConfig, run_dir: str, data_meta: dict) -> None:
        self.cfg, self.run_dir, self.data_meta = cfg, run_dir, data_meta
        self.best: tuple[float, str, dict] | None = None

    def restore(self, model) -> dict:
        dirs = _epoch_dirs(self.run_dir)
        for name in dirs:  # the best so far, so a resumed run still keeps it
            uri = storage.join(self.run_dir, name)
            m = json.loads(storage.read_bytes(storage.join(uri, "checkpoint.json")))["metrics"]
            if self.best is None or m["val_loss"] < self.best[0]:
                self.best = (m["val_loss"], uri, m)
        if not dirs:
            return fresh_state()
        last = storage.join(self.run_dir, dirs[-1])
        trainer_path = storage.join(last, TRAINER_FILE)
        state = json.loads(storage.read_bytes(storage.join(last, STATE_FILE)))
        model.load_state_dict(st_load(storage.read_bytes(storage.join(last, "model.safetensors"))))
        if storage.exists(trainer_path):
            with storage.get_fs(trainer_path)[0].open(storage.get_fs(trainer_path)[1], "rb") as f:
                state["trainer"] = torch.load(f, map_location="cpu", weights_only=True)
        state["attempt"] = state.get("attempt", 0) + 1
        return state

    def report(self, trainer: PhaseTrainer, metrics: dict, state: dict) -> None:
        uri = storage.join(self.run_dir, f"epoch-{metrics['epoch']:04d}")
        if storage.is_remote(uri):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                write_epoch_checkpoint(tmp, trainer, metrics, state, self.cfg, self.data_meta)
                for p in Path(tmp).iterdir():
                    storage.write_bytes(storage.join(uri, p.name), p.read_bytes())
        else:
            write_epoch_checkpoint(storage.get_fs(uri)[1], trainer, metrics, state, self.cfg,
                                   self.data_meta)  # fmt: skip
        write_history(self.run_dir, state["history"], title=f"{self.cfg.run.name}: "
                      f"{self.cfg.model.name}")  # fmt: skip
        previous_best = self.best[1] if self.best else None
        if self.best is None or metrics["val_loss"] < self.best[0]:
            self.best = (metrics["val_loss"], uri, dict(metrics))
        keep = {uri, self.best[1]}
        for name in _epoch_dirs(self.run_dir):
            old = storage.join(self.run_dir, name)
            if old not in keep and (old == previous_best or name < posixpath.basename(uri)):
                fs, path = storage.get_fs(old)
                fs.rm(path, recursive=True)


def run_local(cfg: TrainConfig, *, device: str | None = None):
    """Train ``cfg`` in this process on ``device`` (default: CUDA when present, else CPU)."""
    from cellmodel.train.ray_trainer import (
        CONFIG_FILE,
        _absolute,
        _check_run_dir,
        data_meta,
        finish,
        resolve,
        steps_per_epoch,
    )

    cfg.validate_run()
    cfg.run.storage = _absolute(cfg.run.storage)
    manifest, model_cfg = resolve(cfg)
    run_dir = cfg.run_dir
    _check_run_dir(cfg, run_dir)
    storage.write_bytes(storage.join(run_dir, CONFIG_FILE), cfg.to_toml().encode())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.run.seed)
    model = build_from_config(model_cfg)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    bs, uri = cfg.data.batch_size, cfg.data.uri

    def split(name: str, shuffle: bool, seed: int = 0):
        for x, y in iter_split(uri, name, model_cfg, bs, shuffle=shuffle, seed=seed, uint8=True):
            yield torch.from_numpy(x), torch.from_numpy(y)

    data = MemoryBatches(
        lambda seed: split(cfg.data.train_split, cfg.data.shuffle_buffer > 0, seed),
        lambda: split(cfg.data.val_split, False), bs, keep=cfg.data.cache_decoded,
    )  # fmt: skip
    reporter = LocalReporter(cfg, run_dir, data_meta(cfg, manifest))
    cfg_one = cfg.model_copy(deep=True)
    cfg_one.scaling.num_workers = 1
    state = run_phases(cfg, model, data, reporter, device=dev,
                       steps_per_epoch=steps_per_epoch(cfg_one, manifest))  # fmt: skip
    if reporter.best is None:
        raise RuntimeError(f"run {cfg.run.name!r} finished without a checkpoint in {run_dir}")
    last = storage.join(run_dir, f"epoch-{state['epoch']:04d}")
    return finish(cfg, run_dir, reporter.best[1], last, reporter.best[2])
