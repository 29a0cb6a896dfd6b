"""Bulk-classify slides: ``python -m jobs.classify_slides --input --output [--checkpoint]``.

Finds the white cells on every slide, classifies them on a Ray Data actor pool and writes
Parquet per cell and per slide, plus ``summary.json``. Re-running skips committed slides,
so an interrupted run is resumed by running the same command again.

Without ``--checkpoint`` the job classifies with ``$CELLMODEL_CHECKPOINT``, else the bundled
model. Settings come from ``--config`` (default ``jobs/configs/slides.toml``), then
``key=value`` overrides with TOML values (``finder.min_area=1500 tta=true``), then the
flags below.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "slides.toml"


def load_config(path: str | None, flags: dict, overrides: list[str] | None = None):
    """The job's ``SlidesConfig``: a TOML file, ``key=value`` overrides, then flags."""
    from cellmodel.infer.slides import load_config as load

    return load(path or DEFAULT_CONFIG, flags, overrides)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.classify_slides", description=__doc__)
    ap.add_argument("--input", required=True, help="folder or s3:// prefix of slide images")
    ap.add_argument(
        "--checkpoint",
        action="append",
        help="checkpoint folder or URI; repeat it to classify with an ensemble (the mean of "
        "the members' probabilities; they must share classes, input, pixel scale and light); "
        "default $CELLMODEL_CHECKPOINT, else the bundled model (models/bundled)",
    )
    ap.add_argument("--output", required=True, help="output folder or URI (resumable)")
    ap.add_argument("--config", help=f"TOML settings (default {DEFAULT_CONFIG.name})")
    ap.add_argument(
        "overrides", nargs="*", help="key=value settings over the file's (finder.min_area=1500)"
    )
    ap.add_argument("--batch-size", type=int, help="cells per model batch")
    ap.add_argument("--concurrency", type=int, help="classifier actors")
    ap.add_argument("--num-gpus", type=float, help="GPUs per classifier actor")
    ap.add_argument("--slides-per-part", type=int, help="slides per output part")
    ap.add_argument("--backend", choices=("eager", "onnx", "auto"), help="model backend")
    ap.add_argument(
        "--tta",
        action="store_true",
        default=None,
        help="average each cell over its 8 flips and quarter turns (8x the compute)",
    )
    ap.add_argument("--limit", type=int, help="only the first N slides (by name)")
    ap.add_argument(
        "--overlays",
        action="store_true",
        default=None,
        help="also write overlays/<slide>.png (boxes, class, confidence, low-confidence flags)",
    )
    ap.add_argument(
        "--no-rescale",
        dest="rescale",
        action="store_false",
        default=None,
        help="cut cells at the crop size, not at the training pixel scale",
    )
    ap.add_argument(
        "--train-rbc-px",
        type=float,
        help="training red-cell diameter (px) when the checkpoint does not record it",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    # Fault injection for tests (run_slides): stop the part after N committed ones before
    # its marker, raising or waiting there to be killed.
    ap.add_argument("--fault-after-parts", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fault-mode", choices=("raise", "hang"), default="raise",
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    from cellmodel.models.checkpoint import checkpoints_or_default

    args.checkpoint = checkpoints_or_default(args.checkpoint)
    return args


def format_summary(s: dict) -> str:
    """A few lines a person reads at the end of a run."""
    lines = [
        f"{s['n_slides']} slides done ({s['n_new']} in this run, {s['n_skipped']} skipped as "
        f"already done) in {s['seconds']:.1f} s; {s['n_cells']} white cells",
        "differential: " + ", ".join(f"{c} {100 * f:.1f}%" for c, f in s["fractions"].items()),
        f"flags: {s['n_no_white_cell']} slides with no white cell, "
        f"{s['n_low_confidence']} with low-confidence cells, {s['n_errors']} unreadable",
    ]
    lines += [f"  unreadable: {k} ({v})" for k, v in list(s["errors"].items())[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("cellmodel").setLevel(logging.INFO)
    from cellmodel import storage
    from cellmodel.infer.slides import SlidesError, run_slides
    from cellmodel.models.checkpoint import CheckpointError

    try:
        cfg = load_config(
            args.config,
            {
                "batch_size": args.batch_size,
                "concurrency": args.concurrency,
                "num_gpus": args.num_gpus,
                "slides_per_part": args.slides_per_part,
                "backend": args.backend,
                "tta": args.tta,
                "overlays": args.overlays,
                "rescale": args.rescale,
                "train_rbc_diameter_px": args.train_rbc_px,
            },
            args.overrides,
        )
        # Fail before any work if the output cannot be written.
        probe = storage.join(args.output, ".write-test")
        storage.write_bytes(probe, b"")
        fs, path = storage.get_fs(probe)
        fs.rm(path)
        summary = run_slides(
            args.input,
            args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint,
            args.output,
            cfg,
            limit=args.limit,
            progress=not args.quiet,
            fault_after_parts=args.fault_after_parts,
            fault_mode=args.fault_mode,
        )
    except (SlidesError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, OSError) as e:
        print(f"error: cannot use {args.output} or {args.input}: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"report: {storage.join(args.output, 'report.md')}")
    print(json.dumps({"output": args.output, **{k: summary[k] for k in ("n_slides", "n_cells")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
