"""Experiment tracking: each run's settings and per-epoch metrics to MLflow, when switched on.

``[tracking] mlflow = true`` logs to ``tracking.uri`` (a local folder becomes an MLflow
file store, e.g. ``mlruns/``; an ``http://`` URI is a tracking server) under the experiment
``tracking.experiment``, one MLflow run per training run (named after ``run.name``; a
resumed run continues the same MLflow run). Only rank 0 logs. Compare runs with
``mlflow ui --backend-store-uri mlruns``.
"""

from __future__ import annotations

import os

from cellmodel.config import TrainConfig


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Tracker:
    """Logs to MLflow when ``cfg.tracking.mlflow``; otherwise does nothing."""

    def __init__(self, cfg: TrainConfig, rank: int = 0) -> None:
        self.on = bool(cfg.tracking.mlflow) and rank == 0
        self.cfg = cfg
        self._run = None
        if not self.on:
            return
        try:
            import mlflow
        except ImportError as e:  # a clear message rather than a traceback deep in a worker
            raise RuntimeError(
                "tracking.mlflow is on but MLflow is not installed: pip install mlflow-skinny"
            ) from e
        self.mlflow = mlflow
        uri = cfg.tracking.uri
        if "://" not in uri:
            uri = "file://" + os.path.abspath(uri)
        if uri.startswith("file://"):
            # A plain folder needs no server; newer MLflow asks for this opt-in to use one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        found = mlflow.search_runs(
            filter_string=f"tags.cellmodel_run = '{cfg.run.name}'", output_format="list"
        )
        run_id = found[0].info.run_id if found else None
        self._run = mlflow.start_run(run_id=run_id, run_name=cfg.run.name,
                                     tags={"cellmodel_run": cfg.run.name})  # fmt: skip
        if run_id is None:
            mlflow.log_params(_flat(cfg.to_dict()))

    def log_epoch(self, metrics: dict) -> None:
        if not self.on:
            return
        nums = {k: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        self.mlflow.log_metrics(nums, step=int(metrics["epoch"]))

    def close(self) -> None:
        if self.on and self._run is not None:
            self.mlflow.end_run()
            self._run = None
