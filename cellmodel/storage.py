"""One place that turns a local path or an fsspec URI (s3://, gs://, memory://...) into a filesystem.

S3 endpoints come from the standard ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
variable, so the same code talks to AWS, MinIO, Ceph or a local test server.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def s3_options() -> dict:
    """s3fs keyword arguments taken from the environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts: dict = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def is_remote(uri: str | os.PathLike) -> bool:
    s = str(uri)
    return "://" in s and not s.startswith("file://")


def get_fs(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path within it (absolute for local paths)."""
    s = str(uri)
    if not is_remote(s):
        if s.startswith("file://"):
            s = s[len("file://") :]
        return LocalFileSystem(auto_mkdir=True), str(Path(s).expanduser().absolute())
    protocol = s.split("://", 1)[0]
    opts = s3_options() if protocol in ("s3", "s3a") else {}
    if protocol in ("s3", "s3a"):
        # Listings cached by one process go stale when another writes a dataset or checkpoint.
        opts["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(s, **opts)
    return fs, path


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that a reader sees either nothing or all of it.

    Local files go through a temporary name and an atomic rename; object stores publish
    an object only when its upload completes.
    """
    fs, path = get_fs(uri)
    if isinstance(fs, LocalFileSystem):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def pyarrow_fs(uri: str | os.PathLike):
    """A ``pyarrow.fs.FileSystem`` and path for ``uri`` (for Parquet and Ray Data)."""
    import pyarrow.fs as pafs

    fs, path = get_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
