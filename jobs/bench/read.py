"""Read+decode throughput next to training consumption: ``python -m jobs.bench read``.

For each model: images/s of a training step (forward, backward, optimizer step) on this
machine, measured in the same run as the baseline; then images/s of reading one split
back, decoded and normalised with the model's preprocessing, through Ray Data
(``read_split``) and the plain iterator (``iter_split``), from a local folder and from a
local S3 server. A ratio above 1 means the reader keeps the model fed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from cellmodel.cluster import ensure_ray
from jobs.bench._timing import Timing, measure, median_spread, per_second
from jobs.bench.ingest import DEFAULT_TRAIN, crop_subset, start_s3


def train_rate(name: str, batch: int, steps: int) -> Timing:
    """Images/s of full training steps of ``name`` on random input (CPU): median of
    ``steps`` timed steps after a warm-up one."""
    import torch

    from cellmodel.models import build_model

    model = build_model(name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *model.cfg.input_size)
    y = torch.randint(0, model.cfg.num_classes, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    t = measure(step, repeats=steps, warmup=1)  # warm-up: allocations, kernel selection
    return per_second(batch, t)


def _passes(fn, repeats: int) -> Timing:
    """Items/s of ``fn`` (which returns the items it read): median over ``repeats`` passes."""
    rates = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return median_spread(rates)


def ray_rate(uri: str, cfg, batch: int, repeats: int = 3) -> Timing:
    """Images/s over the train split, after a pass over val has started Ray's workers."""
    from cellmodel.data.dataset import read_split

    for _ in read_split(uri, "val", cfg).iter_batches(batch_size=batch):
        pass

    def one() -> int:
        ds = read_split(uri, "train", cfg)
        return sum(len(b["label"]) for b in ds.iter_batches(batch_size=batch, batch_format="numpy"))

    return _passes(one, repeats)


def plain_rate(uri: str, cfg, batch: int, repeats: int = 3) -> Timing:
    from cellmodel.data.dataset import iter_split

    def one() -> int:
        return sum(len(y) for _, y in iter_split(uri, "train", cfg, batch_size=batch, shuffle=True))

    return _passes(one, repeats)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench read", description=__doc__)
    p.add_argument("--source", type=Path, default=DEFAULT_TRAIN, help="crop folder to ingest")
    p.add_argument("--per-class", type=int, default=250, help="files per class (0: all)")
    p.add_argument("--models", default="tiny_bilstm,xception_bilstm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per reader")
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: source {args.source} is not a folder; pass --source")
        return 2
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import ray

    from cellmodel.data.ingest import ingest
    from cellmodel.models import model_config

    source = crop_subset(args.source, args.per_class or None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-read-"))
    targets = [("local", str(tmp / "ds"))]
    server = None
    if not args.no_s3:
        server, bucket = start_s3()
        targets.append(("s3", f"{bucket}/ds"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, uri in targets:
            m = ingest(str(source), uri, progress=False, group="file")
    rows = m["splits"]["train"]["rows"]
    ensure_ray(quiet=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"train split: {rows} rows from {args.source}; batch {args.batch}")
    for name in args.models.split(","):
        cfg = model_config(name)
        consume = train_rate(name, args.batch, args.steps).median
        print(f"{name} {tuple(cfg.input_size)}: training step {consume:8.1f} img/s (1.00x)")
        for where, uri in targets:
            ray_r = ray_rate(uri, cfg, args.batch, args.repeats)
            plain_r = plain_rate(uri, cfg, args.batch, args.repeats)
            print(
                f"  read+decode {where:5s} Ray Data {ray_r.median:8.1f} ± {ray_r.spread:.1f} img/s "
                f"({ray_r.median / consume:6.2f}x)   plain iterator {plain_r.median:8.1f} ± "
                f"{plain_r.spread:.1f} img/s ({plain_r.median / consume:6.2f}x)"
            )
    ray.shutdown()
    if server is not None:
        server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if source != args.source:
        shutil.rmtree(source, ignore_errors=True)
    return 0
