"""Ingest crops or slides into Parquet shards: ``python -m jobs.ingest --source SRC --out URI``.

Runs the same locally and under ``ray job submit``; SRC and URI are local paths or fsspec
URIs (s3:// endpoints come from AWS_ENDPOINT_URL). See docs/ingest.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from cellmodel.data.augment import DEFAULT_ANGLES


def _angles(text: str) -> tuple[float, ...]:
    """``"0,90,180,270"`` or ``"step:15"`` (every 15 degrees from 0)."""
    try:
        if text.startswith("step:"):
            step = float(text[5:])
            if step <= 0:
                raise ValueError
            return tuple(i * step for i in range(int(360 // step)))
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --angles {text!r}: give degrees like 0,90,180,270 or step:15"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="crop folder (CLASS/*.jpeg) or slide folder")
    p.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix")
    p.add_argument("--layout", choices=("auto", "crops", "slides"), default="auto")
    p.add_argument(
        "--classes",
        type=lambda t: [c for c in t.split(",") if c.strip()],
        default=[],
        help="comma-separated classes to keep (default: every class folder or slide label)",
    )
    p.add_argument(
        "--min-sources-per-class",
        type=int,
        default=5,
        help="skip classes with fewer source cells (default 5: BCCD's 3 BASOPHIL slides)",
    )
    p.add_argument(
        "--crop-size",
        type=lambda t: tuple(int(v) for v in t.lower().split("x")),
        default=(320, 240),
        help="WIDTHxHEIGHT of every stored crop (default 320x240)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="store crops resized by this factor (e.g. 0.6: 320x240 windows kept as 192x144)",
    )
    p.add_argument(
        "--group",
        choices=("auto", "file", "near_duplicate", "slides"),
        default="auto",
        help="trace crops of a crop folder to their source cell: near-duplicate grouping, or "
        "matching to --slides; 'file' makes each file its own source (the split may leak)",
    )
    p.add_argument("--slides", default="", help="VOC slide folder the crops were cut from")
    p.add_argument(
        "--target-per-class",
        type=int,
        default=None,
        help="train rows per class after augmentation (default: the largest class)",
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of sources for val")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of sources for test")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation over source cells: cut each class's cells into K parts "
        "(same parts for every fold with the same --seed) and hold out part --fold as val; "
        "fold 0 of 5 is the default 0.2 split",
    )
    p.add_argument("--fold", type=int, default=0, help="the part held out as val, 0 to K-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--angles",
        type=_angles,
        default=DEFAULT_ANGLES,
        help="rotation angles, e.g. 0,90,180,270 or step:15 (default step:15)",
    )
    p.add_argument("--no-flips", dest="flips", action="store_false", help="rotations only")
    p.add_argument("--augment-val", action="store_true", help="balance held-out splits too")
    p.add_argument("--shard-rows", type=int, default=2048, help="rows per shard")
    p.add_argument("--row-group-rows", type=int, default=256, help="rows per Parquet row group")
    p.add_argument("--workers", type=int, default=4, help="threads reading and encoding")
    p.add_argument(
        "--s3-endpoint",
        default=None,
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL from the environment)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset at --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    # Fault injection for tests: SIGKILL the ingest after N shards are written.
    p.add_argument("--kill-after-shards", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint  # read by cellmodel.storage
    from cellmodel.data.ingest import IngestError, ingest
    from cellmodel.data.sources import SourceError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = ingest(
                args.source,
                args.out,
                layout=args.layout,
                classes=args.classes,
                min_sources_per_class=args.min_sources_per_class,
                crop_size=args.crop_size,
                scale=args.scale,
                group=args.group,
                slides=args.slides,
                target_per_class=args.target_per_class,
                val_fraction=args.val_fraction,
                test_fraction=args.test_fraction,
                folds=args.folds,
                fold=args.fold,
                seed=args.seed,
                angles=args.angles,
                flips=args.flips,
                augment_val=args.augment_val,
                shard_rows=args.shard_rows,
                row_group_rows=args.row_group_rows,
                overwrite=args.overwrite,
                progress=args.progress,
                workers=args.workers,
                kill_after_shards=args.kill_after_shards,
            )
    except (IngestError, SourceError, ValueError, PermissionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for split, info in m["splits"].items():
        counts = ", ".join(f"{c} {n}" for c, n in info["counts"].items())
        print(f"{split}: {info['rows']} rows in {len(info['shards'])} shard(s) ({counts})")
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])}: {m['skipped_counts']} (details in manifest.json)")
    print(f"dataset written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
