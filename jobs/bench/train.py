"""Training throughput: plain PyTorch vs Ray Train (1 and 2 workers), and the phase-1 cache.

    python -m jobs.bench train [--data URI] [--model tiny_bilstm] [--epochs 2] [--batch-size 32]

(a) a plain PyTorch loop (``iter_split`` decoding in the loop's process), (b) Ray Train with
1 worker, (c) 2 workers: phase-2 training images/s (all weights train), same model and batch,
all in one run. Then phase-1 epoch time with the CNN frozen, without and with the feature
cache (the one-off cost of building the cache is printed too). Without ``--data`` the
committed sample is ingested to a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def _plain_epochs(data: str, model_name: str, epochs: int, bs: int) -> float:
    """Images/s of phase-2 training in one process, decoding included; the first epoch warms up."""
    from cellmodel.config import PhaseSection
    from cellmodel.data.dataset import iter_split
    from cellmodel.models import build_model
    from cellmodel.train import make_loss, make_optimizer, train_epoch

    torch.manual_seed(0)
    model = build_model(model_name)
    opt = make_optimizer(model.parameters(), PhaseSection(optimizer="adam", lr=1e-3))
    rate = 0.0
    for e in range(epochs):
        batches = (((torch.from_numpy(x),), torch.from_numpy(y))
                   for x, y in iter_split(data, "train", model.cfg, bs, shuffle=True, seed=e))  # fmt: skip
        t0 = time.perf_counter()
        m = train_epoch(model, batches, opt, make_loss(0.1), device=torch.device("cpu"))
        rate = m["n"] / (time.perf_counter() - t0)
    return rate


def _ray_epochs(data: str, model_name: str, epochs: int, bs: int, workers: int, out: str) -> float:
    """Images/s of Ray Train's phase 2 (the last epoch's figure from the run history)."""
    from cellmodel.config import load_config
    from cellmodel.train import run_training

    cfg = load_config(None, [
        f"data.uri={json.dumps(data)}", f"run.storage={json.dumps(out)}",
        f"run.name=bench-{workers}w", f"model.name={model_name}", f"data.batch_size={bs}",
        "phase1.epochs=0", f"phase2.epochs={epochs}", "phase2.lr=1e-3",
        f"scaling.num_workers={workers}", "run.max_failures=0",
    ])  # fmt: skip
    return run_training(cfg).history[-1]["images_per_s"]


def _phase1_cache(data: str, model_name: str, epochs: int, bs: int) -> dict:
    """Seconds per phase-1 epoch, decoding + frozen CNN each epoch vs the feature cache."""
    from cellmodel.config import PhaseSection
    from cellmodel.data.dataset import iter_split
    from cellmodel.models import build_model
    from cellmodel.train import CachedForward, build_cache, make_loss, make_optimizer, train_epoch

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(model_name)
    model.freeze_cnn()
    phase = PhaseSection(optimizer="rmsprop", lr=1e-3)

    def batches(seed):
        for x, y in iter_split(data, "train", model.cfg, bs, shuffle=True, seed=seed):
            yield (torch.from_numpy(x),), torch.from_numpy(y)

    opt = make_optimizer(model.parameters(), phase)
    t_plain = []
    for e in range(epochs):
        t0 = time.perf_counter()
        train_epoch(model, batches(e), opt, make_loss(0.1), device=cpu)
        t_plain.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cache = build_cache(model, ((x, y) for (x,), y in batches(0)), device=cpu)
    build_s = time.perf_counter() - t0
    net = CachedForward(model)
    opt = make_optimizer(net.parameters(), phase)
    t_cached = []
    for e in range(epochs):
        t0 = time.perf_counter()
        train_epoch(net, cache.batches(bs, shuffle=True, seed=e), opt, make_loss(0.1), device=cpu)
        t_cached.append(time.perf_counter() - t0)
    return {
        "epoch_s_uncached": min(t_plain),
        "epoch_s_cached": min(t_cached),
        "cache_build_s": build_s,
        "cache_mb": cache.nbytes / 2**20,
        "rows": len(cache),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.bench train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", help="shard dataset (default: ingest the committed sample)")
    p.add_argument("--model", default="tiny_bilstm")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (first warms up)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-ray", action="store_true", help="only the plain loop and the cache")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from cellmodel.data.ingest import ingest

            data = os.path.join(tmp, "shards")
            ingest("data/sample/crops", data, target_per_class=40, progress=False, workers=1)
        ep, bs = max(args.epochs, 1), args.batch_size
        print(f"model {args.model}, batch {bs}, {ep} epoch(s) per figure, torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        plain = _plain_epochs(data, args.model, ep, bs)
        print(f"(a) plain PyTorch loop      {plain:8.1f} img/s   1.00x")
        if not args.skip_ray:
            for w, label in ((1, "(b) Ray Train, 1 worker "), (2, "(c) Ray Train, 2 workers")):
                r = _ray_epochs(data, args.model, ep, bs, w, os.path.join(tmp, "runs"))
                print(f"{label}   {r:8.1f} img/s   {r / plain:4.2f}x")
        c = _phase1_cache(data, args.model, ep, bs)
        print(
            f"phase-1 epoch ({c['rows']} rows): {c['epoch_s_uncached']:.3f} s without the cache, "
            f"{c['epoch_s_cached']:.3f} s with it ({c['epoch_s_uncached'] / c['epoch_s_cached']:.1f}x"
            f" faster); building the cache once: {c['cache_build_s']:.3f} s, {c['cache_mb']:.1f} MiB"
        )
    return 0
