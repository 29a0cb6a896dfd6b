"""Bundle a checkpoint for shipping: float16 weights (half the size), provenance in the JSON.

    python -m jobs.bundle --checkpoint runs/gpu_scratch/model --out models/bundled \\
        --command "python -m jobs.train --local --config jobs/configs/gpu_scratch.toml model.name=compact_bilstm"

The bundle is an ordinary checkpoint folder (``model.safetensors`` + ``checkpoint.json``):
every consumer loads it as usual, casting the weights back to float32. ``checkpoint.json``
gains a ``bundle`` entry: the training command, the source checkpoint's metrics and digest.

Several ``--checkpoint``s (a seed ensemble) make an **ensemble folder**: each one bundled
into a member folder inside ``--out`` (``--names``, default ``member-1`` ...) and
``ensemble.json`` naming them, so the folder loads, serves and copies as one model::

    python -m jobs.bundle --checkpoint runs/a/model --checkpoint runs/b/model \\
        --checkpoint runs/c/model --names seed0,seed1,seed2 --out models/bundled

Temperatures are not carried over (the float16 weights are new checkpoints): store them
afterwards with ``python -m jobs.calibrate ... --write`` (a member's own, then the
ensemble's with ``--checkpoint`` the folder).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bundle", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="checkpoint folder (local or URI); repeat it for an ensemble folder",
    )
    p.add_argument("--out", required=True, help="folder to write the bundle to")
    p.add_argument(
        "--names", help="an ensemble's member folder names, comma-separated (default member-N)"
    )
    p.add_argument("--command", default="", help="the command that trained it (provenance)")
    p.add_argument("--note", default="", help="free text: data, licence, evaluation")
    p.add_argument(
        "--max-mb", type=float, default=10.0, help="refuse a bundle (each member) larger than this"
    )
    args = p.parse_args(argv)
    import torch

    from cellmodel import storage
    from cellmodel.models import CheckpointError, load_checkpoint, save_checkpoint
    from cellmodel.models.checkpoint import ENSEMBLE_FILE, check_member_names, write_ensemble

    sources = args.checkpoint
    ensemble = len(sources) > 1
    names = [n.strip() for n in args.names.split(",")] if args.names else []
    if not ensemble and names:
        print("error: --names is for an ensemble (two or more --checkpoint)", file=sys.stderr)
        return 2
    if ensemble:
        names = names or [f"member-{i + 1}" for i in range(len(sources))]
        if len(names) != len(sources):
            print(f"error: --names gives {len(names)} names for {len(sources)} --checkpoint",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            check_member_names(storage.join(args.out, ENSEMBLE_FILE), names)
        except CheckpointError as e:
            print(f"error: --names: {e}", file=sys.stderr)
            return 2
    try:
        loaded = [load_checkpoint(c) for c in sources]  # every source read before any write
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = [storage.join(args.out, n) for n in names] if ensemble else [args.out]
    for src, out, (model, meta) in zip(sources, outs, loaded):
        extra = dict(meta.get("extra", {}))
        extra["bundle"] = {
            "from": src,
            "from_weights_sha256": meta.get("weights_sha256"),
            "command": args.command,
            "note": args.note,
            "dtype": "float16",
        }
        save_checkpoint(model, out, metrics=meta.get("metrics"), extra=extra,
                        data=meta.get("data"), dtype=torch.float16)  # fmt: skip
        size = len(storage.read_bytes(storage.join(out, "model.safetensors"))) / 2**20
        if size > args.max_mb:
            print(f"error: the bundle's weights are {size:.1f} MiB, over --max-mb {args.max_mb}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"bundled {meta['model_name']} ({size:.2f} MiB of float16 weights) to {out}")
    if ensemble:
        try:
            write_ensemble(args.out, names, command=args.command, note=args.note)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"ensemble of {len(names)} ({', '.join(names)}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
