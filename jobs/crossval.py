"""Pool the evaluations of a K-fold cross-validation over source cells into one figure.

    python -m jobs.ingest --source SRC --out data/shards/cv5-f0 --slides SLIDES --folds 5 --fold 0
    python -m jobs.train --config CONFIG data.uri=data/shards/cv5-f0 run.name=cv5-f0
    python -m jobs.evaluate --checkpoint runs/cv5-f0/epoch-NNNN --data data/shards/cv5-f0 \\
        --out evals/cv5-f0                                   # ... and so for folds 1 to 4
    python -m jobs.crossval evals/cv5-f0 evals/cv5-f1 ... evals/cv5-f4 --out evals/cv5
    python -m jobs.crossval evals/b-f0 ... evals/b-f4 --against evals/cv5-f0 ... evals/cv5-f4

Each fold's network is scored on the cells it never saw; pooled, every cell is scored once.
Prints and writes (``--out``: crossval.md, crossval.json) each fold's per-image, vote and
cell-balanced accuracy, their mean and spread over folds, and the pooled figures with 95 %
intervals from resampling the pooled cells. Refuses evaluations that score one cell twice.
``--against`` takes a second cross-validation of the same cells (another recipe, or the same
with TTA) and adds the gap between the two, with an interval from resampling the cells in
pairs. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.crossval", description=__doc__.split("\n")[0])
    p.add_argument("evaluations", nargs="+", help="jobs.evaluate --out folders, one per fold")
    p.add_argument(
        "--against",
        nargs="+",
        metavar="EVALUATION",
        help="a second cross-validation's jobs.evaluate folders: the gap to it on the same cells",
    )
    p.add_argument("--out", help="folder (local or URI) for crossval.md and crossval.json")
    p.add_argument("--resamples", type=int, default=2000, help="cell resamples for intervals")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel import storage
    from cellmodel.evaluate.crossval import (
        FIGURES,
        CrossValError,
        gap,
        gap_markdown,
        points,
        pool,
        render_markdown,
    )

    def pooled(uris: list[str]) -> dict:
        return pool(uris, resamples=args.resamples, level=args.level)

    try:
        r = pooled(args.evaluations)
        if args.against:
            b = pooled(args.against)
            g = gap(r, b, resamples=args.resamples, level=args.level)
            g["warnings"] += [f"--against: {w}" for w in b["warnings"]]
            r["gap"] = {"against": args.against, **g}
    except CrossValError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p, ci, of = r["pooled"], r["pooled"]["intervals"], r["over_folds"]
    for f in r["folds"]:
        print(
            f"{f['evaluation']}: " + ", ".join(
                f"{name} {f[k]:.4f}" for name, k in FIGURES if f[k] is not None
            ) + f" ({f['n']} images, {f['n_sources']} cells)"
        )  # fmt: skip
    print(
        "over folds: "
        + ", ".join(f"{name} {of[k]['mean']:.4f} +- {of[k]['sd']:.4f}" for name, k in FIGURES)
    )
    print(
        f"pooled ({p['n']} images, {p['n_sources']} cells): "
        + ", ".join(f"{name} {p[k]:.4f} [{ci[k][0]:.4f}, {ci[k][1]:.4f}]" for name, k in FIGURES)
    )
    if args.against:
        g = r["gap"]
        print(
            f"gap to --against on {g['cells']} cells, in points: "
            + ", ".join(f"{name} {points(g[k])}" for name, k in FIGURES)
        )
    for w in r["warnings"] + r.get("gap", {}).get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.out:
        storage.write_bytes(
            storage.join(args.out, "crossval.json"), json.dumps(r, indent=2).encode()
        )
        md = render_markdown(r) + (gap_markdown(r["gap"]) if args.against else "")
        storage.write_bytes(storage.join(args.out, "crossval.md"), md.encode())
        print(f"report: {args.out.rstrip('/')}/crossval.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
