"""Shared fixtures: one real local Ray instance and one real S3 server per test session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

# Object-storage credentials for the local S3 server; set before any client is created.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed sample: ``crops/<CLASS>/*.jpeg`` and ``slides/`` (BCCD layout)."""
    return SAMPLE


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory) -> str:
    """The committed sample's crops ingested into a small shard dataset (32 rows a class);
    read-only for the tests that train on it."""
    from cellmodel.data.ingest import ingest

    out = str(tmp_path_factory.mktemp("shards") / "sample")
    ingest(str(SAMPLE / "crops"), out, target_per_class=32, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP server (moto) on 127.0.0.1; AWS_ENDPOINT_URL points every client at it.

    Yields the endpoint URL. Tests create their own buckets (``s3_bucket``).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the S3 server; yields ``s3://<bucket>``."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = name.strip("-") + f"-{free_port()}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole session (4 logical CPUs on a 2-core machine).

    Started after the S3 server so that Ray workers inherit AWS_ENDPOINT_URL.
    """
    import ray

    # Every Serve test runs behind the proxy's admission middleware, as deployments should
    # (serve/proxy.py); the proxy reads this when it starts, from the cluster's environment.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve.proxy:middlewares")
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={
                "env_vars": {k: os.environ[k] for k in _ENV_FOR_WORKERS if k in os.environ}
            },
        )
    yield ray
    ray.shutdown()


_ENV_FOR_WORKERS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)
