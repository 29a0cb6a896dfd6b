"""Evaluate a checkpoint and write a report a person reads.

    python -m jobs.evaluate [--checkpoint CKPT_URI] --data PATH_OR_URI --out DIR [--split val]

DATA is a class-folder tree (``<data>/<CLASS>/*.jpeg``, like the TEST split) or a Parquet
shard dataset (``manifest.json``; ``--split`` picks the split). DIR (a local folder or a
URI) receives report.md, metrics.json, predictions.csv and the PNGs. Runs the same locally
and under ``ray job submit``. Without ``--checkpoint``: ``$CELLMODEL_CHECKPOINT``, else the
bundled model. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        action="append",
        help="checkpoint folder (local or URI); repeat it to score an ensemble (the mean of "
        "the checkpoints' probabilities, e.g. the seeds of one recipe); default "
        "$CELLMODEL_CHECKPOINT, else the bundled model (models/bundled)",
    )
    p.add_argument("--data", required=True, help="class-folder tree or shard dataset")
    p.add_argument("--out", help="output folder for the report (omit to print metrics only)")
    p.add_argument("--split", default="val", help="split of a shard dataset (default: val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--bins", type=int, default=10, help="calibration bins (default: 10)")
    p.add_argument("--mistakes", type=int, default=16, help="images in the mistakes grid")
    p.add_argument(
        "--featuremap-image", help="image (path or URI) for the feature maps (default: the first)"
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="average each image over its 8 flips and quarter turns (8x the compute)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from cellmodel.models.checkpoint import checkpoints_or_default

    args.checkpoint = checkpoints_or_default(args.checkpoint)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel.data.transforms import ImageDecodeError
    from cellmodel.evaluate import EvalDataError, EvalOutputError, evaluate_checkpoint
    from cellmodel.models import CheckpointError

    try:
        m = evaluate_checkpoint(
            args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint,
            args.data,
            args.out,
            batch_size=args.batch_size,
            split=args.split,
            device=args.device,
            n_bins=args.bins,
            top_mistakes=args.mistakes,
            featuremap_image=args.featuremap_image,
            progress=not args.quiet,
            tta=args.tta,
        )
    except (CheckpointError, EvalDataError, EvalOutputError, ImageDecodeError, ValueError) as e:
        # A user's mistake: one line that says what to fix, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{m['model_name']}: accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, "
        f"ECE {m['ece']:.4f} on {m['n']} images ({m['n_skipped']} skipped)"
    )
    if "per_source" in m:
        ps = m["per_source"]
        k = ps["images_per_source"]
        print(
            f"per source cell ({ps['n_sources']}): vote accuracy {ps['vote_accuracy']:.4f}, "
            f"cell-balanced image accuracy {ps['cell_balanced_accuracy']:.4f} (images per "
            f"cell {k['min']}-{k['max']}, median {k['median']:g})"
        )
        ci = ps["intervals"]
        print(
            f"{ci['level']:.0%} intervals from resampling the {ps['n_sources']} cells: "
            + ", ".join(
                f"{name} {ci[key][0]:.4f}-{ci[key][1]:.4f}"
                for name, key in (
                    ("accuracy", "accuracy"),
                    ("vote", "vote_accuracy"),
                    ("cell-balanced", "cell_balanced_accuracy"),
                )
            )
        )
    if args.out:
        print(f"report: {args.out.rstrip('/')}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
