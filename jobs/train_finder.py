"""Train the learned white-cell finder on annotated slides (BCCD / Pascal VOC layout).

    python -m jobs.train_finder --slides ../shared/data/bccd --out runs/finder/centre.pt
        [--epochs 60] [--seed 0] [--members N] [--exclude NAMES] [--suppress S]
        [--min-score T] [--flips] [--half] [--threads N]

Small centre-heat-map networks (``cellmodel.infer.learned_finder``; three by default,
seeds SEED to SEED+2, averaged at detection) learn the ``WBC`` boxes from random weights,
on the CPU in a few minutes each. Use the weights in the slide job
with ``finder.method=learned finder.weights=runs/finder/centre.pt`` (or the same keys in
the ``[finder]`` section of its TOML). Before trusting them on new slides, measure the
method with ``python -m jobs.evaluate_finder --slides DIR --cv 5 --learned``, which trains
the same networks per fold and scores them on slides they never saw.
"""

from __future__ import annotations

import argparse
import sys
import time

from cellmodel import storage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jobs.train_finder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--slides", required=True, help="VOC-layout folder or URI (bccd)")
    ap.add_argument("--out", required=True, help="weights file to write (path or s3:// URI)")
    ap.add_argument("--epochs", type=int, help="passes over the slides (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--members",
        type=int,
        default=None,
        help="networks to train (seeds SEED, SEED+1, ...) and average at detection; their "
        "training time and the finder's compute add up (default 3, as the shipped weights; "
        "chosen by jobs.evaluate_finder --cv 5 --learned --members N)",
    )
    ap.add_argument("--exclude", default="", help="slide names left out, comma-separated")
    ap.add_argument(
        "--skip-empty",
        action="store_true",
        help="leave out slides without a WBC box (where that means an unannotated cell, not "
        "an empty field)",
    )
    ap.add_argument(
        "--suppress",
        type=float,
        help="central share of a box in which a weaker peak counts as the same cell "
        "(default 0.7, chosen by jobs.evaluate_finder --cv 5 --learned --suppress ...; 0: off)",
    )
    ap.add_argument(
        "--min-score",
        type=float,
        help="detection threshold on the heat map (default 0.35, chosen by "
        "jobs.evaluate_finder --cv 5 --learned --min-score ...)",
    )
    ap.add_argument(
        "--flips",
        action="store_true",
        help="detect with the heat map averaged over each slide's flips (4x the finder's "
        "compute; try it first with jobs.evaluate_finder --cv 5 --learned --flips)",
    )
    ap.add_argument(
        "--half",
        action="store_true",
        help="store the weights in float16: half the file, read back into float32 (the shipped "
        "weights; on BCCD the same detections)",
    )
    ap.add_argument("--limit", type=int, help="only the first N annotated slides")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from cellmodel.data.scale import estimate_dataset_scale
    from cellmodel.infer import learned_finder as lf
    from cellmodel.infer.finder_eval import load_slides

    try:
        if storage.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        cfg = lf.LearnedFinderConfig(seed=args.seed, threads=args.threads, flips=args.flips)
        if args.epochs:
            cfg.epochs = args.epochs
        if args.members is not None:
            if args.members < 1:
                raise ValueError(f"--members must be at least 1, got {args.members}")
            cfg.members = args.members
        if args.suppress is not None:
            if not 0 <= args.suppress <= 1:
                raise ValueError(f"--suppress must lie in [0, 1], got {args.suppress}")
            cfg.suppress = args.suppress
        if args.min_score is not None:
            if not 0 < args.min_score <= 1:
                raise ValueError(f"--min-score must lie in (0, 1], got {args.min_score}")
            cfg.min_score = args.min_score
        slides = load_slides(
            args.slides, args.limit, [x for x in args.exclude.split(",") if x]
        )  # fmt: skip
        # A slide without a WBC box is a negative: the network learns to find nothing there,
        # unless --skip-empty (or --exclude) leaves it out.
        annotated = [s for s in slides if s.truths] if args.skip_empty else slides
        if not any(s.truths for s in slides):
            raise ValueError(f"no slide under {args.slides} has a WBC box to learn from")
        t0 = time.perf_counter()
        model = lf.train_finder(
            [s.image for s in annotated], [s.truths for s in annotated], cfg, progress=True
        )
        meta = {
            "slides": args.slides,
            "trained_on": [s.name for s in annotated],
            "train_s": round(time.perf_counter() - t0, 1),
            # the pixel scale it learned at: the slide job resizes other scales to it
            "rbc_diameter_px": estimate_dataset_scale([s.image for s in annotated])[
                "rbc_diameter_px"
            ],
        }
        lf.save(model, cfg, args.out, meta, half=args.half)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"trained on {len(annotated)} slides in {meta['train_s']} s (red-cell diameter "
        f"{meta['rbc_diameter_px']} px); wrote {args.out}\n"
        f"use it: python -m jobs.classify_slides ... finder.method=learned "
        f"finder.weights={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
