"""Bundle a checkpoint for shipping: float16 weights (half the size), provenance in the JSON.

    python -m jobs.bundle --checkpoint runs/gpu_scratch/model --out models/bundled \\
        --command "python -m jobs.train --local --config jobs/configs/gpu_scratch.toml model.name=compact_bilstm"

The bundle is an ordinary checkpoint folder (``model.safetensors`` + ``checkpoint.json``):
every consumer loads it as usual, casting the weights back to float32. ``checkpoint.json``
gains a ``bundle`` entry: the training command, the source checkpoint's metrics and digest.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bundle", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (local or URI)")
    p.add_argument("--out", required=True, help="folder to write the bundle to")
    p.add_argument("--command", default="", help="the command that trained it (provenance)")
    p.add_argument("--note", default="", help="free text: data, licence, evaluation")
    p.add_argument("--max-mb", type=float, default=10.0, help="refuse a bundle larger than this")
    args = p.parse_args(argv)
    import torch

    from cellmodel import storage
    from cellmodel.models import CheckpointError, load_checkpoint, save_checkpoint

    try:
        model, meta = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = dict(meta.get("extra", {}))
    extra["bundle"] = {
        "from": args.checkpoint,
        "from_weights_sha256": meta.get("weights_sha256"),
        "command": args.command,
        "note": args.note,
        "dtype": "float16",
    }
    save_checkpoint(model, args.out, metrics=meta.get("metrics"), extra=extra,
                    data=meta.get("data"), dtype=torch.float16)  # fmt: skip
    size = len(storage.read_bytes(storage.join(args.out, "model.safetensors"))) / 2**20
    if size > args.max_mb:
        print(f"error: the bundle's weights are {size:.1f} MiB, over --max-mb {args.max_mb}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"bundled {meta['model_name']} ({size:.2f} MiB of float16 weights) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
