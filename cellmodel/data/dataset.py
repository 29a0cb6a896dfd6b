"""Read a Parquet shard dataset written by ``ingest``: manifest, Ray Dataset, plain iterator.

A dataset is a folder or prefix ``<uri>`` holding ``<split>/part-NNNNN.parquet`` shards and
``manifest.json``. The manifest is written last, so a dataset without one does not exist:
every reader here goes through ``load_manifest`` and reads only the shards it names, which
also keeps stray files from an interrupted run out of training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cellmodel import storage
from cellmodel.data.transforms import stack_bytes, stack_bytes_uint8

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# "unassigned": crops a source-grouping method could not place (kept, never trained on or
# scored by default: a copy of a training cell there would leak into validation).
SPLITS = ("train", "val", "test", "unassigned")

# Column order and types of every shard; ``aug`` is JSON such as {"angle": 90.0, "flip": false}.
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("source_id", pa.string()),
        ("aug", pa.string()),
    ]
)


class DatasetNotFoundError(FileNotFoundError):
    """No complete dataset at a URI (no ``manifest.json``), or a split it does not have."""


def load_manifest(uri: str) -> dict:
    """The manifest of the dataset at ``uri``.

    Raises ``DatasetNotFoundError`` when ``manifest.json`` is missing: either nothing was
    ingested there, or an ingest was interrupted (its shards are not a dataset).
    """
    path = storage.join(str(uri), MANIFEST)
    fs, fpath = storage.get_fs(path)
    try:
        with fs.open(fpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"no dataset at {uri}: {MANIFEST} is missing (nothing was ingested there, or an "
            "ingest did not finish); run `python -m jobs.ingest --source ... --out "
            f"{uri}` first"
        ) from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DatasetNotFoundError(f"{path} is not valid JSON ({e}); re-run the ingest") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetNotFoundError(
            f"{path} has schema_version {version!r}; this cellmodel reads version "
            f"{SCHEMA_VERSION}: re-run the ingest with this version"
        )
    return manifest


def split_names(manifest: Mapping) -> list[str]:
    """The splits present in a manifest, in the usual order."""
    return [s for s in SPLITS if s in manifest.get("splits", {})] + sorted(
        s for s in manifest.get("splits", {}) if s not in SPLITS
    )


def split_parts(split: str) -> list[str]:
    """The splits a split name stands for: ``"train+val"`` is both, read one after the other
    (e.g. a final fit on every labelled cell once the settings are chosen)."""
    return [p.strip() for p in split.split("+")]


def split_rows(manifest: Mapping, split: str) -> int:
    """Rows of ``split`` (summed over its parts)."""
    return sum(int(manifest["splits"][p]["rows"]) for p in split_parts(split))


def shard_uris(uri: str, split: str, manifest: Mapping | None = None) -> list[str]:
    """URIs of the shards of ``split`` (of each part of ``"a+b"``), as named by the manifest."""
    manifest = load_manifest(uri) if manifest is None else manifest
    splits = manifest.get("splits", {})
    out = []
    for part in split_parts(split):
        if part not in splits:
            raise DatasetNotFoundError(
                f"dataset {uri} has no split {part!r}; it has {split_names(manifest)}"
            )
        out += [storage.join(str(uri), s["path"]) for s in splits[part]["shards"]]
    return out


def arrow_filesystem(uri: str):
    """A serialisable ``pyarrow.fs.FileSystem`` and path for ``uri``, usable on Ray workers.

    For s3:// this is Arrow's native S3 client, pointed at ``AWS_ENDPOINT_URL`` when set
    (it pickles its options, so Ray workers rebuild it); other protocols go through fsspec.
    """
    import pyarrow.fs as pafs

    s = str(uri)
    if s.startswith(("s3://", "s3a://")):
        opts = storage.s3_options()
        kwargs: dict = {
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        }
        if "endpoint_url" in opts:
            ep = urlparse(opts["endpoint_url"])
            kwargs["endpoint_override"] = ep.netloc + ep.path.rstrip("/")
            kwargs["scheme"] = ep.scheme or "https"
            # A custom endpoint (MinIO, moto, Ceph) rarely knows AWS regions; any will do.
            kwargs["region"] = kwargs["region"] or "us-east-1"
        return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), s.split("://", 1)[1]
    return storage.pyarrow_fs(s)


def _preprocessing(preprocessing) -> dict:
    pre = (
        preprocessing.preprocessing() if hasattr(preprocessing, "preprocessing") else preprocessing
    )
    if not isinstance(pre, Mapping) or "input_size" not in pre:
        raise TypeError(
            "preprocessing must be a ModelConfig or its preprocessing() dict "
            f"(with input_size, mean, std); got {type(preprocessing).__name__}"
        )
    return dict(pre)


class _Decode:
    """Ray ``map_batches`` function: encoded images -> ``x`` (normalised float32, or resized
    uint8 that the consumer normalises) plus ``label``."""

    def __init__(self, pre: dict, uint8: bool = False) -> None:
        self.pre, self.uint8 = pre, uint8

    def __call__(self, batch: dict) -> dict:
        stack = stack_bytes_uint8 if self.uint8 else stack_bytes
        x = stack(list(batch["image"]), self.pre)
        return {"x": x, "label": np.asarray(batch["label"], dtype=np.int64)}


def read_split(
    uri: str,
    split: str,
    preprocessing=None,
    *,
    columns: list[str] | None = None,
    uint8: bool = False,
):
    """A ``ray.data.Dataset`` over one split of the dataset at ``uri``.

    Without ``preprocessing`` the rows are the raw shard columns (or ``columns``). With a
    ``ModelConfig`` or its ``preprocessing()`` dict, each row is ``x`` (float32, 3xHxW,
    resized and normalised as the model expects) and ``label`` (int64).
    """
    import ray.data

    manifest = load_manifest(uri)
    paths = shard_uris(uri, split, manifest)
    if not paths:
        raise DatasetNotFoundError(f"split {split!r} of {uri} has no shards (0 rows)")
    fs, _ = arrow_filesystem(uri)
    if str(uri).startswith(("s3://", "s3a://")):
        paths = [p.split("://", 1)[1] for p in paths]
    else:
        paths = [storage.get_fs(p)[1] for p in paths]
    if preprocessing is not None:
        columns = ["image", "label"]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns)
    if preprocessing is None:
        return ds
    return ds.map_batches(_Decode(_preprocessing(preprocessing), uint8), batch_format="numpy")


def open_shard(shard_uri: str) -> pq.ParquetFile:
    fs, path = storage.get_fs(shard_uri)
    return pq.ParquetFile(fs.open(path, "rb"))


def iter_record_batches(
    uri: str,
    split: str,
    columns: list[str] | None = None,
    batch_rows: int = 256,
    *,
    manifest: Mapping | None = None,
    shards: list[str] | None = None,
) -> Iterator[tuple[str, int, dict]]:
    """The one shard reader: ``(shard_uri, first_row, {column: values})`` per record batch
    of one split, shard by shard, in order. Training's plain path, evaluation, the benches
    and the tests all read shards through here (Ray Data reads them in ``read_split``)."""
    for shard in shards if shards is not None else shard_uris(uri, split, manifest):
        row = 0
        for rb in open_shard(shard).iter_batches(batch_size=batch_rows, columns=columns):
            d = rb.to_pydict()
            yield shard, row, d
            row += rb.num_rows


def iter_rows(uri: str, split: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Raw rows (dicts of column values) of one split, shard by shard, without Ray."""
    for _, _, d in iter_record_batches(uri, split, columns):
        keys = list(d)
        for values in zip(*(d[k] for k in keys)):
            yield dict(zip(keys, values))


def iter_split(
    uri: str,
    split: str,
    preprocessing,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    *,
    drop_last: bool = False,
    uint8: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(x (B,3,H,W) float32, y (B,) int64)`` of one split, without Ray.

    ``shuffle`` permutes the shard order and the rows within each shard (ingest already
    writes rows in a seeded random order, so every shard mixes classes and sources); the
    same ``seed`` gives the same order. Memory holds one shard's encoded images at a time.
    ``uint8``: ``x`` is resized uint8, not normalised (``transforms.normalize`` finishes it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pre = _preprocessing(preprocessing)
    stack = stack_bytes_uint8 if uint8 else stack_bytes
    shards = shard_uris(uri, split)
    rng = np.random.default_rng(seed)
    if shuffle:
        shards = [shards[i] for i in rng.permutation(len(shards))]
    images: list[bytes] = []
    labels: list[int] = []
    for shard in shards:
        # One shard at a time, shuffled within it.
        cols = {"image": [], "label": []}
        for _, _, d in iter_record_batches(uri, split, ["image", "label"], 4096, shards=[shard]):
            cols["image"] += d["image"]
            cols["label"] += d["label"]
        col_img, col_lab = cols["image"], cols["label"]
        order = rng.permutation(len(col_lab)) if shuffle else range(len(col_lab))
        for i in order:
            images.append(col_img[i])
            labels.append(col_lab[i])
            if len(images) == batch_size:
                yield stack(images, pre), np.asarray(labels, dtype=np.int64)
                images, labels = [], []
    if images and not drop_last:
        yield stack(images, pre), np.asarray(labels, dtype=np.int64)


def file_sha256(uri: str) -> str:
    """Hex sha256 of the bytes of one file."""
    h = hashlib.sha256()
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(uri: str) -> list[str]:
    """Problems found by re-reading every shard: checksum or row count differing from the
    manifest, or a missing shard. An empty list means the dataset is intact."""
    manifest = load_manifest(uri)
    problems = []
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            shard = storage.join(str(uri), s["path"])
            fs, path = storage.get_fs(shard)
            if not fs.exists(path):
                problems.append(f"{s['path']}: missing")
                continue
            digest = file_sha256(shard)
            if digest != s["sha256"]:
                problems.append(f"{s['path']}: sha256 {digest} != manifest {s['sha256']}")
            rows = open_shard(shard).metadata.num_rows
            if rows != s["rows"]:
                problems.append(f"{s['path']}: {rows} rows != manifest {s['rows']} ({split})")
    return problems
