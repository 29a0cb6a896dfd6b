"""Ingest cells into rotation-augmented, class-balanced Parquet shards plus a manifest.

``ingest(source, out)`` reads a crop folder or BCCD slides (see ``sources``), splits by
source (a slide, or a file when the source cell is unknown) so that copies of one cell
never land in two splits, balances the classes of each augmented split by rotating
minority cells more (never dropping a cell), and writes ``<out>/<split>/part-NNNNN.parquet``
followed by ``<out>/manifest.json``. The dataset is one unit of the commit protocol
(``cellmodel.commit``): the manifest is its marker, written last and removed first on
``overwrite``, so a reader sees either a whole dataset or none.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field
from tqdm.auto import tqdm

import cellmodel
from cellmodel import commit, storage
from cellmodel.config import Section, validate_settings
from cellmodel.data import augment, sources
from cellmodel.data.augment import DEFAULT_ANGLES, Aug
from cellmodel.data.dataset import (
    MANIFEST,
    SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
)
from cellmodel.data.transforms import decode_image
from cellmodel.data.voc import CROP_SIZE


def _shard_paths(manifest: dict) -> list[str]:
    return [s["path"] for v in manifest.get("splits", {}).values() for s in v["shards"]]


# A dataset is one unit: the shards of every split, committed by the manifest.
DATASET = commit.Layout(
    markers=MANIFEST, data=tuple(f"{s}/part-*.parquet" for s in SPLITS), files=_shard_paths
)


class IngestSettings(Section):
    """Everything an ingest takes besides where from and where to (``jobs.ingest`` flags)."""

    layout: Literal["auto", "crops", "slides"] = "auto"
    classes: list[str] = Field(default_factory=list)  # empty: every class the source has
    min_sources_per_class: int = Field(5, ge=1)  # rarer classes are skipped (class_too_rare)
    crop_size: tuple[int, int] = CROP_SIZE  # (width, height) of the window cut around a cell
    scale: float = Field(1.0, gt=0, le=4)  # stored crops are the window resized by this
    # How crops of a crop folder are traced to their source cell: "auto" groups augmented
    # copies (near_duplicate), or matches them to the slides they were cut from when
    # ``slides`` is given; "file" makes every file its own source (may leak).
    group: Literal["auto", "file", "near_duplicate", "slides"] = "auto"
    slides: str = ""  # VOC slide folder (JPEGImages, Annotations, labels.csv) for group=slides
    # Crops the grouping could not place: "holdout" keeps them in a split of their own
    # ("unassigned": neither trained on nor scored, since each may copy a cell of either
    # side); "own_source" makes each its own source (split like the rest: may leak).
    unassigned: Literal["holdout", "own_source"] = "holdout"
    target_per_class: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    # K-fold cross-validation over source cells: ``folds`` = K cuts each class's shuffled
    # sources into K near-equal parts and part ``fold`` (0 to K-1) is val, the rest train
    # (``val_fraction`` is then 1/K). The same seed gives the same K parts for every fold, so
    # K ingests with fold 0..K-1 score every cell exactly once; fold 0 of 5 is the default
    # val_fraction 0.2 split. 0: off.
    folds: int = Field(0, ge=0)
    fold: int = Field(0, ge=0)
    seed: int = 0
    angles: tuple[float, ...] = DEFAULT_ANGLES
    flips: bool = True
    augment_val: bool = False
    shard_rows: int = Field(2048, ge=1)
    row_group_rows: int = Field(256, ge=1)
    overwrite: bool = False
    progress: bool = True
    workers: int = Field(4, ge=1)


class IngestError(RuntimeError):
    """A user-facing ingest failure (bad destination, nothing valid to ingest, ...)."""


class DatasetExistsError(IngestError):
    """The destination already holds a dataset and ``overwrite`` was not given."""


def _split_sources(
    by_class: dict[str, set[str]],
    fractions: dict[str, float],
    rng: np.random.Generator,
    classes: list[str],
    folds: tuple[int, int] | None = None,
) -> dict[str, str]:
    """``{source_id: split}``: per class, a seeded shuffle of its sources cut by fraction.

    Each held-out split gets at least one source of a class when that class has enough
    sources to leave one for training. ``folds`` = (K, k): the shuffle is cut into K parts
    at ``round(i * n / K)`` instead, and part k is val.
    """
    out = {}
    for cls in classes:
        ids = sorted(by_class.get(cls, []))
        ids = [ids[i] for i in rng.permutation(len(ids))]
        if folds is not None:
            k_parts, k = folds
            lo, hi = (int(round(i * len(ids) / k_parts)) for i in (k, k + 1))
            out.update({s: "val" if lo <= j < hi else "train" for j, s in enumerate(ids)})
            continue
        start = 0
        for split in ("val", "test"):
            frac = fractions.get(split, 0.0)
            n = int(round(frac * len(ids)))
            if frac > 0 and n == 0 and len(ids) - start >= 2:
                n = 1
            n = min(n, max(len(ids) - start - 1, 0))
            for s in ids[start : start + n]:
                out[s] = split
            start += n
        for s in ids[start:]:
            out[s] = "train"
    return out


def _render(item: sources.Item, aug: Aug) -> bytes:
    if aug.identity:
        return item.image  # the original bytes, never re-encoded
    return augment.encode_jpeg(augment.apply(decode_image(item.image), aug))


def _clear_destination(out: str) -> None:
    """Make ``out`` hold no dataset: the old manifest goes first (on object stores the
    dataset vanishes for readers at once), then every shard, old or stray."""
    commit.retract(out, MANIFEST)
    commit.remove_uncommitted(out, DATASET, markers=[])


def _probe_destination(out: str) -> None:
    """Fail before any work when ``out`` cannot be written."""
    probe = storage.join(out, ".write-test")
    try:
        storage.write_bytes(probe, b"")
        fs, path = storage.get_fs(probe)
        fs.rm(path)
    except Exception as e:  # any client error (permissions, credentials, no bucket) here
        raise IngestError(f"cannot write to destination {out}: {type(e).__name__}: {e}") from e


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _shard_bytes(rows: list[dict], row_group_rows: int) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    # JPEG bytes do not compress; the small columns do.
    compression = {c: ("NONE" if c == "image" else "SNAPPY") for c in SCHEMA.names}
    pq.write_table(table, sink, row_group_size=row_group_rows, compression=compression)
    return sink.getvalue().to_pybytes()


Row = tuple[int, int, Aug]  # (item index, copy number, augmentation); copy 0 is the cell


def _plan_split(
    split: str,
    groups: dict[str, list[int]],
    target: int | None,
    choices: list[Aug],
    rng: np.random.Generator,
    notes: list[str],
    warn: list[str],
    classes: list[str],
) -> list[Row]:
    """The rows of one split in a seeded random order (so every shard mixes classes and
    sources); with a ``target``, each class is topped up to it by augmented copies."""
    plan: list[Row] = []
    for cls in classes:
        idx = groups.get(cls, [])
        if not idx:
            warn.append(f"split {split!r} has no {cls} cells")
            continue
        if target is not None and len(idx) > target:
            notes.append(f"{split}: {cls} has {len(idx)} cells, above target {target}; kept all")
        copies = augment.plan_copies(len(idx), target or 0, choices, rng)
        for i, augs in zip(idx, copies):
            plan += [(i, k, a) for k, a in enumerate(augs)]
    return [plan[j] for j in rng.permutation(len(plan))]


class _ShardWriter:
    """Renders rows (in a thread pool: decode, rotate, encode) and writes numbered shards
    as data files of the dataset's commit ``unit``."""

    def __init__(self, unit: commit.Unit, items, shard_rows, row_group_rows, workers,
                 classes) -> None:  # fmt: skip
        self.unit, self.items, self.classes = unit, items, classes
        self.shard_rows, self.row_group_rows = shard_rows, row_group_rows
        self.pool = ThreadPoolExecutor(max(1, workers))

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def _row(self, row: Row, image: bytes) -> dict:
        i, k, aug = row
        it = self.items[i]
        return {
            "id": f"{it.key}#{k}",
            "image": image,
            "label": self.classes.index(it.label_name),
            "label_name": it.label_name,
            "source_id": it.source_id,
            "aug": json.dumps(aug.to_dict()),
        }

    def write_split(self, split: str, plan: list[Row], bar) -> list[dict]:
        shards = []
        for n, start in enumerate(range(0, len(plan), self.shard_rows)):
            chunk = plan[start : start + self.shard_rows]
            images = []
            for image in self.pool.map(lambda r: _render(self.items[r[0]], r[2]), chunk):
                images.append(image)
                bar.update(1)
            data = _shard_bytes(
                [self._row(r, im) for r, im in zip(chunk, images)], self.row_group_rows
            )
            rel = f"{split}/part-{n:05d}.parquet"
            digest = hashlib.sha256(data).hexdigest()
            shards.append({"path": rel, "rows": len(chunk), "bytes": len(data), "sha256": digest})
            self.unit.write(rel, data)
        return shards


def ingest(
    source: str,
    out: str,
    settings: IngestSettings | None = None,
    *,
    kill_after_shards: int = 0,
    **kwargs,
) -> dict:
    """Ingest ``source`` (crop folder or slides, local or fsspec URI) into ``out``; returns
    the manifest. Settings come as an ``IngestSettings`` or as its fields by keyword.

    ``target_per_class``: rows per class in train (default: the largest class's count of
    cells), reached by rotated/flipped copies; classes above it keep all their cells.
    Held-out splits (``val_fraction``, ``test_fraction`` of each class's sources) hold the
    original cells only, unless ``augment_val`` balances them too. Same inputs and seed give
    the same shards, byte for byte. ``kill_after_shards`` (tests): SIGKILL this process
    after that many shards, to check that a killed run leaves no visible dataset.
    """
    if settings is None:
        settings = validate_settings(IngestSettings, kwargs)
    elif kwargs:
        settings = settings.model_copy(update=kwargs)
    st = settings
    if st.val_fraction + st.test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) with a sum below 1")
    if st.folds == 1 or (st.folds and not st.fold < st.folds):
        raise ValueError(
            f"folds={st.folds}, fold={st.fold}: give folds K >= 2 and a fold from 0 to K-1 "
            "(folds=0 turns cross-validation off)"
        )
    if st.folds and st.test_fraction:
        raise ValueError(
            "folds cut every source into train and val; set test_fraction to 0 (hold a test "
            "split out of the source before cross-validating on the rest)"
        )
    if st.folds:
        st = st.model_copy(update={"val_fraction": 1 / st.folds})
    layout, target_per_class, seed, workers, progress = (
        st.layout, st.target_per_class, st.seed, st.workers, st.progress)  # fmt: skip
    val_fraction, test_fraction, angles, flips = (
        st.val_fraction, st.test_fraction, st.angles, st.flips)  # fmt: skip
    augment_val, shard_rows, row_group_rows, overwrite = (
        st.augment_val, st.shard_rows, st.row_group_rows, st.overwrite)  # fmt: skip
    src = sources.open_source(source, layout, st.classes or None, st.crop_size, st.scale)
    _check_destination(out, overwrite)
    _probe_destination(out)

    items: list[sources.Item] = []
    skipped = list(src.skipped)
    for r in tqdm(
        src.load(workers), total=len(src.tasks), desc="read cells", unit="img", disable=not progress
    ):
        (items if isinstance(r, sources.Item) else skipped).append(r)
    skip_counts = dict(sorted(Counter(s.reason for s in skipped).items()))
    if not items:
        raise IngestError(
            f"nothing valid to ingest from {source} ({len(skipped)} skipped: {skip_counts}); "
            "check the source layout (class folders of crops, or JPEGImages/Annotations/"
            "labels.csv) and the files"
        )

    warn = []
    grouping = None
    lost: set[str] = set()  # source ids of crops the grouping could not place
    if src.layout == "crops" and st.group != "file":
        grouping = _group(items, st, warn, lost)
        if grouping is not None:
            src.source_known, src.grouping = True, grouping["method"]
    classes = _keep_common_classes(items, skipped, st, src.classes, warn)
    skip_counts = dict(sorted(Counter(s.reason for s in skipped).items()))
    if not src.source_known:
        warn.append(
            "source cells unknown (crop-folder layout): each file is its own source, but the "
            "files of a crop folder may be augmented copies of one cell (blood-cells TRAIN "
            "is), so copies can land in both train and val and validation scores are "
            "optimistic; ingest from slides for a leak-free split"
        )
    rng = np.random.default_rng(seed)
    by_class: dict[str, set[str]] = defaultdict(set)
    for it in items:
        if not (st.unassigned == "holdout" and it.source_id in lost):
            by_class[it.label_name].add(it.source_id)
    for cls in classes:
        if len(by_class[cls]) == 1 and (val_fraction or test_fraction):
            warn.append(f"class {cls} has a single source cell: all of it goes to train, so it "
                        "is not validated; add cells of other slides to validate it")  # fmt: skip
    split_of = _split_sources(
        by_class, {"val": val_fraction, "test": test_fraction}, rng, classes,
        (st.folds, st.fold) if st.folds else None,
    )  # fmt: skip
    if st.unassigned == "holdout":
        split_of.update({sid: "unassigned" for sid in lost})
    per_split: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, it in enumerate(items):
        per_split[split_of[it.source_id]][it.label_name].append(i)
    notes = sorted(src.notes)
    plans, targets = {}, {}
    for split in [s for s in SPLITS if s in per_split]:
        target = None
        if split == "train" or augment_val:
            target = max(len(v) for v in per_split[split].values())
            target = target_per_class if split == "train" and target_per_class else target
        targets[split] = target
        plans[split] = _plan_split(
            split, per_split[split], target, augment.variants(angles, flips), rng, notes, warn,
            classes,
        )  # fmt: skip
    for w in warn:
        warnings.warn(w, stacklevel=2)

    _clear_destination(out)
    fault = commit.Fault(kill_after_shards, "kill") if kill_after_shards else None
    unit = commit.Unit(out, DATASET, MANIFEST, fault=fault)
    writer = _ShardWriter(unit, items, shard_rows, row_group_rows, workers, classes)
    bar = tqdm(
        total=sum(map(len, plans.values())), desc="write shards", unit="img", disable=not progress
    )
    split_info = {}
    with writer:
        for split, plan in plans.items():
            shards = writer.write_split(split, plan, bar)
            counts = Counter(items[i].label_name for i, _, _ in plan)
            originals = Counter(items[i].label_name for i, k, _ in plan if k == 0)
            sources_n = {c: len({items[i].source_id for i in per_split[split][c]}) for c in classes}
            split_info[split] = {
                "rows": len(plan),
                "counts": {c: counts.get(c, 0) for c in classes},
                "originals": {c: originals.get(c, 0) for c in classes},
                "sources": sources_n,
                "target_per_class": targets[split],
                "shards": shards,
            }
    bar.close()

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": "cellmodel-parquet-shards",
        "created": _now(),
        "cellmodel_version": cellmodel.__version__,
        "classes": list(classes),
        "geometry": _geometry(items, st),
        "light": _light(items),
        "columns": {f.name: str(f.type) for f in SCHEMA},
        "source": {
            "uri": str(source),
            "layout": src.layout,
            "source_known": src.source_known,
            "source_unit": src.grouping,
            "cells": len(items),
            "grouping": grouping,
        },
        "params": {
            "classes_asked": list(st.classes),
            "min_sources_per_class": st.min_sources_per_class,
            "group": st.group,
            "slides": st.slides,
            "seed": seed,
            "target_per_class": target_per_class,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "folds": st.folds,
            "fold": st.fold,
            "angles": [float(a) for a in angles],
            "flips": flips,
            "fill": "reflect",
            "augment_val": augment_val,
            "shard_rows": shard_rows,
            "row_group_rows": row_group_rows,
        },
        "splits": split_info,
        "skipped": [s.to_dict() for s in skipped],
        "skipped_counts": skip_counts,
        "notes": notes,
        "warnings": warn,
    }
    return unit.commit(manifest)


def _group(items: list, st: IngestSettings, warn: list[str], lost: set[str]) -> dict | None:
    """Trace each crop to its source cell (in place: ``item.source_id``); returns the report.

    Rows no method could place keep their own file as source (reported, never merged)."""
    try:
        from cellmodel.data import grouping as g
    except ImportError:  # pragma: no cover - a build without the grouping module
        warn.append("source grouping is not available in this build; each file is its source")
        return None
    from cellmodel.data.transforms import decode_image

    method = st.group
    if method == "auto":
        method = "slides" if st.slides else "near_duplicate"
        if method == "near_duplicate":
            warn.append(
                "crops grouped into source cells by near-duplicate images: the copies of one "
                "cell that look too different (rotations, other shots) can land in separate "
                "sources, and so on both sides of the split. If you have the slides the crops "
                "were cut from, pass --slides DIR (VOC layout) for a split by slide."
            )
    if method == "slides" and not st.slides:
        raise IngestError("group=slides needs the slide folder: pass --slides DIR (VOC layout)")
    labels = [it.label_name for it in items]

    def images(i: int):  # decoded on demand: the grouping keeps only a small copy of each
        img = decode_image(items[i].image)
        # Matching compares crops with slide windows at the source's own scale: undo --scale.
        if st.scale != 1 and img.size != tuple(st.crop_size):
            img = img.resize(tuple(st.crop_size), Image.BILINEAR)
        return img

    if method == "slides":
        result = g.match_to_slides(images, labels, st.slides)
    else:
        result = g.group_crops(images, labels)
    unassigned = 0
    for it, sid in zip(items, result.source_id):
        if sid is None:
            unassigned += 1  # its own source: the file
            lost.add(it.source_id)
        else:
            it.source_id = str(sid)  # "CLASS/g<k>" groups, or slide ids
    if unassigned:
        where = ("kept in the 'unassigned' split, out of train and val" if st.unassigned == "holdout"
                 else "each is its own source, so copies of one cell may sit in train and val")  # fmt: skip
        warn.append(f"{unassigned} crop(s) matched no group ({method}): {where} (see manifest "
                    "source.grouping)")  # fmt: skip
    return {"method": method, "unassigned": unassigned, **result.report()}


def _keep_common_classes(items, skipped, st: IngestSettings, found: list[str], warn) -> list[str]:
    """The classes with at least ``min_sources_per_class`` sources; rarer ones are skipped
    (their items move to ``skipped`` as ``class_too_rare``), never silently merged."""
    n_sources: dict[str, set] = defaultdict(set)
    for it in items:
        n_sources[it.label_name].add(it.source_id)
    keep = sorted(c for c in n_sources if len(n_sources[c]) >= st.min_sources_per_class)
    rare = sorted(set(n_sources) - set(keep))
    for cls in rare:
        gone = [it for it in items if it.label_name == cls]
        for it in gone:
            skipped.append(sources.Skip(it.key, "class_too_rare", f"{cls}: {len(n_sources[cls])} "
                           f"source(s) < min_sources_per_class {st.min_sources_per_class}"))  # fmt: skip
        warn.append(f"class {cls} skipped: {len(n_sources[cls])} source cell(s), fewer than "
                    f"min_sources_per_class={st.min_sources_per_class}; lower it to train on it")  # fmt: skip
    items[:] = [it for it in items if it.label_name in keep]
    if not items:
        raise IngestError(f"no class has {st.min_sources_per_class} or more source cells "
                          f"(found {dict((c, len(v)) for c, v in n_sources.items())}); lower "
                          "--min-sources-per-class")  # fmt: skip
    return keep


def _geometry(items: list, st: IngestSettings) -> dict:
    """Crop size and, when it can be estimated, the pixel scale (median red-cell diameter)."""
    geo: dict = {
        "crop_size": list(sources.stored_size(st.crop_size, st.scale)),
        "window": list(st.crop_size),
        "scale": st.scale,
    }
    try:
        from cellmodel.data.scale import estimate_rbc_diameter
    except ImportError:
        return geo
    from cellmodel.data.transforms import decode_image

    step = max(1, len(items) // 48)
    got = [estimate_rbc_diameter(decode_image(it.image)) for it in items[::step][:48]]
    got = [float(d) for d in got if d]
    if got:
        geo["rbc_diameter_px"] = round(float(np.median(got)), 2)
        geo["rbc_diameter_images"] = len(got)
    return geo


def _light(items: list) -> dict:
    """The background level of the crops (``cellmodel.data.light``): the slide job shifts
    each slide's windows to it."""
    from cellmodel.data.light import estimate_dataset_background
    from cellmodel.data.transforms import decode_image

    step = max(1, len(items) // 64)
    return estimate_dataset_background([decode_image(it.image) for it in items[::step][:64]])


def _check_destination(out: str, overwrite: bool) -> None:
    """Fail early, before any work, when ``out`` holds a dataset and no ``overwrite``."""
    fs, root = storage.get_fs(out)
    try:
        exists = fs.exists(posixpath.join(root, MANIFEST))
    except Exception as e:  # credentials, unreachable endpoint...: one line for the user
        raise IngestError(f"cannot access destination {out}: {type(e).__name__}: {e}") from e
    if exists and not overwrite:
        raise DatasetExistsError(
            f"{out} already holds a dataset ({MANIFEST} exists); pass --overwrite "
            "(overwrite=True) to replace it, or choose another --out"
        )
