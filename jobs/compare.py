"""Train and evaluate the paper's Table 1 variants under one protocol; write a comparison table.

    python -m jobs.compare --config jobs/configs/paper.toml [--models ...] [--seeds 0 1 2]
        [--eval-data PATH_OR_URI] [--out DIR] [section.key=value ...]

Every variant is trained with the same config (only ``model.name``, ``run.name`` and
``run.seed`` change), then scored on the same data: the config's validation split, or
``--eval-data`` (a class-folder tree such as a TEST split, or a shard dataset). Runs are
named ``<config run name>-<model>-s<seed>``: a finished run is not trained again, and an
interrupted one resumes. Writes ``comparison.md`` and ``comparison.json`` into ``--out``,
next to the accuracies the paper reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

# Table 1 of Liang et al. (IEEE Access 2018): 4-class accuracy (%) on the official TEST split.
PAPER_ACCURACY = {
    "inception_v3": 84.08,
    "resnet50": 87.62,
    "xception": 88.70,
    "inception_v3_bilstm": 87.45,
    "resnet50_bilstm": 89.38,
    "xception_bilstm": 90.79,
    "xception_resnet50_bilstm": 88.58,
}
TABLE1 = list(PAPER_ACCURACY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="TOML run config shared by every variant")
    p.add_argument("--models", nargs="+", default=TABLE1, help="variants (default: Table 1's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    p.add_argument("--eval-data", default=None, help="data to score on (default: the val split)")
    p.add_argument("--split", default=None, help="split of a shard dataset to score on")
    p.add_argument("--out", default="runs/compare", help="folder for comparison.md/.json")
    p.add_argument("overrides", nargs="*", help="section.key=value settings for every run")
    return p.parse_args(argv)


def run_one(config: str, overrides: list[str], model: str, seed: int, args) -> dict:
    """Train (or reuse) one run and evaluate its best checkpoint; returns its figures."""
    from cellmodel import storage
    from cellmodel.config import load_config
    from cellmodel.evaluate import evaluate_checkpoint
    from cellmodel.train import run_training

    base = load_config(config, overrides)
    name = f"{base.run.name}-{model}-s{seed}"
    cfg = load_config(
        config, [*overrides, f"model.name={model}", f"run.name={name}", f"run.seed={seed}"]
    )
    summary_uri = storage.join(cfg.run_dir, "summary.json")
    if storage.exists(summary_uri):
        summary = json.loads(storage.read_bytes(summary_uri))
        model_uri, best = summary["model_uri"], summary["best_metrics"]
        print(f"[{name}] already trained; reusing {model_uri}")
    else:
        result = run_training(cfg)
        model_uri, best = result.model_uri, result.metrics
    data = args.eval_data or cfg.data.uri
    split = args.split or cfg.data.val_split
    m = evaluate_checkpoint(model_uri, data, storage.join(args.out, name), split=split)
    return {
        "model": model,
        "seed": seed,
        "run": name,
        "checkpoint": model_uri,
        "best_epoch": best.get("epoch"),
        "best_phase": best.get("phase"),
        "val_loss": best.get("val_loss"),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m.get("ece"),
        "n": m.get("n_images", m.get("n")),
    }


def summarize(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        accs = [r["accuracy"] * 100 for r in runs if r["model"] == model]
        f1s = [r["macro_f1"] * 100 for r in runs if r["model"] == model]
        if not accs:
            continue
        rows.append(
            {
                "model": model,
                "runs": len(accs),
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "macro_f1_mean": statistics.fmean(f1s),
                "paper_accuracy": PAPER_ACCURACY.get(model),
            }
        )
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | runs | accuracy % (mean ± sd) | macro F1 % | paper accuracy % | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper = r["paper_accuracy"]
        diff = f"{r['accuracy_mean'] - paper:+.2f}" if paper is not None else "-"
        lines.append(
            f"| {r['model']} | {r['runs']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} "
            f"| {r['macro_f1_mean']:.2f} | {paper if paper is not None else '-'} | {diff} |"
        )
    lines += [
        "",
        "Paper figures: Liang et al., IEEE Access 2018, Table 1 (official TEST split, ImageNet-",
        "pretrained CNNs). Ours are only comparable when scored on the same split with the same",
        "kind of initialisation.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cellmodel import storage
    from cellmodel.config import ConfigError
    from cellmodel.data.dataset import DatasetNotFoundError
    from cellmodel.evaluate.data import EvalDataError

    unknown = [m for m in args.models if m not in PAPER_ACCURACY and not _registered(m)]
    if unknown:
        print(f"error: unknown model(s) {unknown}; see python -m cellmodel.models", file=sys.stderr)
        return 2
    runs = []
    try:
        for model in args.models:
            for seed in args.seeds:
                runs.append(run_one(args.config, args.overrides, model, seed, args))
                rows = summarize(runs, args.models)
                header = f"# Comparison under `{args.config}`" + (
                    f" {' '.join(args.overrides)}" if args.overrides else ""
                )
                storage.write_bytes(
                    storage.join(args.out, "comparison.md"), to_markdown(rows, header).encode()
                )
                storage.write_bytes(
                    storage.join(args.out, "comparison.json"),
                    json.dumps({"summary": rows, "runs": runs}, indent=2).encode(),
                )
    except (ConfigError, DatasetNotFoundError, EvalDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(summarize(runs, args.models), "# Comparison"))
    print(f"written to {storage.join(args.out, 'comparison.md')}")
    return 0


def _registered(name: str) -> bool:
    from cellmodel.models import list_models

    return name in list_models()


if __name__ == "__main__":
    sys.exit(main())
