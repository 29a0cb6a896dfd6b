"""One way to join or start Ray, for every job and benchmark.

``ensure_ray()`` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it) or,
on a laptop, starts a local Ray with a few logical CPUs more than the machine has, so that
training workers, Serve replicas and Ray Data tasks all fit. S3 settings from the driver's
environment travel to the workers.
"""

from __future__ import annotations

import os

ENV_FOR_WORKERS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


# Ray Train's placement-group cleaner asks the State API every second whether the training
# controller is alive; a local Ray started without the dashboard has no State API, so each
# ask logged a warning: one line a second in every local training log. Local workers drop
# that one logger's warnings (errors still show); a cluster has its dashboard and never warns.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


SETUP_HOOK = "cellmodel.cluster.quiet_worker_logs"


def quiet_worker_logs() -> None:
    """Worker process setup hook of the local Ray (``runtime_env.worker_process_setup_hook``)."""
    import logging

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def worker_env() -> dict[str, str]:
    """The S3 settings of this process, for a Ray ``runtime_env``."""
    return {k: os.environ[k] for k in ENV_FOR_WORKERS if k in os.environ}


# A local Ray started for training alone leaves out what only a dashboard or a metrics scraper
# would read, so that its background processes take less of a laptop's cores from the
# training step (measured on 2 cores: 6 % of the machine during a one-worker run, 3.4 % lean;
# BENCHMARKS.md, "Training"): no metrics export from each process, task events sent every 10 s
# rather than every second (the State API that reads them is the dashboard's, which a local
# Ray runs without), no idle workers started ahead of the first task, and no preemption watcher
# (a laptop's node is not a spot instance). A cluster (``RAY_ADDRESS``) keeps its own settings.
LEAN_SYSTEM_CONFIG = {
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 10_000,
    "prestart_worker_first_driver": False,
}
LEAN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(
    num_cpus_needed: float = 0,
    *,
    num_cpus: int | None = None,
    quiet: bool = False,
    lean: bool = False,
):
    """Join the cluster in RAY_ADDRESS, or start a local Ray; a no-op when Ray is running.

    ``num_cpus_needed``: CPUs that long-lived actors (training workers) will hold; the local
    Ray gets at least that plus 2 logical CPUs for data tasks. ``num_cpus`` fixes the count.
    ``lean``: a local Ray started here runs with ``LEAN_SYSTEM_CONFIG`` and ``LEAN_ENV`` (for
    a training run; Serve's metrics need the full set, so jobs that serve leave it off).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=not quiet)
        return
    if num_cpus is None:
        num_cpus = max(os.cpu_count() or 1, int(num_cpus_needed + 0.999) + 2)
    if lean:
        for k, v in LEAN_ENV.items():
            os.environ.setdefault(k, v)  # read by Ray Train when the trainer is made
    ray.init(
        num_cpus=num_cpus,
        runtime_env={
            "env_vars": worker_env(),
            "worker_process_setup_hook": SETUP_HOOK,
        },
        include_dashboard=False,
        log_to_driver=not quiet,
        _system_config=LEAN_SYSTEM_CONFIG if lean else None,
    )
