"""Train a model in two phases on Ray Train, from Parquet shards, locally or on a cluster.

    python -m jobs.train --config jobs/configs/quickstart.toml [section.key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config jobs/configs/paper.toml

Overrides are ``section.key=value`` with TOML values (bare words are strings), e.g.
``model.name=resnet50_bilstm phase1.epochs=5 scaling.num_workers=4 run.name=try2``.
Running the same run name again resumes it from its latest checkpoint. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description=__doc__.split("\n")[0],
        epilog="overrides: section.key=value, e.g. model.name=resnet50 phase1.epochs=3",
    )
    p.add_argument("--config", required=True, help="TOML run config (see jobs/configs/)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value settings that replace the file's"
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="train in this process without Ray (one device: a single GPU, or a laptop's CPU)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel.config import ConfigError, load_config
    from cellmodel.data.dataset import DatasetNotFoundError
    from cellmodel.models import CheckpointError, WeightsError

    try:
        cfg = load_config(args.config, args.overrides)
        cfg.build_model_config()  # an unknown model or override fails here, before Ray starts
        if args.print_config:
            print(cfg.to_toml())
            return 0
        from cellmodel.train import run_local, run_training

        result = run_local(cfg) if args.local else run_training(cfg)
    except (ConfigError, DatasetNotFoundError, CheckpointError, WeightsError) as e:
        # A user's mistake: one line that says what to fix, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"error: cannot write the run directory ({e}); pick a writable run.storage", file=sys.stderr)  # fmt: skip
        return 2
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; show the cause in one line
        if type(e).__name__ in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            print(f"error: training failed: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 1
        raise
    m = result.metrics
    print(
        f"best epoch {m['epoch']} (phase {m['phase']}): val_loss {m['val_loss']:.4f} "
        f"val_acc {m['val_acc']:.4f}\nrun directory: {result.run_dir}\nmodel: {result.model_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
