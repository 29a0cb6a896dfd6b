"""Fit a checkpoint's temperature on labelled data it did not learn from, and store it.

    python -m jobs.calibrate --checkpoint CKPT --data SHARDS [--split val] [--write]
    python -m jobs.calibrate --checkpoint CKPT --temperature T --write [--note TEXT]
    python -m jobs.calibrate --checkpoint A --checkpoint B --checkpoint C --data SHARDS --write

The first form predicts the split, fits the temperature that makes the probabilities
honest (cellmodel.evaluate.calibrate), and prints the figures before and after,
cross-fitted over source cells (each fold scored with the temperature fitted on the
others). ``--write`` stores the temperature fitted on the whole split in the checkpoint's
``checkpoint.json``; every consumer (Serve, the slide job, jobs.evaluate) then applies it.
The second form stores a given temperature: for a final fit on every labelled image,
whose own validation is in-sample, take it from the same recipe trained on the train
split (see docs/evaluation.md). The third form calibrates a seed ensemble (the mean of its
members' calibrated probabilities is less confident than it is right): its temperature is
stored in every member for that combination, and applies wherever the same members are
named together (``jobs.evaluate``, the slide job).
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="checkpoint folder (local or URI); repeat it to calibrate those checkpoints as one "
        "ensemble (its temperature is stored in every member, for that combination only)",
    )
    p.add_argument("--data", help="class-folder tree or shard dataset the model did not learn from")
    p.add_argument("--split", default="val", help="split of a shard dataset (default: val)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds by source cell")
    p.add_argument("--low", type=float, default=0.5, help="low-confidence threshold reported")
    p.add_argument(
        "--weight",
        choices=("cell", "image"),
        default="cell",
        help="fit with every source cell weighing the same (default) or every image",
    )
    p.add_argument("--temperature", type=float, help="store this temperature instead of fitting")
    p.add_argument("--note", default="", help="with --temperature: where the value comes from")
    p.add_argument("--write", action="store_true", help="store the temperature in the checkpoint")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if len(set(args.checkpoint)) < len(args.checkpoint):
        p.error(f"a checkpoint is named twice in {args.checkpoint}")
    if (args.data is None) == (args.temperature is None):
        p.error("give --data (fit the temperature) or --temperature (store a given one)")
    if args.folds < 2:
        p.error("--folds must be 2 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel.data.transforms import ImageDecodeError
    from cellmodel.evaluate import EvalDataError
    from cellmodel.evaluate.calibrate import calibrate_checkpoint, write_temperature
    from cellmodel.models import CheckpointError

    ckpt = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint
    try:
        if args.temperature is not None:
            out = {"temperature": args.temperature, "checkpoint": ckpt}
            fitted = {"from": args.note or "given on the command line"}
        else:
            out = calibrate_checkpoint(
                ckpt,
                args.data,
                args.split,
                folds=args.folds,
                low=args.low,
                weight=args.weight,
                device=args.device,
                progress=not args.quiet,
            )
            b, a = out["before"], out["after_cross_fitted"]
            print(
                f"{out['n']} images of {out['groups']} {out['grouped_by']}s: temperature "
                f"{out['temperature']:.3f} (per fold {out['fold_temperatures']}); "
                f"cross-fitted NLL {b['nll']:.3f} -> {a['nll']:.3f} (cell-balanced "
                f"{b['nll_cell_balanced']:.3f} -> {a['nll_cell_balanced']:.3f}), ECE {b['ece']:.3f} -> "
                f"{a['ece']:.3f}, mean confidence {b['mean_confidence']:.3f} -> "
                f"{a['mean_confidence']:.3f} (accuracy {b['accuracy']:.3f}); under "
                f"{args.low}: {b['low_confidence_share']:.3f} -> {a['low_confidence_share']:.3f}"
            )
            if a["nll"] > b["nll"] and a["ece"] > b["ece"]:
                print(
                    "note: cross-fitted, the fitted temperature scores worse than none (log loss "
                    "and ECE): the probabilities are as calibrated as these folds can tell; "
                    "consider not writing it (or store --temperature 1)",
                    file=sys.stderr,
                )
            fitted = {
                "from": f"fitted on {args.data} split {args.split} ({out['n']} images, "
                f"{out['groups']} {out['grouped_by']}s)",
                "cross_fitted_ece": [b["ece"], a["ece"]],
            }
        if args.write:
            entry = write_temperature(ckpt, out["temperature"], fitted)
            where = ckpt if isinstance(ckpt, str) else f"each of {', '.join(ckpt)} (this ensemble)"
            print(f"wrote calibration {json.dumps(entry)} to {where}")
        if args.json:
            from cellmodel import storage

            storage.write_bytes(args.json, json.dumps(out, indent=2).encode())
    except (CheckpointError, EvalDataError, ImageDecodeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
