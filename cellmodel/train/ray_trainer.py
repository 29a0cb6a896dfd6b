"""The Ray Train adapter: datasets from shards, a TorchTrainer, and the run directory.

``run_training(cfg)`` is the whole job. It connects to the Ray cluster in ``RAY_ADDRESS``
(``ray job submit`` sets it) or starts a local one, reads the Parquet shards through Ray
Data (each worker streams its own share), trains both phases with DDP, and leaves in the
run directory ``<run.storage>/<run.name>``:

- ``config.toml``: the resolved config (pass it to ``--config`` to run it again);
- ``epoch-NNNN/``: Ray Train checkpoints in the foundation's format (the best by
  validation loss and the latest are kept);
- ``history.csv``, ``history.json``, ``history.png``: per-epoch metrics and the plot;
- ``model/``: a copy of the best checkpoint (lowest validation loss over both phases);
- ``summary.json``: where the best and last checkpoints are and the best epoch's metrics.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from cellmodel import storage
from cellmodel.cluster import ensure_ray
from cellmodel.config import ConfigError, TrainConfig
from cellmodel.train.history import read_history

log = logging.getLogger(__name__)

SUMMARY_FILE, CONFIG_FILE, MODEL_DIR = "summary.json", "config.toml", "model"


@dataclass
class TrainResult:
    """What a finished run produced. URIs are local paths or s3:// URIs."""

    run_dir: str
    best_checkpoint: str
    last_checkpoint: str
    model_uri: str  # copy of the best checkpoint at <run_dir>/model
    metrics: dict  # the best epoch's metrics
    history: list[dict] = field(default_factory=list)


def _absolute(uri: str) -> str:
    return uri if storage.is_remote(uri) else storage.get_fs(uri)[1]


def _check_run_dir(cfg: TrainConfig, run_dir: str) -> bool:
    """True when ``run_dir`` holds an earlier run to resume; refuses a mismatching one."""
    old_cfg_uri = storage.join(run_dir, CONFIG_FILE)
    if not storage.exists(old_cfg_uri):
        return False
    if not cfg.run.resume:
        raise ConfigError(
            f"run directory {run_dir} already exists and run.resume is false; choose a new "
            "run.name, delete that folder, or set run.resume=true to continue it"
        )
    old = TrainConfig.from_toml(storage.read_bytes(old_cfg_uri).decode())
    if old.model.name != cfg.model.name or old.model.overrides != cfg.model.overrides:
        raise ConfigError(
            f"run {cfg.run.name!r} in {run_dir} trained model {old.model.name!r} with other "
            "settings; resuming it with this model would mix weights. Choose another run.name"
        )
    return True


def _ray_storage(storage_uri: str):
    """(storage_path, storage_filesystem) for RunConfig; s3:// goes through an Arrow S3 client."""
    if not storage.is_remote(storage_uri):
        return _absolute(storage_uri), None
    from cellmodel.data.dataset import arrow_filesystem

    fs, path = arrow_filesystem(storage_uri)
    return path.rstrip("/"), fs


def _uri_of(storage_uri: str, fs_path: str) -> str:
    if storage.is_remote(storage_uri):
        return storage_uri.split("://", 1)[0] + "://" + fs_path
    return fs_path


def check_dataset(cfg: TrainConfig, model_cfg) -> dict:
    """The dataset's manifest, after checking it has the splits and classes this run needs
    (the model's classes come from the manifest unless ``model.overrides.classes`` is set)."""
    from cellmodel.data.dataset import load_manifest, split_names, split_parts

    manifest = load_manifest(cfg.data.uri)  # DatasetNotFoundError names the missing manifest
    have = split_names(manifest)
    for split in (*split_parts(cfg.data.train_split), *split_parts(cfg.data.val_split)):
        if split not in have:
            raise ConfigError(f"dataset {cfg.data.uri} has no split {split!r}; it has {have}")
    shared = set(split_parts(cfg.data.train_split)) & set(split_parts(cfg.data.val_split))
    if shared:
        log.warning(
            "data.train_split %r includes the validation split %s: validation figures are "
            "in-sample and the 'best' epoch is chosen on training data; for a final fit on "
            "every labelled cell, keep the last epoch (runs/<name>/epoch-NNNN) and report the "
            "figures of the same recipe trained without it",
            cfg.data.train_split,
            sorted(shared),
        )
    classes = manifest.get("classes")
    if classes and list(classes) != list(model_cfg.classes):
        raise ConfigError(
            f"dataset classes {classes} differ from model classes {list(model_cfg.classes)}; "
            "remove model.overrides.classes (the dataset's classes are used) or ingest again"
        )
    return manifest


def build_datasets(cfg: TrainConfig, model_cfg) -> dict:
    """Ray Datasets of decoded ``x`` and ``label`` rows for the train and val splits."""
    import ray.data

    from cellmodel.data.dataset import read_split

    # Per-epoch progress bars of every split are noise in a job log; epochs print one line.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return {
        "train": read_split(cfg.data.uri, cfg.data.train_split, model_cfg, uint8=True),
        "val": read_split(cfg.data.uri, cfg.data.val_split, model_cfg, uint8=True),
    }


def resolve(cfg: TrainConfig) -> tuple[dict, object]:
    """The dataset's manifest and the model config trained on it (classes from the manifest)."""
    from cellmodel.data.dataset import load_manifest

    manifest = load_manifest(cfg.data.uri)
    model_cfg = cfg.build_model_config(manifest.get("classes"))
    check_dataset(cfg, model_cfg)
    if cfg.distill.teachers:
        from cellmodel.train.distill import check_teachers

        # Absolute, as workers (and the run's config.toml) must find the same folders.
        cfg.distill.teachers = [_absolute(t) for t in cfg.distill.teachers]
        check_teachers(cfg, model_cfg.classes)
    return manifest, model_cfg


def data_meta(cfg: TrainConfig, manifest: dict) -> dict:
    """What a checkpoint records of the data it learned from (read by evaluate, Serve, slides)."""
    src = manifest.get("source", {})
    return {
        "uri": cfg.data.uri,
        "train_split": cfg.data.train_split,
        "val_split": cfg.data.val_split,
        "classes": manifest.get("classes"),
        **manifest.get("geometry", {}),
        **manifest.get("light", {}),
        "source_unit": src.get("source_unit"),
        "source_known": src.get("source_known"),
    }


def steps_per_epoch(cfg: TrainConfig, manifest: dict) -> int:
    from cellmodel.data.dataset import split_rows

    rows = split_rows(manifest, cfg.data.train_split)
    per_worker = rows // cfg.scaling.num_workers
    return max(1, -(-per_worker // cfg.data.batch_size))


def _data_config():
    """Train is split equally (DDP needs the same step count everywhere); val exactly once."""
    from ray.train import DataConfig

    class _Split(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                splits = ds.streaming_split(world_size, equal=(name == "train"))
                for i, s in enumerate(splits):
                    out[i][name] = s
            return out

    return _Split()


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg`` on Ray Train (resuming a run of the same name) and return what it made."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cellmodel.train.worker import train_loop_per_worker

    cfg.validate_run()
    cfg.run.storage = _absolute(cfg.run.storage)
    manifest, model_cfg = resolve(cfg)  # before Ray starts: a wrong path fails in a second
    run_dir = cfg.run_dir
    _check_run_dir(cfg, run_dir)
    sc = cfg.scaling
    ensure_ray(sc.num_workers * sc.cpus_per_worker, lean=True)
    datasets = build_datasets(cfg, model_cfg)
    storage.write_bytes(storage.join(run_dir, CONFIG_FILE), cfg.to_toml().encode())

    storage_path, storage_fs = _ray_storage(cfg.run.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "model": model_cfg.to_dict(),
            "run_dir": run_dir,
            "data_meta": data_meta(cfg, manifest),
            "steps_per_epoch": steps_per_epoch(cfg, manifest),
        },
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    result = trainer.fit()
    return _finish(cfg, run_dir, result)


def _finish(cfg: TrainConfig, run_dir: str, result) -> TrainResult:
    """Pick the lowest-validation-loss checkpoint of a Ray Train result and ``finish``."""
    best = [(c, m) for c, m in (result.best_checkpoints or []) if "val_loss" in m]
    if not best or result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name!r} finished without a checkpoint in {run_dir}")
    best_ckpt, best_metrics = min(best, key=lambda cm: (cm[1]["val_loss"], cm[1]["epoch"]))
    best_uri = _uri_of(cfg.run.storage, best_ckpt.path)
    last_uri = _uri_of(cfg.run.storage, result.checkpoint.path)
    return finish(cfg, run_dir, best_uri, last_uri, best_metrics)


def finish(cfg: TrainConfig, run_dir: str, best_uri: str, last_uri: str, best_metrics: dict):
    """Copy the best checkpoint to ``model/``, write ``summary.json``, return the result."""
    model_uri = storage.join(run_dir, MODEL_DIR)
    # Weights first, JSON last: the copy is only a checkpoint once it is complete.
    for name in ("model.safetensors", "checkpoint.json"):
        data = storage.read_bytes(storage.join(best_uri, name))
        storage.write_bytes(storage.join(model_uri, name), data)
    summary = {
        "run": cfg.run.name,
        "model": cfg.model.name,
        "best_checkpoint": best_uri,
        "last_checkpoint": last_uri,
        "model_uri": model_uri,
        "best_metrics": best_metrics,
    }
    storage.write_bytes(storage.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=best_uri,
        last_checkpoint=last_uri,
        model_uri=model_uri,
        metrics=dict(best_metrics),
        history=read_history(run_dir),
    )
