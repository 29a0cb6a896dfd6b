"""Evaluate the slide job on annotated slides (BCCD / Pascal VOC layout), in one command.

    python -m jobs.evaluate_finder --slides ../shared/data/bccd [--cv K [--learned] | --pairs SEEDS]
        [--checkpoint URI --output URI] [--config FILE] [key=value ...]

1. The white-cell finder against the VOC ``WBC`` boxes: recall and precision at
   IoU >= 0.5 (greedy one-to-one matching, best score first), with the settings of
   ``--config``. No Ray, no model.
2. ``--cv K``: k-fold cross-validation over slides instead: the settings are chosen on
   k-1 folds (grid search, box margins by least squares) and scored on the held fold,
   with touching pairs composed from real cells inside each fold; prints the per-fold
   table with the mean and the worst fold, and the setting chosen on all slides.
   With ``--learned``: the learned centre finder instead, trained from random weights per
   fold on the other folds' slides (``--members`` networks, 3 as shipped), scored beside
   the stain finder on the held fold's slides, its composed pairs and fresh pairs
   (``--fresh-seeds``); ``--suppress`` candidates of the learned finder's peak suppression,
   ``--min-score`` candidates of its detection threshold and ``--flips`` (the heat map also
   averaged over the slide's flips), each fold's chosen on the others; ``--groups 3,4``
   also scores slides of three and four cells composed inside each held fold.
3. ``--pairs 10,11,12,13``: the finder with the settings of ``--config`` on touching pairs
   composed from every single-cell slide (one per slide and seed, as in ``--cv``, but
   fresh ones): recall, precision, and how many pairs were counted as exactly two cells.
4. With ``--checkpoint``: the slide job itself runs over ``JPEGImages`` (resumable into
   ``--output``), and each slide's ``top_class`` is compared with ``labels.csv`` on the
   slides with exactly one label among the model's classes. With ``--pairs`` too: the
   slide job on the composed two-cell slides of single-label slides (written under
   ``--output``): pairs counted as two cells, each cell classified right (the base slide's
   own and the pasted one), differentials exact.

Settings are the slide job's (``--config``, default ``jobs/configs/slides.toml``, then
``key=value`` overrides such as ``finder.split_elongation=1.6``). The work is done in
``cellmodel.infer.finder_eval``; this module only reads arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from cellmodel import storage

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "slides.toml"


def _values(text: str, flag: str = "--suppress", low_open: bool = False) -> list[float]:
    """Comma-separated numbers in [0, 1] (``low_open``: above 0) for ``flag``."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"{flag} takes comma-separated numbers, e.g. 0.3,0.5,0.7; got {text!r}"
        ) from None
    if not vals or any(not 0 <= v <= 1 or (low_open and v == 0) for v in vals):
        span = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{flag} values must lie in {span}; got {text!r}")
    return vals


def _groups(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 3 for n in counts):
        raise ValueError(
            f"--groups takes cell counts of 3 or more, comma-separated (pairs are scored "
            f"already), e.g. 3,4; got {text!r}"
        )
    return counts


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        msg = f"--pairs takes comma-separated integer seeds, e.g. 10,11; got {text!r}"
        raise ValueError(msg) from None


def _num(v: float | None, digits: int = 3) -> str:
    """A recall or precision for print; n/a where nothing was found to divide by."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jobs.evaluate_finder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--slides", required=True, help="VOC-layout folder or URI (bccd)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--cv", type=int, metavar="K", help="k-fold cross-validation of the finder")
    ap.add_argument("--seed", type=int, default=0, help="fold assignment seed (--cv)")
    ap.add_argument("--no-compose", action="store_true", help="--cv without composed pairs")
    mode.add_argument(
        "--pairs",
        metavar="SEEDS",
        help="score touching pairs composed from every single-cell slide, one per slide and "
        "seed (comma-separated seeds, e.g. 10,11,12,13)",
    )
    ap.add_argument(
        "--learned",
        action="store_true",
        help="with --cv: cross-validate the learned centre finder (trained per fold from "
        "random weights) beside the stain finder of --config",
    )
    ap.add_argument("--epochs", type=int, help="--learned: training epochs per fold")
    ap.add_argument(
        "--members",
        type=int,
        help="--learned: networks per fold (seeds 0, 1, ...), averaged at detection "
        "(default 3, as jobs.train_finder; 1 trains a third as long)",
    )
    ap.add_argument(
        "--train-seed",
        type=int,
        help="--learned: the first network's seed (default 0; the members take N, N+1, ...), "
        "to check a result on networks trained with other seeds",
    )
    ap.add_argument(
        "--skip-empty",
        action="store_true",
        help="--learned: train without the slides that have no WBC box (still scored on them)",
    )
    ap.add_argument(
        "--fresh-seeds",
        default="20,21,22,23",
        metavar="SEEDS",
        help="--learned: seeds of the fresh touching pairs composed inside each held fold",
    )
    ap.add_argument(
        "--suppress",
        metavar="VALUES",
        help="--learned: candidate values of the learned finder's suppress setting "
        "(comma-separated, e.g. 0,0.5,0.7,0.9), each fold's chosen on the other folds",
    )
    ap.add_argument(
        "--flips",
        action="store_true",
        help="--learned: also try each candidate with the heat map averaged over the slide's "
        "flips (4x the finder's compute); chosen per fold on the other folds, with --suppress",
    )
    ap.add_argument(
        "--min-score",
        metavar="VALUES",
        help="--learned: candidate detection thresholds on the heat map (comma-separated, "
        "e.g. 0.25,0.3,0.35,0.4), chosen per fold on the other folds with --suppress",
    )
    ap.add_argument(
        "--groups",
        metavar="COUNTS",
        help="--learned: also score slides of that many cells composed inside each held fold "
        "(comma-separated, e.g. 3,4; touching chains and scattered cells), at each fold's "
        "chosen settings",
    )
    ap.add_argument("--save-networks", metavar="DIR", help="--learned: save each fold's network")
    ap.add_argument("--limit", type=int, help="only the first N annotated slides")
    ap.add_argument("--exclude", default="", help="slide names left out, comma-separated")
    ap.add_argument(
        "--min-box", type=float, default=0.0, help="drop WBC boxes with a side under PX"
    )
    ap.add_argument(
        "--checkpoint",
        action="append",
        help="also evaluate the slide-level class with this model (repeat it: an ensemble)",
    )
    ap.add_argument("--output", help="where the slide job writes (default: a temporary folder)")
    ap.add_argument("--overlays", action="store_true", help="slide job: write overlays too")
    ap.add_argument("--config", help="slide-job TOML (default jobs/configs/slides.toml)")
    ap.add_argument("overrides", nargs="*", help="key=value settings over the file's")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU for a match (default 0.5)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    from cellmodel.infer import finder_eval
    from cellmodel.infer.slides import load_config

    try:
        cfg = load_config(
            args.config or DEFAULT_CONFIG, {"overlays": args.overlays or None}, args.overrides
        )
        if args.learned and not args.cv:
            raise ValueError("--learned cross-validates: give --cv K too (e.g. --cv 5)")
        learned_only = (
            args.suppress, args.flips, args.min_score, args.save_networks, args.groups,
            args.members is not None, args.train_seed is not None,
        )  # fmt: skip
        if any(learned_only) and not args.learned:
            raise ValueError(
                "--suppress, --min-score, --flips, --members, --train-seed, --groups and "
                "--save-networks are for --cv K --learned"
            )
        if args.cv and args.learned:
            from cellmodel.infer.learned_finder import LearnedFinderConfig

            lcfg = LearnedFinderConfig()
            if args.epochs:
                lcfg.epochs = args.epochs
            if args.members is not None:
                if args.members < 1:
                    raise ValueError(f"--members must be at least 1, got {args.members}")
                lcfg.members = args.members
            if args.train_seed is not None:
                lcfg.seed = args.train_seed
            result = {"learned_cross_validation": finder_eval.cross_validate_learned(
                args.slides,
                args.cv,
                learned=lcfg,
                stain=cfg.finder,
                iou_threshold=args.iou,
                seed=args.seed,
                pair_seeds=_seeds(args.fresh_seeds),
                limit=args.limit,
                exclude=[x for x in args.exclude.split(",") if x],
                min_box=args.min_box,
                skip_empty=args.skip_empty,
                suppress=_values(args.suppress) if args.suppress else None,
                flips=[False, True] if args.flips else None,
                min_score=_values(args.min_score, "--min-score", True) if args.min_score else None,
                groups=_groups(args.groups) if args.groups else (),
                networks_out=args.save_networks,
                progress=True,
            )}  # fmt: skip
        elif args.cv:
            res = finder_eval.cross_validate(
                args.slides,
                args.cv,
                base=cfg.finder,
                iou_threshold=args.iou,
                compose=not args.no_compose,
                seed=args.seed,
                limit=args.limit,
                exclude=[x for x in args.exclude.split(",") if x],
                min_box=args.min_box,
                progress=True,
            )
            result = {"cross_validation": res}
        elif args.pairs:
            result = {"pairs": finder_eval.evaluate_pairs(
                args.slides,
                cfg.finder,
                _seeds(args.pairs),
                args.iou,
                args.limit,
                exclude=[x for x in args.exclude.split(",") if x],
                min_box=args.min_box,
            )}  # fmt: skip
        else:
            f = finder_eval.evaluate_finder(
                args.slides,
                cfg.finder,
                args.iou,
                args.limit,
                exclude=[x for x in args.exclude.split(",") if x],
                min_box=args.min_box,
            )
            result = {"finder": f}
        if args.checkpoint and args.pairs:
            out = args.output or tempfile.mkdtemp(prefix="evaluate-pairs-")
            result["pair_differential"] = finder_eval.evaluate_pair_differentials(
                args.slides,
                args.checkpoint,
                out,
                cfg,
                _seeds(args.pairs),
                args.iou,
                args.limit,
                exclude=[x for x in args.exclude.split(",") if x],
                min_box=args.min_box,
            )
        elif args.checkpoint:
            out = args.output or tempfile.mkdtemp(prefix="evaluate-slides-")
            result["slide_class"] = finder_eval.evaluate_slide_class(
                args.slides, args.checkpoint, out, cfg
            )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key in ("finder", "pairs"):
        if (result.get(key) or {}).get("seen_in_training"):
            print(
                f"warning: the learned finder's weights were trained on "
                f"{result[key]['seen_in_training']} of these slides, so the figures below are "
                "not held-out; measure the method with --cv K --learned",
                file=sys.stderr,
            )
    if "finder" in result:
        f = result["finder"]
        print(
            f"finder on {f['slides']} slides: recall {_num(f['recall'])}, precision "
            f"{_num(f['precision'])} at IoU >= {args.iou} ({f['true_positives']} of "
            f"{f['wbc_boxes']} WBC boxes, {f['detections']} detections)"
        )
        sc = f.get("scale") or {}
        if sc.get("slides_resized"):
            print(
                f"pixel scale: {sc['slides_resized']} slides resized to the finder's red-cell "
                f"diameter {sc['finder_rbc_diameter_px']} px (the slides': "
                f"{sc['archive_rbc_diameter_px']} px)"
            )
    elif "pairs" in result:
        f = result["pairs"]
        print(
            f"finder on {f['pairs']} composed pairs (seeds {' '.join(map(str, f['seeds']))}): "
            f"recall {_num(f['recall'], 4)}, precision {_num(f['precision'], 4)} at IoU >= {args.iou}; "
            f"counted as two cells: {f['counted_two']}, both found: {f['both_found']}, "
            f"both lost: {f['both_lost']}; two boxes (the count right, any fit): "
            f"{f['two_boxes']}"
        )
    elif "learned_cross_validation" in result:
        res = result["learned_cross_validation"]
        print(
            f"{res['k']}-fold cross-validation of the learned finder over {res['real_slides']} "
            f"slides, IoU >= {args.iou} (fresh pairs: seeds "
            f"{' '.join(map(str, res['pair_seeds']))}):"
        )
        print(finder_eval.format_learned_cv_table(res))
        fresh = res["summary"]["learned_fresh"]
        print(
            f"learned finder, fresh pairs: counted as two cells {fresh['counted_two']} of "
            f"{fresh['pairs']}; two boxes (the count right, any fit) {fresh['two_boxes']}"
        )
        if res["networks_reused"]:
            print(f"networks: {res['networks_reused']} of {res['k']} reused from --save-networks")
        if res["train_s_per_fold"] is not None:
            print(f"training: {res['train_s_per_fold']} s per fold")
    else:
        res = result["cross_validation"]
        print(
            f"{res['k']}-fold cross-validation over {res['real_slides']} slides "
            f"(+{res['composed_slides']} composed pairs), IoU >= {args.iou}:"
        )
        print(finder_eval.format_cv_table(res))
        print(f"chosen on all slides: {json.dumps(res['final'])}")
        print(f"finder: {res['finder_ms_per_slide']} ms per slide (one process)")
    if "slide_class" in result:
        s = result["slide_class"]
        acc = "n/a" if s["slide_accuracy"] is None else f"{s['slide_accuracy']:.3f}"
        ci = s.get("slide_accuracy_interval")
        span = "" if ci is None else f" (95% interval {ci[0]:.3f}-{ci[1]:.3f})"
        print(
            f"slide class: accuracy {acc}{span} on {s['single_label_slides']} single-label slides"
        )
    if "pair_differential" in result:
        d = result["pair_differential"]
        own, pasted = (
            "n/a" if d[k] is None else f"{d[k]:.3f}"
            for k in ("own_cell_right", "pasted_cell_right")
        )
        print(
            f"slide job on {d['pairs']} composed two-cell slides: counted as two {d['counted_two']}, "
            f"differential exact {d['differential_exact']}; boxed cells classified right: own "
            f"{own}, pasted {pasted} ({d['cells_boxed']} cells boxed)"
        )
    if args.json:
        storage.write_bytes(args.json, json.dumps(result, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
