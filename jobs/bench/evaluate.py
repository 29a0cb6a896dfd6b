"""``python -m jobs.bench evaluate``: evaluation throughput, decode threads 1 vs N.

Scores a random-weight checkpoint on the first ``--per-class`` images of each class folder of
``--data`` (default: the full blood-cells TRAIN set) and reports images/s for each setting,
as a ratio against one decode thread measured in the same run (runs alternate to share noise).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from cellmodel.evaluate.data import ClassFolders
from cellmodel.evaluate.run import predict_data
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, save_checkpoint
from jobs.bench._timing import median_spread

DEFAULT_DATA = "/work/shared/data/blood-cells/TRAIN"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench evaluate", description=__doc__)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--model", default="tiny_bilstm")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(build_model(a.model), tmp)
        predictor = Predictor(tmp, device="cpu")
    data = ClassFolders(a.data, predictor.classes)
    per: dict[int, int] = {}
    keep = []
    for item in data.items:  # the first N of each class, in listing order
        if per.get(item[2], 0) < a.per_class:
            per[item[2]] = per.get(item[2], 0) + 1
            keep.append(item)
    data.items = keep
    print(
        f"{time.strftime('%Y-%m-%d')} {platform.machine()} torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {a.model}, {len(keep)} images, batch {a.batch_size}"
    )
    predict_data(predictor, data, a.batch_size, workers=max(a.workers))  # warm-up: file cache
    rates: dict[int, list[float]] = {w: [] for w in a.workers}
    for _ in range(a.repeats):  # interleaved, so that load changes hit every setting alike
        for w in a.workers:
            t = time.perf_counter()
            predict_data(predictor, data, a.batch_size, workers=w)
            rates[w].append(len(keep) / (time.perf_counter() - t))
    got = {w: median_spread(r) for w, r in rates.items()}
    base = got[a.workers[0]].median
    print(f"| decode threads | images/s (median ± spread of {a.repeats}) | ratio |")
    print("|---|---|---|")
    for w in a.workers:
        print(f"| {w} | {got[w].median:.1f} ± {got[w].spread:.1f} | {got[w].median / base:.2f}x |")
    return 0
