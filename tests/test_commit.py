"""The commit protocol (cellmodel.commit) on local disk and on a real S3 server (moto)."""

from __future__ import annotations

import json

import pytest

from cellmodel import commit, storage

# Parts in the slide job's style: two data files per unit, markers in a folder.
PARTS = commit.Layout(
    markers="_committed/*.json",
    data=("cells/*", "slides/*"),
    files=lambda m: [f"cells/{m['part']}.parquet", f"slides/{m['part']}.parquet"],
)
# A dataset in ingest's style: one unit, its marker is the manifest naming the shards.
DATASET = commit.Layout(
    markers="manifest.json", data=("train/part-*.parquet",), files=lambda m: m["shards"]
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def write_part(root: str, name: str, fault: commit.Fault | None = None) -> dict:
    unit = commit.Unit(root, PARTS, f"_committed/{name}.json", fault=fault)
    unit.write(f"cells/{name}.parquet", f"cells of {name}".encode())
    unit.write(f"slides/{name}.parquet", f"slides of {name}".encode())
    return unit.commit({"part": name})


def files(root: str) -> list[str]:
    fs, base = storage.get_fs(root)
    fs.invalidate_cache()
    return sorted(p[len(base.rstrip("/")) + 1 :] for p in fs.find(base))


def test_commit_writes_data_then_marker(root):
    assert commit.committed(root, PARTS) == []  # nothing there yet
    assert write_part(root, "a") == {"part": "a"}
    write_part(root, "b")
    assert commit.committed(root, PARTS) == [{"part": "a"}, {"part": "b"}]
    assert files(root) == [
        "_committed/a.json", "_committed/b.json", "cells/a.parquet", "cells/b.parquet",
        "slides/a.parquet", "slides/b.parquet",
    ]  # fmt: skip
    assert storage.read_bytes(storage.join(root, "cells/b.parquet")) == b"cells of b"
    assert commit.remove_uncommitted(root, PARTS) == []  # every file is committed


@pytest.mark.parametrize("after", [1, 2])
def test_crash_before_marker_is_invisible_and_swept(root, after):
    write_part(root, "a")
    with pytest.raises(commit.InjectedFault):
        write_part(root, "b", fault=commit.Fault(after_files=after))
    # Readers see the committed unit only; the crashed one left data files behind.
    assert commit.committed(root, PARTS) == [{"part": "a"}]
    left = ["cells/b.parquet", "slides/b.parquet"][:after]
    assert set(left) <= set(files(root))
    # The next run removes exactly the files without a marker, then redoes the unit.
    assert commit.remove_uncommitted(root, PARTS) == sorted(left)
    assert files(root) == ["_committed/a.json", "cells/a.parquet", "slides/a.parquet"]
    write_part(root, "b")
    assert [m["part"] for m in commit.committed(root, PARTS)] == ["a", "b"]


def test_rerun_is_idempotent(root):
    write_part(root, "a")
    with pytest.raises(commit.InjectedFault):
        write_part(root, "b", fault=commit.Fault(after_files=1))
    for _ in range(2):  # run the whole job twice after the crash: the same end state
        commit.remove_uncommitted(root, PARTS)
        done = {m["part"] for m in commit.committed(root, PARTS)}
        for name in ("a", "b", "c"):
            if name not in done:
                write_part(root, name)
        assert [m["part"] for m in commit.committed(root, PARTS)] == ["a", "b", "c"]
        assert len(files(root)) == 9


def test_stray_files_and_temporaries_are_not_units(root):
    write_part(root, "a")
    # A data file with no marker (another run's leftover) and a local write's temporary
    # marker file are neither read as units nor kept.
    storage.write_bytes(storage.join(root, "slides/zz.parquet"), b"orphan")
    storage.write_bytes(storage.join(root, "_committed/.zz.json"), b"{not json")
    assert commit.committed(root, PARTS) == [{"part": "a"}]
    assert commit.remove_uncommitted(root, PARTS) == ["slides/zz.parquet"]


def test_single_unit_dataset_retract_and_replace(root):
    unit = commit.Unit(root, DATASET, "manifest.json")
    for i in range(3):
        unit.write(f"train/part-{i:05d}.parquet", b"x" * i)
    shards = [f"train/part-{i:05d}.parquet" for i in range(3)]
    unit.commit({"shards": shards})
    assert json.loads(storage.read_bytes(storage.join(root, "manifest.json"))) == {"shards": shards}
    # Replacing the dataset: the marker goes first (the old dataset vanishes for readers),
    # then its shards are uncommitted and swept; the new dataset is written and committed.
    commit.retract(root, "manifest.json")
    assert commit.committed(root, DATASET) == []
    assert commit.remove_uncommitted(root, DATASET) == shards
    unit = commit.Unit(root, DATASET, "manifest.json")
    unit.write("train/part-00000.parquet", b"new")
    unit.commit({"shards": ["train/part-00000.parquet"]})
    assert files(root) == ["manifest.json", "train/part-00000.parquet"]


def test_marker_must_name_exactly_the_unit_files(root):
    unit = commit.Unit(root, PARTS, "_committed/a.json")
    unit.write("cells/a.parquet", b"c")  # the slides file is missing
    with pytest.raises(ValueError, match="must name exactly"):
        unit.commit({"part": "a"})
    assert commit.committed(root, PARTS) == []
