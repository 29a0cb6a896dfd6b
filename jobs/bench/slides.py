"""Slide job throughput: ``python -m jobs.bench slides [--model NAME --n N ...]``.

Measures, in one run and on one machine:

- model only: ``Predictor.predict_arrays`` on preprocessed batches (images/s, median of
  ``--model-batches`` batches), the baseline, before and after the end-to-end runs;
- finder only: decode + find + cut per slide in this process (slides/s), and the finder
  alone (find_cells on decoded slides) and the red-cell scale estimate alone (median of
  ``--repeats`` passes over the slides);
- with ``--finder-weights URI``: the learned finder alone too (``find_cells`` with
  ``method = "learned"``, one thread, on the same decoded slides; its ratio to the stain
  finder measured in the same run), and the end-to-end runs use it;
- end to end: ``run_slides`` on a local Ray instance, from slide files to committed
  Parquet parts (slides/s and cells/s), including actor start-up and checkpoint loading;
  one job run of n/4 and one of n slides (their difference is the steady state).

Timings go through ``jobs/bench/_timing`` like every bench.

The checkpoint holds random weights of ``--model``: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from cellmodel.cluster import ensure_ray
from jobs.bench._timing import Timing, measure, per_second

DEFAULT_SLIDES = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "bccd" / "JPEGImages"
)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench slides", description=__doc__)
    ap.add_argument("--slides", default=str(DEFAULT_SLIDES.resolve()), help="folder of slides")
    ap.add_argument("--model", default="tiny_bilstm", help="model variant (random weights)")
    ap.add_argument("--n", type=int, default=96, help="slides for the end-to-end run")
    ap.add_argument("--batch-size", type=int, default=16, help="cells per model batch")
    ap.add_argument("--concurrency", type=int, default=1, help="classifier actors")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--backend", default="eager", help="Predictor backend: eager, onnx, auto")
    ap.add_argument("--model-batches", type=int, default=5, help="batches for model-only timing")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of the finder parts")
    ap.add_argument(
        "--train-rbc-px", type=float, default=37.0, help="training red-cell diameter (cut scale)"
    )
    ap.add_argument(
        "--finder-weights",
        help="also time the learned finder with these weights (jobs.train_finder), and use "
        "it end to end",
    )
    args = ap.parse_args(argv)

    from cellmodel.infer.slides import list_slides

    slides = list_slides(args.slides)[: args.n]
    with tempfile.TemporaryDirectory(prefix="bench-slides-") as tmp:
        return _bench(args, slides, tmp)


def _bench(args: argparse.Namespace, slides: list[tuple[str, str]], tmp: str) -> int:
    import ray
    import torch

    from cellmodel.data.scale import crop_window, estimate_rbc_diameter
    from cellmodel.data.transforms import decode_image
    from cellmodel.data.voc import CROP_SIZE
    from cellmodel.infer.finder import FinderConfig, find_cells
    from cellmodel.infer.predictor import Predictor
    from cellmodel.infer.slides import SlidesConfig, cut_cell, run_slides
    from cellmodel.models import build_model, save_checkpoint

    ckpt = save_checkpoint(
        build_model(args.model),
        os.path.join(tmp, "ckpt"),
        data={"rbc_diameter_px": args.train_rbc_px},
    )

    # Baseline: the model alone on ready-made input, one thread like one Ray actor (Ray
    # sets OMP_NUM_THREADS=1 in a 1-CPU worker). Timed before and after the end-to-end
    # run, since the machine is shared and its load drifts.
    torch.set_num_threads(1)
    kw = {"backend": args.backend} if args.backend != "eager" else {}
    pred = Predictor(ckpt, device="cpu", **kw)
    x = np.random.default_rng(0).standard_normal((args.batch_size, *pred.cfg.input_size))
    x = x.astype(np.float32)
    pred.predict_arrays(x)  # warm-up

    def model_only() -> Timing:
        t = measure(lambda: pred.predict_arrays(x), repeats=args.model_batches, warmup=0)
        return per_second(args.batch_size, t)

    model_before = model_only()

    # The finder alone (one process, one thread: "per core" figures), on the same slides:
    # decode + find + cut, then the finder and the red-cell scale estimate on decoded slides.
    def finder_pass() -> None:
        for _, uri in slides:
            img = decode_image(Path(uri).read_bytes())
            dets = find_cells(img)
            if dets:
                window = crop_window(CROP_SIZE, estimate_rbc_diameter(img), args.train_rbc_px)
                for d in dets:
                    cut_cell(img, d.center, window, CROP_SIZE, "inside")

    imgs = [decode_image(Path(uri).read_bytes()) for _, uri in slides]
    n = len(slides)
    finder = per_second(n, measure(finder_pass, repeats=args.repeats, warmup=0))
    find_only = per_second(n, measure(lambda: [find_cells(i) for i in imgs], args.repeats, 0))
    scale_only = per_second(
        n, measure(lambda: [estimate_rbc_diameter(i) for i in imgs], args.repeats, 0)
    )
    learned = None
    finder_section: dict = {}
    if args.finder_weights:
        finder_section = {"method": "learned", "weights": args.finder_weights}
        lcfg = FinderConfig(**finder_section)
        find_cells(imgs[0], lcfg)  # load the weights once, outside the timing
        learned = per_second(
            n, measure(lambda: [find_cells(i, lcfg) for i in imgs], args.repeats, 0)
        )
    imgs.clear()  # free the decoded slides before the Ray runs

    # End to end on a local Ray instance (start-up of Ray itself is not counted).
    ensure_ray(num_cpus=args.num_cpus, quiet=True)
    cfg = SlidesConfig.model_validate(
        {
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "slides_per_part": 16,
            "backend": args.backend,
            "finder": finder_section,
        }
    )
    # Two runs, n/4 and n slides: the difference removes start-up (actors importing
    # torch and loading the checkpoint) and gives the steady-state rate.
    small = run_slides(
        args.slides, ckpt, os.path.join(tmp, "small"), cfg, limit=args.n // 4, progress=False
    )
    summary = run_slides(
        args.slides, ckpt, os.path.join(tmp, "out"), cfg, limit=args.n, progress=False
    )
    ray.shutdown()
    model_after = model_only()
    model_ips = (model_before.median + model_after.median) / 2
    e2e_sps = summary["n_slides"] / summary["seconds"]
    extra_s = summary["seconds"] - small["seconds"]
    steady_sps = (summary["n_slides"] - small["n_slides"]) / extra_s if extra_s > 0 else None
    result = {
        "model": args.model,
        "backend": args.backend,
        "slides": summary["n_slides"],
        "cells": summary["n_cells"],
        "model_only_images_per_s": round(model_ips, 2),
        "model_only_before_after": [round(model_before.median, 2), round(model_after.median, 2)],
        "model_only_spread_before_after": [
            round(model_before.spread, 2),
            round(model_after.spread, 2),
        ],
        "finder_only_slides_per_s": round(finder.median, 2),
        "finder_only_spread": round(finder.spread, 2),
        "find_cells_slides_per_s": round(find_only.median, 2),
        "rbc_scale_slides_per_s": round(scale_only.median, 2),
        "finder_end_to_end": "learned" if learned else "stain",
        "in_process_repeats": args.repeats,
        "end_to_end_slides_per_s": round(e2e_sps, 3),
        "end_to_end_cells_per_s": round(summary["n_cells"] / summary["seconds"], 3),
        "end_to_end_seconds": summary["seconds"],
        "end_to_end_vs_model_only": round(e2e_sps / model_ips, 3),
        "steady_slides_per_s": steady_sps and round(steady_sps, 3),
        "steady_vs_model_only": steady_sps and round(steady_sps / model_ips, 3),
        "ray_cpus": args.num_cpus,
        **(
            {
                "learned_find_cells_slides_per_s": round(learned.median, 2),
                "learned_vs_stain_find_cells": round(learned.median / find_only.median, 3),
            }
            if learned
            else {}
        ),
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
    }
    print(json.dumps(result, indent=2))
    return 0
