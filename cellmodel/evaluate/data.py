"""Labelled images to evaluate on: a class-folder tree or a Parquet shard dataset.

Both are read the same way: batches of encoded images with their labels (as indices into
the checkpoint's classes), row ids and, for shard datasets, the source cell of each image.
Images are decoded later, by the evaluator, so a corrupt one can be skipped and counted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cellmodel import storage
from cellmodel.data.sources import class_folders
from cellmodel.data.transforms import IMAGE_EXTS


class EvalDataError(ValueError):
    """Evaluation data that cannot be used as given; the message says what to change."""


@dataclass
class Batch:
    ids: list[str]
    refs: list[str]  # where to fetch the image again (for the confident-mistakes grid)
    labels: np.ndarray  # int64 indices into the checkpoint's classes
    sources: list[str] | None
    images: list  # encoded bytes, or the exception that stopped reading them


def _match_classes(names: Sequence[str], classes: Sequence[str], where: str) -> dict[str, int]:
    """Map data class names onto checkpoint class indices, case-insensitively."""
    index = {c.upper(): i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if n.upper() not in index})
    if unknown:
        what = "class" if len(unknown) == 1 else "classes"
        verb = "is not one" if len(unknown) == 1 else "are not"
        raise EvalDataError(
            f"{where}: {what} {', '.join(repr(u) for u in unknown)} {verb} of the "
            f"checkpoint's classes ({', '.join(classes)}); the checkpoint and the data "
            "disagree on classes: rename or remove that class, or evaluate a checkpoint "
            "trained on these classes"
        )
    return {n: index[n.upper()] for n in names}


class ClassFolders:
    """``<data>/<CLASS>/*.jpeg`` (any of ``IMAGE_EXTS``) on a local path or any fsspec URI,
    walked by ingest's walker (``cellmodel.data.sources.class_folders``).

    Folder names match the checkpoint's classes case-insensitively; a subset is fine (a
    test split may lack a class); an unknown name is an error; hidden folders are ignored.
    """

    kind = "class_folders"

    def __init__(self, uri: str, classes: Sequence[str]) -> None:
        self.uri = uri
        self.fs, self.path = storage.get_fs(uri)
        if not self.fs.isdir(self.path):
            raise EvalDataError(
                f"data not found: {uri} is not a folder (give a class-folder tree "
                "<data>/<CLASS>/*.jpeg or a shard dataset with manifest.json)"
            )
        folders = class_folders(self.fs, self.path)
        if not folders:
            raise EvalDataError(
                f"{uri} is empty: it holds no class folders; lay the images out as "
                f"<data>/<CLASS>/*.jpeg with CLASS one of {', '.join(classes)}"
            )
        dirs = [f.name for f in folders]
        mapping = _match_classes(dirs, classes, uri)
        self.items: list[tuple[str, str, int]] = []  # (id, path, label)
        for folder in folders:
            for p in folder.images:
                rel = posixpath.relpath(p, folder.path)
                self.items.append((f"{folder.name}/{rel}", p, mapping[folder.name]))
        if not self.items:
            raise EvalDataError(
                f"{uri} is empty: its class folders ({', '.join(dirs)}) hold no images "
                f"({', '.join(IMAGE_EXTS)})"
            )
        self.data_classes = sorted({classes[i] for _, _, i in self.items}, key=classes.index)
        self.has_sources = False

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start : start + batch_size]
            paths = [p for _, p, _ in chunk]
            # One cat call per batch: s3fs fetches the objects concurrently.
            got = self.fs.cat(paths, on_error="return")
            yield Batch(
                ids=[i for i, _, _ in chunk],
                refs=paths,
                labels=np.array([lab for _, _, lab in chunk], dtype=np.int64),
                sources=None,
                images=[got.get(p, FileNotFoundError(p)) for p in paths],
            )

    def fetch(self, refs: Sequence[str]) -> list[bytes]:
        got = self.fs.cat(list(refs), on_error="return")
        return [got[r] if isinstance(got.get(r), bytes) else b"" for r in refs]


class ShardDataset:
    """One split of a Parquet shard dataset (``manifest.json`` + ``<split>/part-*.parquet``).

    Read through the project's one shard reader (``iter_record_batches``) rather than Ray,
    because the report needs the ``id`` and ``source_id`` columns next to each prediction;
    labels are matched by ``label_name`` so a dataset whose class order differs from the
    checkpoint's is still scored right.
    """

    kind = "shards"
    COLUMNS = ("id", "image", "label_name")

    def __init__(self, uri: str, classes: Sequence[str], split: str) -> None:
        from cellmodel.data.dataset import DatasetNotFoundError, open_shard, shard_uris

        self.uri = uri
        self.split = split
        self.manifest = load_manifest(uri)
        try:
            # Only the shards the manifest names: stray files of an interrupted run stay out.
            parts = shard_uris(uri, split, self.manifest)
        except DatasetNotFoundError as e:
            raise EvalDataError(f"{e}; choose one with --split") from e
        if not parts:
            raise EvalDataError(f"{uri}: the {split!r} split has no shards")
        self.parts = parts
        names = set(open_shard(parts[0]).schema_arrow.names)
        missing = [c for c in self.COLUMNS if c not in names]
        if missing:
            raise EvalDataError(
                f"{parts[0]} lacks column(s) {', '.join(missing)} of the shard dataset "
                "contract (id, image, label, label_name, source_id, aug); re-run the ingest"
            )
        self.has_sources = "source_id" in names
        label_names: list[str] = []
        for _, _, d in self._read(["label_name"], 8192):
            label_names += d["label_name"]
        self._n = len(label_names)
        if not self._n:
            raise EvalDataError(f"{uri}: the {split!r} split is empty (0 rows)")
        self.mapping = _match_classes(sorted(set(label_names)), classes, f"{uri} ({split})")
        self.data_classes = sorted({classes[i] for i in self.mapping.values()}, key=classes.index)

    def __len__(self) -> int:
        return self._n

    def _read(self, columns: list[str], batch_rows: int, shards: list[str] | None = None):
        from cellmodel.data.dataset import iter_record_batches

        return iter_record_batches(self.uri, self.split, columns, batch_rows,
                                   shards=shards if shards is not None else self.parts)  # fmt: skip

    def batches(self, batch_size: int) -> Iterator[Batch]:
        cols = list(self.COLUMNS) + (["source_id"] if self.has_sources else [])
        for part, row, d in self._read(cols, batch_size):
            n = len(d["id"])
            yield Batch(
                ids=[str(i) for i in d["id"]],
                refs=[f"{part}#{row + i}" for i in range(n)],
                labels=np.array([self.mapping[x] for x in d["label_name"]], dtype=np.int64),
                sources=[str(s) for s in d["source_id"]] if self.has_sources else None,
                images=[b if b is not None else b"" for b in d["image"]],
            )

    def fetch(self, refs: Sequence[str]) -> list[bytes]:
        out = []
        cache: dict[str, list] = {}
        for r in refs:
            part, row = r.rsplit("#", 1)
            if part not in cache:
                cache[part] = [b for _, _, d in self._read(["image"], 8192, [part])
                               for b in d["image"]]  # fmt: skip
            out.append(cache[part][int(row)] or b"")
        return out


def load_manifest(uri: str) -> dict:
    """The dataset's manifest (``EvalDataError`` when missing, unreadable or too new)."""
    from cellmodel.data.dataset import DatasetNotFoundError
    from cellmodel.data.dataset import load_manifest as _load

    try:
        return _load(uri)
    except DatasetNotFoundError as e:
        raise EvalDataError(str(e)) from e


def open_data(uri: str, classes: Sequence[str], split: str = "val"):
    """A ``ShardDataset`` when ``uri`` holds ``manifest.json`` or Parquet splits, else ``ClassFolders``."""
    fs, path = storage.get_fs(uri)
    if not fs.exists(path):
        raise EvalDataError(f"data not found: {uri} does not exist")
    if fs.exists(posixpath.join(path, "manifest.json")):
        return ShardDataset(uri, classes, split)
    if fs.isdir(path) and fs.glob(posixpath.join(path, "*", "part-*.parquet")):
        raise EvalDataError(
            f"{uri} holds Parquet shards but no manifest.json: the ingest did not finish "
            "(a dataset exists only once its manifest is written); re-run the ingest"
        )
    return ClassFolders(uri, classes)
