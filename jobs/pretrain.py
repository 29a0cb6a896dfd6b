"""Pretrain a model's CNN branch without labels (domain weights) for ``model.pretrained``.

    python -m jobs.pretrain --config jobs/configs/pretrain.toml [section.key=value ...]
    python -m jobs.train --local --config jobs/configs/bundled.toml \\
        'model.pretrained=["runs/pretrain/branch0-mobilenetv3_large_100.safetensors"]'

Reads the dataset's training split (labels ignored) and, with ``slides.uri``, windows of the
slides no held-out cell was cut from; writes one weights file per CNN branch and
``pretrain.json`` under ``run.storage/run.name``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", required=True, help="TOML pretraining config (jobs/configs/pretrain.toml)"
    )
    p.add_argument(
        "overrides", nargs="*", help="section.key=value settings that replace the file's"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda when present, else cpu)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel.config import ConfigError, to_toml
    from cellmodel.data.dataset import DatasetNotFoundError
    from cellmodel.infer.slides import SlidesError
    from cellmodel.models import WeightsError
    from cellmodel.train.pretrain import load_pretrain_config, run_pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = load_pretrain_config(args.config, args.overrides)
        if args.print_config:
            print(to_toml(cfg))
            return 0
        record = run_pretrain(cfg, device=args.device)
    except (ConfigError, DatasetNotFoundError, SlidesError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = record["history"][-1]
    files = [w["uri"] for w in record["weights"]]
    print(
        f"pretrained {record['epochs_done']} epochs on {record['images']} images: loss "
        f"{last['loss']:.4f}, positive found {100 * last['positive_acc']:.1f} %\n"
        f"weights: {', '.join(files)}\n"
        f"train on them with: model.pretrained={json.dumps(files)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
