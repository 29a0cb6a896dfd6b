"""The local Ray that ``ensure_ray`` starts: its worker setup hook."""

from __future__ import annotations

import importlib
import logging

from cellmodel import cluster


def test_local_workers_drop_only_the_cleaners_state_api_warnings():
    """The hook named in the local runtime_env imports, and it silences the warnings of Ray
    Train's placement-group cleaner (one a second without a dashboard) and nothing else; the
    logger is Ray's real module, so a rename in Ray fails here rather than going unnoticed."""
    module, name = cluster.SETUP_HOOK.rsplit(".", 1)
    hook = getattr(importlib.import_module(module), name)
    (noisy,) = cluster._NOISY_LOGGERS
    importlib.import_module(noisy)  # the module whose logger is quietened exists in this Ray
    other = logging.getLogger("ray.train")
    before = other.level
    logging.getLogger(noisy).setLevel(logging.NOTSET)
    hook()
    assert logging.getLogger(noisy).getEffectiveLevel() == logging.ERROR
    assert other.level == before


_PROBE = """
import json, os, ray
from ray._private.state import state
from cellmodel.cluster import ensure_ray
got = {}
for lean in (True, False):
    ensure_ray(quiet=True, lean=lean)
    config = state.get_system_config()
    rows = ray.data.range(64).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
    got[str(lean)] = {
        "sum": sum(r["id"] for r in rows),
        "config": {k: config.get(k) for k in %r},
        "watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
    }
    ray.shutdown()
    os.environ.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
print("PROBE " + json.dumps(got))
"""


def test_a_lean_local_ray_leaves_out_metrics_and_watchers_and_a_default_one_keeps_them():
    """``ensure_ray(lean=True)`` (what a training run calls) starts a local Ray without metrics
    export, with slower task-event reports, no prestarted workers and no preemption watcher,
    as read back from the running Ray's own system config; without ``lean`` (any other job:
    Serve needs its metrics) Ray keeps its defaults; Ray Data tasks run on both. In a fresh
    process: this test session's Ray is already up here."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
    code = _PROBE % (sorted(cluster.LEAN_SYSTEM_CONFIG),)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=240, check=True).stdout  # fmt: skip
    got = json.loads(out.split("PROBE ", 1)[1])
    assert got["True"]["config"] == cluster.LEAN_SYSTEM_CONFIG
    assert got["True"]["watcher"] == "0"
    assert got["True"]["sum"] == got["False"]["sum"] == 2 * sum(range(64))  # tasks still run
    assert all(v is None for v in got["False"]["config"].values()), got["False"]
    assert got["False"]["watcher"] is None
