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
