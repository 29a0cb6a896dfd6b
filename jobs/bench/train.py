"""Training throughput: a plain in-process step vs Ray Train (1 and 2 workers), same model.

    python -m jobs.bench train [--data URI] [--config TOML] [--model tiny_bilstm]
        [--input 120x160] [--batch-size 32] [--repeats 3] [--per-class 40] [--skip-ray]

(a) the plain step: ``PhaseTrainer`` over decoded images kept in memory (what ``jobs.train
--local`` runs), NCHW and channels-last; (b) Ray Train with 1 worker, (c) with 2 workers:
phase-2 training images/s (every weight trains), same model, batch and data, all in one run.
Each figure is the median (and spread) over ``--repeats`` epochs after the first (the first
decodes the shards and warms up). Then phase-1 epoch time with the CNN frozen, without and
with the feature cache. Without ``--data`` the committed sample is ingested first
(``--per-class`` rows per class, augmented copies). ``--config`` starts every run from a
training config (its augmentation, EMA, optimiser, loss), so that the step timed is the one
that config trains with, e.g. ``--config jobs/configs/cpu_proxy.toml --model xception_bilstm
--input 72x96`` for the paper's model at proxy scale; phase 2's settings are the ones timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from jobs.bench._timing import median_spread


def _config(data: str, out: str, name: str, model: str, size, bs: int, epochs: int, cl: str,
            *extra: str, base: str | None = None):  # fmt: skip
    from cellmodel.config import load_config

    return load_config(base, [
        f"data.uri={json.dumps(data)}", f"run.storage={json.dumps(out)}", f"run.name={name}",
        f"model.name={model}", f"model.overrides.input_size=[3, {size[0]}, {size[1]}]",
        f"data.batch_size={bs}", "phase1.epochs=0", f"phase2.epochs={epochs}",
        "phase2.lr=1e-3", f"phase2.channels_last={cl}", "run.max_failures=0", *extra,
    ])  # fmt: skip


def _rates(history: list[dict]) -> list[float]:
    """Images/s of every epoch but the first (decoding and warm-up)."""
    return [r["images_per_s"] for r in history[1:]] or [history[-1]["images_per_s"]]


def plain(cfg) -> list[float]:
    from cellmodel.train import run_local

    return _rates(run_local(cfg, device="cpu").history)


def ray_train(cfg, workers: int) -> list[float]:
    from cellmodel.train import run_training

    cfg.scaling.num_workers = workers
    cfg.scaling.cpus_per_worker = max(1, (os.cpu_count() or 2) // workers)
    return _rates(run_training(cfg).history)


def phase1_cache(data: str, out: str, model: str, size, bs: int, epochs: int,
                 base: str | None = None) -> dict:  # fmt: skip
    """Seconds per phase-1 epoch, frozen CNN each epoch vs the feature cache."""
    from cellmodel.train import run_local

    got = {}
    for cached in (False, True):
        cfg = _config(data, out, f"p1-{cached}", model, size, bs, 0, "off",
                      f"phase1.epochs={epochs}", f"phase1.feature_cache={str(cached).lower()}",
                      "phase1.freeze_cnn=true", base=base)  # fmt: skip
        hist = run_local(cfg, device="cpu").history
        got[cached] = median_spread([r["epoch_s"] for r in hist[1:]] or [hist[-1]["epoch_s"]])
        if cached:
            got["cache_build_s"] = hist[0].get("cache_build_s")
    return got


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", help="shard dataset (default: ingest the committed sample)")
    p.add_argument("--config", help="training config every run starts from (default: defaults)")
    p.add_argument("--per-class", type=int, default=40, help="sample rows per class (no --data)")
    p.add_argument("--model", default="tiny_bilstm")
    p.add_argument("--input", default="120x160", help="HEIGHTxWIDTH of the model input")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs (after a warm-up one)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-ray", action="store_true", help="only the plain step and the cache")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    size = tuple(int(v) for v in args.input.lower().split("x"))
    epochs, bs = max(args.repeats, 1) + 1, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from cellmodel.data.ingest import ingest

            data = os.path.join(tmp, "shards")
            ingest("data/sample/crops", data, target_per_class=args.per_class, progress=False, workers=1,
                   group="file")  # fmt: skip
        out = os.path.join(tmp, "runs")
        print(f"model {args.model} at {size[0]}x{size[1]}, batch {bs}, median of {epochs - 1} "
              f"epoch(s) after a warm-up one, torch threads {torch.get_num_threads()}")  # fmt: skip
        rows = {}
        for cl in ("off", "on"):
            rows[f"plain, {'channels-last' if cl == 'on' else 'NCHW'}"] = median_spread(
                plain(_config(data, out, f"plain-{cl}", args.model, size, bs, epochs, cl,
                             base=args.config)))  # fmt: skip
        best_cl = max(
            ("off", "on"),
            key=lambda c: rows[f"plain, {'channels-last' if c == 'on' else 'NCHW'}"].median,
        )
        best = max(r.median for r in rows.values())
        if not args.skip_ray:
            for w in (1, 2):
                cfg = _config(data, out, f"ray-{w}w", args.model, size, bs, epochs, best_cl,
                              base=args.config)  # fmt: skip
                rows[f"Ray Train, {w} worker(s), {'channels-last' if best_cl == 'on' else 'NCHW'}"] = median_spread(ray_train(cfg, w))  # fmt: skip
        print(f"{'':45s} {'img/s':>8s} {'spread':>8s}  vs best plain")
        for name, t in rows.items():
            print(f"{name:45s} {t.median:8.1f} {t.spread:8.1f}  {t.median / best:5.2f}x")
        c = phase1_cache(data, out, args.model, size, bs, epochs, base=args.config)
        print(f"phase-1 epoch: {c[False].median:.3f} s without the feature cache, "
              f"{c[True].median:.3f} s with it ({c[False].median / c[True].median:.1f}x faster); "
              f"building the cache once: {c['cache_build_s']} s")  # fmt: skip
    return 0
