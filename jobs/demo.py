"""The quickstart, end to end on one machine: ``make demo`` (or ``python -m jobs.demo``).

1. ingest the sample crops into Parquet shards (``data/shards/sample``);
2. train the tiny two-branch model in two phases on 2 local Ray workers
   (``jobs/configs/quickstart.toml``; a second demo resumes the finished run): a check that
   the training pipeline runs, not a classifier;
3. evaluate the bundled model (``models/bundled``: a seed ensemble of three networks trained
   by the CPU recipe on the public data) on the sample crops (report, metrics, pictures);
4. serve the bundled model with Ray Serve and classify a sample crop over HTTP;
5. find and classify every white cell on the sample slides with the bundled model, count
   the differential per slide, and draw an overlay per slide.

Each step is the same command a user runs on a cluster; see README.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARDS = ROOT / "data" / "shards" / "sample"
CONFIG = ROOT / "jobs" / "configs" / "quickstart.toml"
BUNDLED = ROOT / "models" / "bundled"


def serve_once(checkpoint: Path, image: Path) -> int:
    """Start Serve on a free local port, classify ``image`` over HTTP, print, shut down."""
    import socket

    import httpx
    from ray import serve

    from cellmodel.cluster import ensure_ray
    from serve.app import build_app
    from serve.settings import AppArgs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import os

    import ray

    # Shut Serve down afterwards only if this process started the Ray it runs on; on a
    # cluster (RAY_ADDRESS) only the demo's own application is removed.
    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray(quiet=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(checkpoint=str(checkpoint))), name="demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/classify"
        print(
            f"curl -s --data-binary @{image.relative_to(ROOT)} -H 'content-type: image/jpeg' {url}"
        )
        r = httpx.post(url, content=image.read_bytes(), headers={"content-type": "image/jpeg"},
                       timeout=120)  # fmt: skip
        print(r.status_code, r.text)
        return 0 if r.status_code == 200 else 1
    finally:
        serve.delete("demo")
        if own_ray:
            serve.shutdown()


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

    bundled = any((BUNDLED / f).exists() for f in ("checkpoint.json", "ensemble.json"))
    model = BUNDLED if bundled else run_dir / "model"
    if model != BUNDLED:
        print(f"no bundled model at {BUNDLED}: the steps below use the tiny pipeline check")
    out = ROOT / "runs" / "demo"
    report = out / "evaluation"
    t0 = step(3, f"evaluate {model.relative_to(ROOT)} on the sample crops")
    if rc := evaluate.main(
        ["--checkpoint", str(model), "--data", str(SAMPLE / "crops"), "--out", str(report),
         "--quiet"]
    ):  # fmt: skip
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    t0 = step(4, f"serve {model.relative_to(ROOT)} and classify one crop over HTTP")
    crop = sorted((SAMPLE / "crops" / "NEUTROPHIL").glob("*.jpeg"))[0]
    if rc := serve_once(model, crop):
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    slides_out = out / "slides"
    t0 = step(5, "find and classify the white cells on the sample slides")
    # The slide job resumes an output only with the settings it was started with; the demo
    # shows a fresh run each time.
    shutil.rmtree(slides_out, ignore_errors=True)
    if rc := classify_slides.main(
        [
            "--input", str(SAMPLE / "slides" / "JPEGImages"),
            "--checkpoint", str(model),
            "--output", str(slides_out),
            "--concurrency", "1",
            "--overlays",
            "--quiet",
        ]
    ):  # fmt: skip
        return rc
    print(f"({time.perf_counter() - t0:.0f} s)")

    print(
        "\nDone. What the demo made:\n"
        f"  pipeline check     {run_dir}  (the tiny model: config.toml, history, epoch-*/)\n"
        f"  model used below   {model}\n"
        f"  evaluation report  {report / 'report.md'}  (metrics.json, confusion_matrix.png, ...)\n"
        f"  slide results      {slides_out}  (report.md, overlays/, cells/, slides/)\n"
        "Serve the same model: serve run serve/config.yaml (it uses models/bundled unless\n"
        "CELLMODEL_CHECKPOINT names another checkpoint). The sample crops come from the same\n"
        "public data the bundled model was trained on, so step 3's score is not a held-out\n"
        "figure: BENCHMARKS.md has the leak-free ones."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
