"""Ingest into Parquet shards and read back: real S3 server, real Ray, the committed sample."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellmodel import CLASSES, storage
from cellmodel.data import augment
from cellmodel.data.dataset import (
    DatasetNotFoundError,
    iter_rows,
    iter_split,
    load_manifest,
    read_split,
    verify,
)
from cellmodel.data.ingest import DatasetExistsError, IngestError, ingest
from cellmodel.models import model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = model_config("tiny_bilstm")


def _bucket(endpoint: str, name: str) -> str:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def crops_s3(s3_server, sample_dir) -> tuple[str, dict]:
    """The 160-crop sample ingested once to S3, balanced to 40 per class in train, each
    file its own source (``group="file"``: the split may leak, and the ingest says so)."""
    uri = _bucket(s3_server, "ingest-crops") + "/ds"
    with pytest.warns(UserWarning, match="source cells unknown"):
        m = ingest(str(sample_dir / "crops"), uri, target_per_class=40, progress=False,
                   group="file")  # fmt: skip
    return uri, m


@pytest.fixture(scope="module")
def slides_local(sample_dir, tmp_path_factory) -> tuple[str, dict]:
    uri = str(tmp_path_factory.mktemp("slides") / "ds")
    return uri, ingest(str(sample_dir / "slides"), uri, target_per_class=12, progress=False)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.ingest", *args, "--no-progress"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _shard_files(uri: str) -> list[str]:
    fs, root = storage.get_fs(uri)
    fs.invalidate_cache()  # another process (the CLI) changed the bucket
    return sorted(p for p in fs.find(root) if p.endswith(".parquet"))


def test_s3_ingest_read_back_through_ray(crops_s3, ray_session):
    uri, m = crops_s3
    assert load_manifest(uri) == m
    assert m["source"]["source_known"] is False and m["warnings"]
    # Checksums and row counts recomputed from the stored objects, independently of verify().
    fs, _ = storage.get_fs(uri)
    for info in m["splits"].values():
        for s in info["shards"]:
            data = fs.cat_file(storage.get_fs(storage.join(uri, s["path"]))[1])
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
            assert len(data) == s["bytes"]
    assert verify(uri) == []

    assert m["splits"]["train"]["counts"] == {c: 40 for c in CLASSES}
    assert sum(m["splits"]["val"]["originals"].values()) == 32  # 20% of 160 files
    for split, info in m["splits"].items():
        rows = read_split(uri, split).take_all()
        assert len(rows) == info["rows"]
        assert dict(Counter(r["label_name"] for r in rows)) == {
            c: n for c, n in info["counts"].items() if n
        }
        assert all(r["label"] == CLASSES.index(r["label_name"]) for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
        assert Image.open(io.BytesIO(rows[0]["image"])).size == (320, 240)
    train_src = {r["source_id"] for r in iter_rows(uri, "train", ["source_id"])}
    val_src = {r["source_id"] for r in iter_rows(uri, "val", ["source_id"])}
    assert not train_src & val_src

    ds = read_split(uri, "val", TINY)
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    assert batch["x"].shape == (8, 3, 120, 160) and batch["x"].dtype == np.float32
    assert batch["label"].dtype == np.int64
    assert np.isfinite(batch["x"]).all() and batch["x"].std() > 0.1


def test_iter_split_without_ray(crops_s3):
    uri, m = crops_s3
    seen = [y for _, y in iter_split(uri, "val", TINY, batch_size=10)]
    assert [len(y) for y in seen] == [10, 10, 10, 2]
    y_all = np.concatenate(seen)
    assert Counter(y_all.tolist()) == {
        CLASSES.index(c): n for c, n in m["splits"]["val"]["counts"].items()
    }
    a = np.concatenate([y for _, y in iter_split(uri, "val", TINY, shuffle=True, seed=1)])
    b = np.concatenate([y for _, y in iter_split(uri, "val", TINY, shuffle=True, seed=1)])
    assert (a == b).all() and sorted(a) == sorted(y_all) and (a != y_all).any()
    with pytest.raises(DatasetNotFoundError, match="no split 'test'"):
        next(iter_split(uri, "test", TINY))


def test_slides_split_by_slide_and_bad_slides_reported(slides_local):
    uri, m = slides_local
    assert m["source"] == {**m["source"], "layout": "slides", "source_known": True}
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert reasons == {
        "BloodImage_00008": "class_too_rare",  # BASOPHIL, one slide
        "BloodImage_00117": "unlabelled",
        "BloodImage_00133": "no_wbc_box",
    }
    assert any("BloodImage_00113" in n and "largest" in n for n in m["notes"])
    by_split = {s: {r["source_id"] for r in iter_rows(uri, s, ["source_id"])} for s in m["splits"]}
    assert not by_split["train"] & by_split["val"]
    assert len(by_split["train"] | by_split["val"]) == 21
    assert m["splits"]["train"]["counts"] == {c: 12 for c in CLASSES}
    # Held-out rows are the original cells only; train copies are rotations or flips.
    augs = [json.loads(r["aug"]) for r in iter_rows(uri, "val", ["aug"])]
    assert all(a == {"angle": 0.0, "flip": False} for a in augs)
    train = list(iter_rows(uri, "train", ["aug", "image"]))
    assert sum(json.loads(r["aug"]) != {"angle": 0.0, "flip": False} for r in train) == 48 - 17
    assert {Image.open(io.BytesIO(r["image"])).size for r in train} == {(320, 240)}


def test_same_seed_same_bytes(slides_local, sample_dir, tmp_path):
    uri, m = slides_local
    again = ingest(
        str(sample_dir / "slides"), str(tmp_path / "a"), target_per_class=12, progress=False
    )
    other = ingest(
        str(sample_dir / "slides"), str(tmp_path / "b"), target_per_class=12, seed=1, progress=False
    )

    def digests(man):
        return [s["sha256"] for v in man["splits"].values() for s in v["shards"]]

    assert digests(again) == digests(m)
    assert digests(other) != digests(m)


def test_folds_hold_out_every_cell_once(slides_local, sample_dir, tmp_path):
    """K ingests with folds=K score each source cell in exactly one val split, never in its
    own train split; fold 0 of 5 is the default 0.2 split, byte for byte."""
    src = str(sample_dir / "slides")
    vals, manifests = [], []
    for k in range(3):
        uri = str(tmp_path / f"f{k}")
        m = ingest(src, uri, target_per_class=4, folds=3, fold=k, progress=False)
        train = {r["source_id"] for r in iter_rows(uri, "train", ["source_id"])}
        val = {r["source_id"] for r in iter_rows(uri, "val", ["source_id"])}
        assert val and not train & val and len(train | val) == 21
        assert m["params"]["folds"] == 3 and m["params"]["fold"] == k
        assert m["params"]["val_fraction"] == pytest.approx(1 / 3)
        vals.append(val)
        manifests.append(m)
    assert sum(len(v) for v in vals) == len(set().union(*vals)) == 21
    # Each class's cells are spread over the folds, not dealt out class by class.
    for m in manifests:
        assert sum(n > 0 for n in m["splits"]["val"]["sources"].values()) >= 3
    five = ingest(src, str(tmp_path / "five"), target_per_class=12, folds=5, fold=0, progress=False)
    digests = [s["sha256"] for v in five["splits"].values() for s in v["shards"]]
    _, default = slides_local
    assert digests == [s["sha256"] for v in default["splits"].values() for s in v["shards"]]
    for bad, match in (
        ({"folds": 1}, "folds K >= 2"),
        ({"folds": 3, "fold": 3}, "from 0 to K-1"),
        ({"folds": 3, "test_fraction": 0.1}, "test_fraction to 0"),
    ):
        with pytest.raises(ValueError, match=match):
            ingest(src, str(tmp_path / "bad"), progress=False, **bad)
    assert not (tmp_path / "bad").exists()
    r = _cli("--source", src, "--out", str(tmp_path / "cli"), "--folds", "4", "--fold", "4")
    assert r.returncode == 2 and r.stderr.startswith("error: folds=4, fold=4")


def test_bad_files_skipped_and_reported(sample_dir, tmp_path, s3_bucket):
    src = tmp_path / "crops"
    for cls in CLASSES:
        (src / cls).mkdir(parents=True)
        for f in sorted((sample_dir / "crops" / cls).iterdir())[:4]:
            shutil.copy(f, src / cls / f.name)
    good = (src / "EOSINOPHIL" / sorted(os.listdir(src / "EOSINOPHIL"))[0]).read_bytes()
    (src / "EOSINOPHIL" / "_9_truncated.jpeg").write_bytes(good[: len(good) // 3])
    (src / "LYMPHOCYTE" / "_9_empty.jpeg").write_bytes(b"")
    (src / "MONOCYTE" / "_9_text.jpeg").write_bytes(b"not an image at all")
    (src / "BASOPHIL").mkdir()
    (src / "BASOPHIL" / "x.jpeg").write_bytes(good)
    with pytest.warns(UserWarning):
        m = ingest(str(src), s3_bucket + "/ds", val_fraction=0.25, progress=False, group="file",
                   min_sources_per_class=2)  # fmt: skip
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert reasons == {
        "EOSINOPHIL/_9_truncated.jpeg": "truncated",
        "LYMPHOCYTE/_9_empty.jpeg": "empty",
        "MONOCYTE/_9_text.jpeg": "not_an_image",
        "BASOPHIL/x.jpeg": "class_too_rare",  # a class folder of one cell
    }
    ids = {r["id"] for s in m["splits"] for r in iter_rows(s3_bucket + "/ds", s, ["id"])}
    assert not any("_9_" in i for i in ids)
    assert sum(m["splits"]["train"]["originals"].values()) == 12

    # Nothing valid left: a clear error, and no dataset.
    bad = tmp_path / "bad" / "NEUTROPHIL"
    bad.mkdir(parents=True)
    (bad / "a.jpeg").write_bytes(b"garbage")
    (tmp_path / "bad" / "MONOCYTE").mkdir()
    with pytest.raises(IngestError, match="nothing valid"):
        ingest(str(tmp_path / "bad"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DatasetNotFoundError):
        load_manifest(str(tmp_path / "out"))


def test_one_class_folder_walker_for_ingest_and_evaluation(tmp_path):
    from cellmodel.data.sources import class_folders, crop_folder
    from cellmodel.evaluate.data import ClassFolders

    for rel in ("B/x.png", "B/nested/y.JPG", "B/notes.txt", "a/z.jpeg", ".cache/w.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "stray.jpeg").write_bytes(b"")
    fs, root = storage.get_fs(str(tmp_path))
    found = {f.name: ([Path(p).name for p in f.images], [Path(p).name for p in f.others])
             for f in class_folders(fs, root)}  # fmt: skip
    # Sorted by path (B/nested/ before B/x.png); hidden folders and loose files ignored.
    assert found == {"B": (["y.JPG", "x.png"], ["notes.txt"]), "a": (["z.jpeg"], [])}
    src = crop_folder(str(tmp_path))
    assert [k for k, _ in src.tasks] == ["B/nested/y.JPG", "B/x.png", "a/z.jpeg"]
    assert [(s.item, s.reason) for s in src.skipped] == [("B/notes.txt", "not_an_image_file")]
    ev = ClassFolders(str(tmp_path), ["A", "B"])
    assert [i for i, _, _ in ev.items] == ["B/nested/y.JPG", "B/x.png", "a/z.jpeg"]


def test_bad_slide_files_skipped(sample_dir, tmp_path):
    src = tmp_path / "slides"
    shutil.copytree(sample_dir / "slides", src)
    (src / "Annotations" / "BloodImage_00021.xml").write_text("<annotation><object>")
    (src / "Annotations" / "BloodImage_00032.xml").unlink()
    xml = (src / "Annotations" / "BloodImage_00038.xml").read_text()
    (src / "Annotations" / "BloodImage_00038.xml").write_text(
        xml.replace("<xmin>", "<xmin>9").replace("<xmax>", "<xmax>9")  # boxes far right
    )
    jpg = src / "JPEGImages" / "BloodImage_00045.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])
    (src / "JPEGImages" / "BloodImage_00107.jpg").unlink()
    m = ingest(str(src), str(tmp_path / "ds"), progress=False, min_sources_per_class=2)
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    expected = {
        21: "malformed_annotation",
        32: "missing_annotation",
        38: "box_outside_image",
        45: "truncated",
        107: "missing_image",
    }
    assert {f"BloodImage_{n:05d}": r for n, r in expected.items()}.items() <= reasons.items()
    assert m["source"]["cells"] == 21 - len(expected)


def test_crops_grouped_without_slides_say_how_to_split_by_slide(sample_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"pass --slides DIR"):
        m = ingest(str(sample_dir / "crops"), str(tmp_path / "ds"), target_per_class=8,
                   progress=False, workers=1)  # fmt: skip
    assert any("near-duplicate" in w for w in m["warnings"])
    assert m["source"]["source_known"] is True  # grouped, with the caveat above


def test_killed_mid_write_leaves_no_dataset(sample_dir, s3_bucket):
    out = s3_bucket + "/ds"
    args = ["--source", str(sample_dir / "crops"), "--out", out, "--target-per-class", "40"]
    r = _cli(*args, "--shard-rows", "32", "--kill-after-shards", "2")
    assert r.returncode == -9, r.stderr
    assert len(_shard_files(out)) == 2  # shards were written, but no manifest
    with pytest.raises(DatasetNotFoundError, match="manifest.json is missing"):
        load_manifest(out)
    with pytest.raises(DatasetNotFoundError):
        read_split(out, "train")
    with pytest.raises(DatasetNotFoundError):
        next(iter_split(out, "train", TINY))
    # A fresh run needs no --overwrite (there is no dataset) and sweeps the stale shards.
    r = _cli(*args, "--shard-rows", "100")
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    fs, root = storage.get_fs(out)
    named = sorted(f"{root}/{s['path']}" for v in m["splits"].values() for s in v["shards"])
    assert _shard_files(out) == named and verify(out) == []


def test_overwrite_semantics(sample_dir, s3_bucket):
    out = s3_bucket + "/ds"
    args = ["--source", str(sample_dir / "slides"), "--out", out, "--target-per-class", "8"]
    assert _cli(*args, "--shard-rows", "5").returncode == 0
    before = load_manifest(out)
    r = _cli(*args)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert load_manifest(out) == before and verify(out) == []
    with pytest.raises(DatasetExistsError):
        ingest(str(sample_dir / "slides"), out, progress=False)

    r = _cli(*args, "--shard-rows", "1000", "--overwrite")
    assert r.returncode == 0, r.stderr
    after = load_manifest(out)
    assert after["created"] >= before["created"]
    assert [len(v["shards"]) for v in after["splits"].values()] == [1, 1]
    assert len(_shard_files(out)) == 2 and verify(out) == []


def test_cli_user_errors_are_one_line(tmp_path, sample_dir):
    r = _cli("--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error: source") and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("--source", str(sample_dir / "slides"), "--out", str(blocker / "ds"))
    assert (
        r.returncode == 2 and r.stderr.startswith("error: cannot") and "Traceback" not in r.stderr
    )


def test_rotation_fills_corners_and_balancing_never_drops(sample_dir):
    path = sorted((sample_dir / "crops" / "MONOCYTE").iterdir())[0]
    img = Image.open(path).convert("RGB")
    assert augment.apply(img, augment.IDENTITY) is img
    rot = np.asarray(augment.apply(img, augment.Aug(45.0)), dtype=np.float32)
    assert rot.shape == (240, 320, 3)
    # Smear background is bright; black corners (the usual rotate fill) would be ~0.
    corners = [rot[:8, :8], rot[:8, -8:], rot[-8:, :8], rot[-8:, -8:]]
    assert min(c.mean() for c in corners) > 0.5 * np.asarray(img, dtype=np.float32).mean()
    flipped = augment.apply(img, augment.Aug(0.0, flip=True))
    assert np.array_equal(np.asarray(flipped)[:, ::-1], np.asarray(img))

    rng = np.random.default_rng(0)
    choices = augment.variants((0, 90, 180, 270), flips=True)
    assert len(choices) == 7
    plans = augment.plan_copies(5, 23, choices, rng)
    assert sum(map(len, plans)) == 23 and all(p[0] == augment.IDENTITY for p in plans)
    assert sorted(map(len, plans)) == [4, 4, 5, 5, 5]
    assert all(len(set(p)) == len(p) for p in plans)  # distinct copies while choices last
    assert sum(map(len, augment.plan_copies(9, 4, choices, rng))) == 9  # above target: keep all
    with pytest.raises(ValueError, match="no augmentation"):
        augment.plan_copies(2, 5, augment.variants((0,), flips=False), rng)
