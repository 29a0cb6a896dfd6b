"""Train and evaluate variants under one protocol over several seeds; write a comparison table.

    python -m jobs.compare --config jobs/configs/paper.toml [--models ...] [--seeds 0 1 2]
        [--weights MODEL=URI[,URI]] [--eval-data PATH_OR_URI] [--out DIR] [section.key=value ...]
    python -m jobs.compare --config jobs/configs/cpu_proxy.toml --variant ema="phase2.ema_decay=0.999"
        --variant base="" --seeds 0 1 2 --local --parallel 3

A variant is a model of the paper's Table 1 (``--models``; each may take its own weights
file per CNN branch with ``--weights``) or a named set of overrides (``--variant``, for
recipe ablations). Every run is trained with the same config plus its variant's settings,
then scored on the same data: the config's validation split, or ``--eval-data`` (a
class-folder tree, or a shard dataset). Runs are named ``<run name>-<variant>-s<seed>``: a
finished run is not trained again, an interrupted one resumes. Accuracy is reported per
image and per source cell (vote over its copies) when the data knows its sources, as mean
and standard deviation over seeds. ``--local`` trains in-process (no Ray) and
``--parallel N`` runs N of them at once (e.g. on one large GPU). Writes ``comparison.md``
and ``comparison.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

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
    p.add_argument("--models", nargs="+", default=None, help="variants (default: Table 1's)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='NAME="k=v k=v"',
        help="a named set of overrides (repeatable); replaces --models",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="MODEL=URI[,URI]",
        help="weights files for MODEL's CNN branches, in branch order (repeatable)",
    )
    p.add_argument("--local", action="store_true", help="train in-process, without Ray")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (with --local)")
    p.add_argument("--tta", action="store_true", help="score with test-time augmentation too")
    p.add_argument(
        "--epoch",
        choices=("best", "last"),
        default="best",
        help="score each run's epoch of lowest validation loss (chosen on the validation "
        "split, so optimistic when that split is also what is scored) or its last epoch "
        "(nothing chosen on any split)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="also score each variant's seeds as one ensemble (mean of their probabilities)",
    )
    p.add_argument("--eval-data", default=None, help="data to score on (default: the val split)")
    p.add_argument("--split", default=None, help="split of a shard dataset to score on")
    p.add_argument("--out", default="runs/compare", help="folder for comparison.md/.json")
    p.add_argument("overrides", nargs="*", help="section.key=value settings for every run")
    return p.parse_args(argv)


def variants(args) -> dict[str, list[str]]:
    """``{variant name: its overrides}`` from --variant, or one per --models entry."""
    if args.variant:
        out = {}
        for v in args.variant:
            name, _, rest = v.partition("=")
            if not name.strip():
                raise ValueError(f'--variant {v!r}: give NAME="section.key=value ..."')
            out[name.strip()] = rest.strip().strip('"').split()
        return out
    weights = {}
    for w in args.weights:
        model, _, uris = w.partition("=")
        weights[model] = [u for u in uris.split(",") if u]
    out = {}
    for model in args.models or TABLE1:
        extra = [f"model.name={model}"]
        if model in weights:
            extra.append("model.pretrained=" + json.dumps(weights[model]))
        out[model] = extra
    return out


def run_one(config: str, overrides: list[str], variant: str, extra: list[str], seed: int,
            args) -> dict:  # fmt: skip
    """Train (or reuse) one run and evaluate its best checkpoint; returns its figures."""
    from cellmodel import storage
    from cellmodel.config import load_config
    from cellmodel.evaluate import evaluate_checkpoint
    from cellmodel.evaluate.metrics import cell_records
    from cellmodel.train import run_local, run_training

    base = load_config(config, overrides)
    name = f"{base.run.name}-{variant}-s{seed}"
    cfg = load_config(config, [*overrides, *extra, f"run.name={name}", f"run.seed={seed}"])
    summary_uri = storage.join(cfg.run_dir, "summary.json")
    if storage.exists(summary_uri):
        summary = json.loads(storage.read_bytes(summary_uri))
        model_uri, best = summary["model_uri"], summary["best_metrics"]
        last_uri = summary["last_checkpoint"]
        print(f"[{name}] already trained; reusing {model_uri}")
    else:
        result = run_local(cfg) if args.local else run_training(cfg)
        model_uri, best, last_uri = result.model_uri, result.metrics, result.last_checkpoint
    history = _history(cfg.run_dir)
    if args.epoch == "last":
        model_uri = last_uri
    data = args.eval_data or cfg.data.uri
    split = args.split or cfg.data.val_split
    m = evaluate_checkpoint(model_uri, data, storage.join(args.out, name), split=split)
    tta = None
    if args.tta:
        tta = evaluate_checkpoint(model_uri, data, split=split, tta=True)
    per_source = m.get("per_source") or {}
    return {
        "model": variant,
        "model_name": cfg.model.name,
        "seed": seed,
        "run": name,
        "checkpoint": model_uri,
        "eval_data": data,
        "eval_split": split,
        "scored_epoch": args.epoch,
        "best_epoch": best.get("epoch"),
        "best_phase": best.get("phase"),
        "last_epoch": history[-1].get("epoch") if history else None,
        "val_loss": best.get("val_loss"),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m.get("ece"),
        "n": m.get("n_images", m.get("n")),
        "source_accuracy": per_source.get("vote_accuracy"),
        "cell_balanced_accuracy": per_source.get("cell_balanced_accuracy"),
        "n_sources": per_source.get("n_sources"),
        # 95 % interval of the per-image accuracy from resampling the source cells
        "accuracy_interval": (per_source.get("intervals") or {}).get("accuracy"),
        # per source cell: [images, images right, vote right], for gaps on the same cells
        "cells": cell_records(per_source.get("sources", [])),
        "tta_accuracy": tta["accuracy"] if tta else None,
        "tta_source_accuracy": (tta.get("per_source") or {}).get("vote_accuracy") if tta else None,
        "train_s": sum(r.get("epoch_s", 0) for r in history),
    }


def _history(run_dir: str) -> list[dict]:
    from cellmodel.train.history import read_history

    try:
        return read_history(run_dir)
    except (FileNotFoundError, OSError, ValueError):
        return []


def _mean_sd(values: list) -> tuple[float | None, float | None]:
    vals = [v * 100 for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for model in models:
        accs = [r["accuracy"] * 100 for r in runs if r["model"] == model]
        f1s = [r["macro_f1"] * 100 for r in runs if r["model"] == model]
        if not accs:
            continue
        mine = [r for r in runs if r["model"] == model]
        src_m, src_sd = _mean_sd([r.get("source_accuracy") for r in mine])
        bal_m, bal_sd = _mean_sd([r.get("cell_balanced_accuracy") for r in mine])
        tta_m, tta_sd = _mean_sd([r.get("tta_accuracy") for r in mine])
        cis = [r.get("accuracy_interval") for r in mine]
        spans = [(ci[1] - ci[0]) * 100 for ci in cis if ci]  # none from class folders
        rows.append(
            {
                "model": model,
                "runs": len(accs),
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "source_accuracy_mean": src_m,
                "source_accuracy_std": src_sd,
                "cell_balanced_accuracy_mean": bal_m,
                "cell_balanced_accuracy_std": bal_sd,
                "tta_accuracy_mean": tta_m,
                "tta_accuracy_std": tta_sd,
                "macro_f1_mean": statistics.fmean(f1s),
                "accuracy_interval_widest": max(spans) if spans else None,
                "paper_accuracy": PAPER_ACCURACY.get(mine[0].get("model_name", model))
                if model in PAPER_ACCURACY
                else None,
            }
        )
    return rows


def _cell_matrix(runs: list[dict], cells: list[str], col: int) -> np.ndarray:
    """(runs, cells): column ``col`` of each run's per-cell record."""
    return np.array([[r["cells"][c][col] for c in cells] for r in runs], dtype=float)


def gaps(runs: list[dict], models: list[str]) -> list[dict]:
    """Each variant against the first (the reference), on the cells both were scored on: the
    gap in mean per-image, cell-balanced and vote accuracy (points), with a 95 % interval
    from resampling those cells in pairs (``metrics.paired_gap_intervals``)."""
    from cellmodel.evaluate.metrics import RESAMPLED, paired_gap_intervals

    by = {m: [r for r in runs if r["model"] == m and r.get("cells")] for m in models}
    ref = next((m for m in models if by[m]), None)
    out = []
    for model in models:
        if model == ref or not by[model]:
            continue
        both = by[ref] + by[model]
        cells = sorted(set.intersection(*(set(r["cells"]) for r in both)))
        if not cells:
            continue
        n = _cell_matrix(by[ref][:1], cells, 0)[0]
        g = paired_gap_intervals(
            n,
            _cell_matrix(by[model], cells, 1),
            _cell_matrix(by[model], cells, 2),
            _cell_matrix(by[ref], cells, 1),
            _cell_matrix(by[ref], cells, 2),
        )
        row = {"model": model, "reference": ref, "cells": len(cells)}
        for key in RESAMPLED:
            row[key] = {
                "gap": g[key]["gap"] * 100,
                "interval": [v * 100 for v in g[key]["interval"]],
            }
        out.append(row)
    return out


def gaps_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""

    def cell(v: dict) -> str:
        lo, hi = v["interval"]
        return f"{v['gap']:+.2f} [{lo:+.1f}, {hi:+.1f}]"

    lines = [
        "",
        f"## Gaps to {rows[0]['reference']} on the same cells",
        "",
        "Mean over seeds, variant minus reference, in points; 95 % interval from resampling the "
        "cells both were scored on, in pairs (a cell every run finds hard weighs on both sides). "
        "An interval that holds 0 does not settle which is better on cells like these.",
        "",
        "| variant | cells | per image | cell-balanced | by vote |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cells']} | {cell(r['accuracy'])} "
            f"| {cell(r['cell_balanced_accuracy'])} | {cell(r['vote_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def score_ensembles(runs: list[dict], models: list[str], tta: bool) -> list[dict]:
    """Each variant with two or more finished seeds, scored as one ensemble of them."""
    from cellmodel.evaluate import evaluate_checkpoint

    out = []
    for model in models:
        mine = sorted((r for r in runs if r["model"] == model), key=lambda r: r["seed"])
        if len(mine) < 2:
            continue
        ckpts = [r["checkpoint"] for r in mine]
        data, split = mine[0]["eval_data"], mine[0]["eval_split"]
        m = evaluate_checkpoint(ckpts, data, split=split)
        row = {
            "model": model,
            "seeds": [r["seed"] for r in mine],
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "source_accuracy": (m.get("per_source") or {}).get("vote_accuracy"),
            "cell_balanced_accuracy": (m.get("per_source") or {}).get("cell_balanced_accuracy"),
        }
        if tta:
            t = evaluate_checkpoint(ckpts, data, split=split, tta=True)
            row["tta_accuracy"] = t["accuracy"]
            row["tta_source_accuracy"] = (t.get("per_source") or {}).get("vote_accuracy")
        out.append(row)
    return out


def ensembles_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""

    def pct(v) -> str:
        return f"{v * 100:.2f}" if v is not None else "-"

    lines = [
        "",
        "## Seed ensembles (mean of the seeds' probabilities)",
        "",
        "| variant | seeds | accuracy % | per source cell % | cell-balanced % | with TTA % "
        "| macro F1 % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {' '.join(map(str, r['seeds']))} | {pct(r['accuracy'])} "
            f"| {pct(r['source_accuracy'])} | {pct(r.get('cell_balanced_accuracy'))} "
            f"| {pct(r.get('tta_accuracy'))} "
            f"| {pct(r['macro_f1'])} |"
        )
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | runs | accuracy % (mean ± sd) | per source cell % | cell-balanced % "
        "| with TTA % | macro F1 % | paper accuracy % | difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pm(m, sd) -> str:
        return f"{m:.2f} ± {sd:.2f}" if m is not None else "-"

    for r in rows:
        paper = r["paper_accuracy"]
        diff = f"{r['accuracy_mean'] - paper:+.2f}" if paper is not None else "-"
        lines.append(
            f"| {r['model']} | {r['runs']} | {pm(r['accuracy_mean'], r['accuracy_std'])} "
            f"| {pm(r.get('source_accuracy_mean'), r.get('source_accuracy_std'))} "
            f"| {pm(r.get('cell_balanced_accuracy_mean'), r.get('cell_balanced_accuracy_std'))} "
            f"| {pm(r.get('tta_accuracy_mean'), r.get('tta_accuracy_std'))} "
            f"| {r['macro_f1_mean']:.2f} | {paper if paper is not None else '-'} | {diff} |"
        )
    widest = [r["accuracy_interval_widest"] for r in rows]
    widest = [w for w in widest if w is not None]
    if widest:
        lines += [
            "",
            f"Each run's per-image accuracy has a 95 % interval over its source cells up to "
            f"{max(widest):.1f} points wide (resampling whole cells; per run in "
            "comparison.json): the spread over seeds is training noise only, and gaps between "
            "variants narrower than that interval are not settled by these cells.",
        ]
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
    from cellmodel.config import ConfigError, load_config
    from cellmodel.data.dataset import DatasetNotFoundError
    from cellmodel.evaluate.data import EvalDataError

    unknown = [m for m in args.models or [] if m not in PAPER_ACCURACY and not _registered(m)]
    if unknown:
        print(f"error: unknown model(s) {unknown}; see python -m cellmodel.models", file=sys.stderr)
        return 2
    if args.parallel > 1 and not args.local:
        print("error: --parallel needs --local (Ray Train schedules its own workers)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        todo = variants(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(todo)
    for name in names:  # every variant's model checked before any of them trains
        try:
            load_config(args.config, [*args.overrides, *todo[name]]).build_model_config()
        except ConfigError as e:
            print(f"error: variant {name!r}: {e}", file=sys.stderr)
            return 2
    header = f"# Comparison under `{args.config}`" + (
        f" {' '.join(args.overrides)}" if args.overrides else ""
    )
    header += (
        "\n\nScored: each run's last epoch (nothing chosen on any split)."
        if args.epoch == "last"
        else "\n\nScored: each run's epoch of lowest validation loss (chosen on the validation "
        "split: optimistic where that split is also the one scored)."
    )
    # Seed-major: every variant's first seed runs before any second seed, so a run cut short
    # still compares every variant.
    jobs = [
        (args.config, args.overrides, v, todo[v], seed, args) for seed in args.seeds for v in names
    ]
    runs: list[dict] = []
    failed: list[dict] = []

    def write(ensembles: list[dict] | None = None) -> str:
        """comparison.md and .json as they stand; returns the tables (without ensembles)."""
        ordered = sorted(runs, key=lambda r: (names.index(r["model"]), r["seed"]))
        rows, gap_rows = summarize(ordered, names), gaps(ordered, names)
        tables = to_markdown(rows, header) + gaps_markdown(gap_rows)
        text = tables + ensembles_markdown(ensembles or [])
        storage.write_bytes(storage.join(args.out, "comparison.md"), text.encode())
        body = {"summary": rows, "gaps": gap_rows, "runs": runs, "failed": failed}
        if ensembles is not None:
            body["ensembles"] = ensembles
        storage.write_bytes(
            storage.join(args.out, "comparison.json"), json.dumps(body, indent=2).encode()
        )
        return tables

    def record(run: dict) -> None:
        runs.append(run)
        write()

    try:
        if args.parallel > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("spawn")  # CUDA cannot be forked
            with ProcessPoolExecutor(args.parallel, mp_context=ctx) as pool:
                # Recorded as each finishes: a run stopped at a time limit keeps what is done.
                futures = {pool.submit(run_one, *job): job for job in jobs}
                for fut in as_completed(futures):
                    try:
                        record(fut.result())
                    except (ConfigError, DatasetNotFoundError, EvalDataError):
                        raise
                    except Exception as e:  # noqa: BLE001 - one failed run must not sink the rest
                        _, _, variant, _, seed, _ = futures[fut]
                        failed.append({"model": variant, "seed": seed, "error": repr(e)[:500]})
                        print(f"[{variant} s{seed}] failed: {e!r}", file=sys.stderr)
        else:
            for job in jobs:
                record(run_one(*job))
    except (ConfigError, DatasetNotFoundError, EvalDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The files once more at the end, and the same tables printed (not computed again).
    ens = score_ensembles(runs, names, args.tta) if args.ensemble else None
    print(write(ens))
    if args.ensemble:
        print(ensembles_markdown(ens))
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}", file=sys.stderr)
    print(f"written to {storage.join(args.out, 'comparison.md')}")
    return 0


def _registered(name: str) -> bool:
    from cellmodel.models import list_models

    return name in list_models()


if __name__ == "__main__":
    sys.exit(main())
