"""Draw the feature maps of one image (like the paper's Figures 7 and 8).

    python -m jobs.featuremaps --checkpoint CKPT_URI --image IMAGE --out maps.png
        [--layers conv1,block2.rep.0,...] [--channels 8] [--branch 0]

By default: the CNN branch's first convolution and three later stages, evenly spaced.
``--list`` prints the layers that would be drawn and exits.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.featuremaps", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", help="image path or URI")
    p.add_argument("--out", help="PNG path or URI to write")
    p.add_argument("--layers", help="comma-separated module names inside the CNN branch")
    p.add_argument("--channels", type=int, default=8, help="channels per layer (default: 8)")
    p.add_argument("--branch", type=int, default=0, help="CNN branch index (default: 0)")
    p.add_argument("--list", action="store_true", help="print the default layers and exit")
    args = p.parse_args(argv)

    from cellmodel import storage
    from cellmodel.data.transforms import ImageDecodeError
    from cellmodel.evaluate import feature_layers, feature_maps_png
    from cellmodel.models import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(args.checkpoint)
        if args.list:
            print("\n".join(feature_layers(model, args.branch)))
            return 0
        if not args.image or not args.out:
            raise ValueError("give --image and --out (or --list)")
        try:
            image = storage.read_bytes(args.image)
        except FileNotFoundError as e:
            raise ValueError(f"image not found: {args.image}") from e
        layers = args.layers.split(",") if args.layers else None
        png = feature_maps_png(
            model, image, layers=layers, channels=args.channels, branch=args.branch
        )
        try:
            storage.write_bytes(args.out, png)
        except OSError as e:
            raise ValueError(f"cannot write {args.out} ({e}); choose a writable path") from e
    except (CheckpointError, ImageDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
