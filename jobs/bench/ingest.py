"""Ingest throughput: ``python -m jobs.bench ingest [--per-class N] [--source DIR]``.

Baseline (same run): reading and decoding every source file once, which any ingest must
do. Then the full ingest (validate, split, augment to balance, encode, write shards and
manifest) to a local folder and to a local S3 server. Reported as images/s and as a
ratio to the baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from cellmodel import CLASSES
from cellmodel.data.transforms import decode_image
from jobs.bench._timing import measure

DEFAULT_TRAIN = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "blood-cells" / "TRAIN"
)


def crop_subset(source: Path, per_class: int | None) -> Path:
    """``source`` itself, or a temporary folder of symlinks to its first ``per_class`` files
    per class (a short run on a shared machine)."""
    if not per_class:
        return source
    root = Path(tempfile.mkdtemp(prefix="bench-crops-"))
    for cls in CLASSES:
        (root / cls).mkdir()
        for f in sorted((source / cls).iterdir())[:per_class]:
            (root / cls / f.name).symlink_to(f)
    return root


def start_s3() -> tuple[object, str]:
    """A local moto S3 server (the one the tests use) and a fresh bucket URI."""
    import s3fs
    from moto.server import ThreadedMotoServer

    for k, v in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
    return server, "s3://bench"


def _baseline(source: Path, repeats: int) -> tuple[int, float]:
    """Files and median seconds of a single-threaded read + decode of every file."""
    files = sorted(p for p in source.rglob("*") if p.is_file())

    def one() -> None:
        for f in files:
            decode_image(f.read_bytes())

    return len(files), measure(one, repeats=repeats, warmup=0).median


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench ingest", description=__doc__)
    p.add_argument("--source", type=Path, default=DEFAULT_TRAIN, help="crop folder")
    p.add_argument("--per-class", type=int, default=None, help="use only N files per class")
    p.add_argument("--target-per-class", type=int, default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    args = p.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: source {args.source} is not a folder; pass --source", flush=True)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from cellmodel.data.ingest import ingest

    source = crop_subset(args.source, args.per_class)
    n_files, dt = _baseline(source, args.repeats)
    base = n_files / dt
    print(f"source {args.source} ({n_files} files)")
    print(f"baseline read+decode: {base:8.1f} img/s  (1.00x)")
    targets = [("local", Path(tempfile.mkdtemp(prefix="bench-ingest-")) / "ds")]
    server = None
    if not args.no_s3:
        server, bucket = start_s3()
        targets.append(("s3 (moto, 127.0.0.1)", f"{bucket}/ds"))
    import warnings

    for name, out in targets:
        got = {}

        def one(out=out, got=got) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got["m"] = ingest(str(source), str(out), target_per_class=args.target_per_class,
                                  progress=False, workers=args.workers, overwrite=True,
                                  group="file")  # fmt: skip

        dt = measure(one, repeats=args.repeats, warmup=0).median
        m = got["m"]
        rows = sum(v["rows"] for v in m["splits"].values())
        augmented = rows - m["source"]["cells"]
        mb = sum(s["bytes"] for v in m["splits"].values() for s in v["shards"]) / 1e6
        print(
            f"ingest -> {name:22s}: {n_files / dt:8.1f} source img/s, {rows / dt:8.1f} rows/s "
            f"({rows} rows, {augmented} augmented, {mb:.0f} MB, {dt:.1f} s)  "
            f"{(n_files / dt) / base:.2f}x baseline"
        )
        if name == "local":
            shutil.rmtree(Path(out).parent, ignore_errors=True)
    if server is not None:
        server.stop()
    if source != args.source:
        shutil.rmtree(source, ignore_errors=True)
    return 0
