"""The one commit protocol of every output made of units: ingest's dataset, the slide job's parts.

A unit is a few data files and one JSON marker that names them. A writer writes the data
files (each atomically, ``storage.write_bytes``), then the marker: the unit exists for
readers only once its marker exists, and readers find units by their markers, never by
listing data files. A run killed before a marker leaves data files no marker names; the
next run deletes them (``remove_uncommitted``) before it writes, so running again is safe
and idempotent. One writer at a time per root. Local paths and fsspec URIs (s3://) alike.

    unit = Unit(root, LAYOUT, "_committed/part-1.json")
    unit.write("cells/part-1.parquet", data)
    unit.commit({"part": "part-1", ...})

Tests stop a writer between a data file and its marker with a ``Fault``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from cellmodel import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where one kind of output keeps its markers and data files (paths relative to the root).

    ``markers``: a glob of the marker files (``"_committed/*.json"``, or ``"manifest.json"``
    for an output of one unit). ``data``: globs of the data files. ``files``: the data files
    a marker commits; every data file no marker names is left over from an interrupted run.
    """

    markers: str
    data: tuple[str, ...]
    files: Callable[[dict], Iterable[str]]


class InjectedFault(RuntimeError):
    """Raised on purpose by a ``Fault`` (tests)."""


@dataclass(frozen=True)
class Fault:
    """Test hook: stop a unit right after its ``after_files``-th data file, before its marker.

    ``mode``: "raise" (``InjectedFault``), "hang" (wait to be killed from outside) or
    "kill" (SIGKILL this process: no handler, no cleanup).
    """

    after_files: int = 1
    mode: Literal["raise", "hang", "kill"] = "raise"

    def trigger(self, where: str) -> None:
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            log.warning("fault injected: waiting to be killed after %s", where)
            time.sleep(3600)
        raise InjectedFault(f"fault injected: stopped after {where}, before the marker")


def _paths(root: str, pattern: str) -> list[str]:
    """Files matching ``pattern`` under ``root``, as paths relative to it (sorted)."""
    fs, base = storage.get_fs(root)
    base = base.rstrip("/")
    found = fs.glob(f"{base}/{pattern}", detail=True)
    return sorted(posixpath.relpath(p, base) for p, info in found.items() if info["type"] == "file")


def committed(root: str, layout: Layout) -> list[dict]:
    """The markers of every committed unit under ``root`` (what readers may see), by path."""
    fs, base = storage.get_fs(root)
    fs.invalidate_cache()  # another process may have committed since this one listed
    return [
        json.loads(fs.cat_file(f"{base.rstrip('/')}/{rel}"))
        for rel in _paths(root, layout.markers)
        if not posixpath.basename(rel).startswith(".")  # a local write's temporary file
    ]


def remove_uncommitted(root: str, layout: Layout, markers: list[dict] | None = None) -> list[str]:
    """Delete every data file that no marker names (left by an interrupted run); their paths.

    ``markers``: the committed markers when the caller has just read them.
    """
    markers = committed(root, layout) if markers is None else markers
    keep = {f for m in markers for f in layout.files(m)}
    fs, base = storage.get_fs(root)
    removed = []
    for pattern in layout.data:
        for rel in _paths(root, pattern):
            if rel not in keep:
                fs.rm(f"{base.rstrip('/')}/{rel}")
                removed.append(rel)
    return removed


def retract(root: str, marker: str) -> None:
    """Un-commit a unit: delete its marker, so readers stop seeing it at once; its data files
    become uncommitted and the next ``remove_uncommitted`` deletes them."""
    fs, path = storage.get_fs(storage.join(root, marker))
    if fs.exists(path):
        fs.rm(path)


class Unit:
    """One unit being written under ``root``: data files first (``write``), then ``commit``.

    ``marker``: the marker's path relative to ``root``; ``fault`` (tests) stops the unit
    after some of its data files.
    """

    def __init__(self, root: str, layout: Layout, marker: str, *, fault: Fault | None = None):
        self.root, self.layout, self.marker, self.fault = root, layout, marker, fault
        self.written: list[str] = []

    def write(self, rel: str, data: bytes) -> None:
        """Write the data file ``rel`` (relative to the root), invisible until ``commit``."""
        storage.write_bytes(storage.join(self.root, rel), data)
        self.written.append(rel)
        if self.fault and len(self.written) >= self.fault.after_files:
            self.fault.trigger(rel)

    def commit(self, marker: dict) -> dict:
        """Write the marker, which must name exactly the data files written; returns it."""
        named = set(self.layout.files(marker))
        if named != set(self.written):
            raise ValueError(
                f"marker {self.marker} names {sorted(named)} but the unit wrote "
                f"{sorted(self.written)}; a marker must name exactly its unit's data files"
            )
        body = json.dumps(marker, indent=1).encode()
        storage.write_bytes(storage.join(self.root, self.marker), body)
        return marker
