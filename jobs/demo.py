"""The quickstart, end to end on one machine: ``make demo`` (or ``python -m jobs.demo``).

1. ingest the bundled sample crops into Parquet shards (``data/shards/sample``);
2. train the tiny two-branch model in two phases on 2 local Ray workers
   (``jobs/configs/quickstart.toml``; a second demo resumes the finished run);
3. evaluate the best checkpoint on the validation split (report, metrics, pictures);
4. classify every white cell on the bundled sample slides and count the differential.

Each step is the same command a user runs on a cluster; see README.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARDS = ROOT / "data" / "shards" / "sample"
CONFIG = ROOT / "jobs" / "configs" / "quickstart.toml"


def step(n: int, text: str) -> float:
    print(f"\n=== {n}. {text}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    from jobs import classify_slides, evaluate, ingest, train

    t0 = step(1, f"ingest {SAMPLE / 'crops'} -> {SHARDS}")
    if (SHARDS / "manifest.json").exists():
        print(f"dataset already at {SHARDS}; keeping it (delete the folder to ingest again)")
    elif rc := ingest.main(["--source", str(SAMPLE / "crops"), "--out", str(SHARDS)]):
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    t0 = step(2, f"train with {CONFIG.relative_to(ROOT)} (tiny_bilstm, 2 Ray workers)")
    run_dir = ROOT / "runs" / "quickstart"
    if rc := train.main(
        ["--config", str(CONFIG), f"run.storage={ROOT / 'runs'}", f"data.uri={SHARDS}"]
    ):
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    model = run_dir / "model"
    report = run_dir / "evaluation"
    t0 = step(3, f"evaluate {model} on the validation split")
    if rc := evaluate.main(
        ["--checkpoint", str(model), "--data", str(SHARDS), "--out", str(report), "--quiet"]
    ):
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    slides_out = run_dir / "slides"
    t0 = step(4, "find and classify the white cells on the sample slides")
    if rc := classify_slides.main(
        [
            "--input", str(SAMPLE / "slides" / "JPEGImages"),
            "--checkpoint", str(model),
            "--output", str(slides_out),
            "--concurrency", "1",
            "--quiet",
        ]
    ):  # fmt: skip
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    print(
        "\nDone. What the demo made:\n"
        f"  run directory      {run_dir}  (config.toml, history.csv/json/png, epoch-*/)\n"
        f"  best checkpoint    {model}\n"
        f"  evaluation report  {report / 'report.md'}  (metrics.json, confusion_matrix.png, ...)\n"
        f"  slide results      {slides_out}  (cells/, slides/, summary.json)\n"
        "The tiny model on 160 sample crops is a smoke test, not a classifier: see\n"
        "BENCHMARKS.md for the accuracy of the real model."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
