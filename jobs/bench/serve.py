"""``python -m jobs.bench serve``: the Serve application through HTTP, next to the raw model.

Three parts, each short:
1. backends: per-image forward time of eager PyTorch (plain, then inference_mode +
   channels_last) and ONNX Runtime, their largest logit difference, and the FLOP floor
   (the model's GFLOPs per image over this machine's measured fp32 matmul rate);
2. http: requests/s and p50/p95/p99 latency at concurrency 1, 8 and 32 on one classifier
   replica, with dynamic batching on (max_batch_size 16) and off (1);
3. autoscaling: the classifier's replica count over time under a load burst, plotted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cellmodel import CLASSES
from cellmodel.data.transforms import stack_bytes
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, save_checkpoint
from cellmodel.models.summary import count_flops

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "crops"


def _images(n: int = 32) -> list[bytes]:
    files = [p for c in CLASSES for p in sorted((SAMPLE / c).glob("*.jpeg"))[: n // len(CLASSES)]]
    return [p.read_bytes() for p in files]


def _per_image_ms(fn, x: np.ndarray, seconds: float) -> float:
    """The fastest of repeated calls within ``seconds``: other load on a shared machine only
    ever adds time, so the minimum is the steadiest estimate of the cost itself."""
    fn(x)  # warm-up
    best, t_end = float("inf"), time.perf_counter() + seconds
    while best == float("inf") or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best / len(x) * 1e3


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured fp32 matmul rate of this machine with torch's current threads (best call)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    ms = _per_image_ms(lambda _: a @ b, np.zeros(1), seconds)
    return 2 * size**3 / (ms / 1e3) / 1e9


def bench_backends(models: list[str], batches: list[int], seconds: float, threads: int) -> None:
    torch.set_num_threads(threads)
    rate = matmul_gflops()
    print(f"\n## backends  (fp32 matmul: {rate:.1f} GFLOP/s, {threads} thread(s))")
    print(
        "| model | GFLOPs/img | floor ms/img | batch | no_grad NCHW (baseline) | inference_mode NCHW "
        "| inference_mode channels_last | ONNX Runtime | max logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in models:
            torch.manual_seed(0)
            ckpt = save_checkpoint(build_model(name), f"{d}/{name}")
            eager = Predictor(ckpt, "cpu", num_threads=threads)
            onnx = Predictor(ckpt, "cpu", backend="onnx", num_threads=threads)
            plain = build_model(name).eval()  # same weights, contiguous (NCHW) input
            plain.load_state_dict(eager.model.state_dict())
            gflops = count_flops(plain, batch=1) / 1e9

            def no_grad(a, m=plain):
                with torch.no_grad():
                    return m(torch.from_numpy(a))

            def inference_nchw(a, m=plain):
                with torch.inference_mode():
                    return m(torch.from_numpy(a))

            for b in batches:
                x = stack_bytes((_images(32) * 4)[:b], eager.cfg)
                t = [
                    _per_image_ms(f, x, seconds)
                    for f in (no_grad, inference_nchw, eager.logits_arrays, onnx.logits_arrays)
                ]
                diff = float(np.abs(onnx.logits_arrays(x) - eager.logits_arrays(x)).max())
                cells = " | ".join(f"{v:.2f} ms ({t[0] / v:.2f}x)" for v in t)
                print(
                    f"| {name} | {gflops:.3f} | {gflops / rate * 1e3:.2f} | {b} | {cells} | {diff:.1e} |",
                    flush=True,
                )


# -- HTTP ---------------------------------------------------------------------------------------


async def _load(
    url: str, images: list[bytes], concurrency: int, n: int
) -> tuple[float, np.ndarray]:
    import httpx

    lat: list[float] = []
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:

        async def worker() -> None:
            for i in todo:
                t = time.perf_counter()
                r = await c.post(
                    url, content=images[i % len(images)], headers={"content-type": "image/jpeg"}
                )
                r.raise_for_status()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, np.array(lat) * 1e3


def _deploy(ckpt: str, *, user_config: dict, autoscaling: dict | None = None) -> None:
    from ray import serve

    from serve.app import Classifier, Ingress
    from serve.settings import AppArgs

    opts = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": 1}
    classifier = Classifier.options(user_config=user_config, **opts).bind(ckpt)
    args = AppArgs(checkpoint=ckpt).model_dump()
    serve.run(
        Ingress.options(num_replicas=1).bind(classifier, args), name="cellmodel", route_prefix="/"
    )


def bench_http(url: str, ckpt: str, levels: list[int], requests: int) -> None:
    images = _images(32)
    raw = Predictor(ckpt, "cpu", backend="auto", num_threads=1)  # as the replica runs it
    x1 = stack_bytes(images[:1], raw.cfg)
    t_raw = _per_image_ms(raw.predict_arrays, x1, 2.0)
    print(
        f"\n## http  (raw forward, same backend, batch 1, 1 thread: {t_raw:.2f} ms/img = {1e3 / t_raw:.0f} img/s)"
    )
    print(
        "| max_batch_size | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | p50 / raw forward |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mbs in (16, 1):
        _deploy(ckpt, user_config={"max_batch_size": mbs, "batch_wait_timeout_s": 0.005})
        asyncio.run(_load(f"{url}/v1/classify", images, 4, 16))  # warm-up
        for c in levels:
            wall, lat = asyncio.run(_load(f"{url}/v1/classify", images, c, max(requests, 2 * c)))
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            print(
                f"| {mbs} | {c} | {len(lat)} | {len(lat) / wall:.1f} | {p50:.1f} | {p95:.1f} | "
                f"{p99:.1f} | {p50 / t_raw:.1f}x |",
                flush=True,
            )


def bench_autoscaling(url: str, ckpt: str, out: Path, load_s: float, idle_s: float) -> None:
    from ray import serve

    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 2,
        "downscale_delay_s": 8,
        "metrics_interval_s": 1,
        "look_back_period_s": 3,
    }
    _deploy(
        ckpt,
        user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
        autoscaling=autoscaling,
    )
    images, samples, t0 = _images(32), [], time.monotonic()

    def replicas() -> tuple[int, int]:
        """(running, wanted): wanted also counts replicas that are still starting."""
        states = serve.status().applications["cellmodel"].deployments["Classifier"].replica_states
        running = int(states.get("RUNNING", 0))
        return running, running + int(states.get("STARTING", 0))

    async def sample(until: float) -> None:
        while time.monotonic() < until:
            samples.append((time.monotonic() - t0, *replicas()))
            await asyncio.sleep(1.0)

    async def burst() -> int:
        done = 0
        end = time.monotonic() + load_s
        while time.monotonic() < end:
            _, lat = await _load(f"{url}/v1/classify", images, 32, 64)
            done += len(lat)
        return done

    async def run() -> int:
        sampler = asyncio.create_task(sample(t0 + load_s + idle_s))
        n = await burst()
        await sampler
        return n

    n = asyncio.run(run())
    print(f"\n## autoscaling  ({autoscaling})")
    print(f"load: concurrency 32 for {load_s:.0f} s ({n} requests), then idle {idle_s:.0f} s")
    print("time_s:running/wanted " + " ".join(f"{t:.0f}:{r}/{w}" for t, r, w in samples))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ts = [t for t, _, _ in samples]
    ax.step(
        ts, [w for _, _, w in samples], where="post", ls="--", label="wanted (running + starting)"
    )
    ax.step(ts, [r for _, r, _ in samples], where="post", label="running")
    ax.axvspan(0, load_s, alpha=0.15, label="load (32 concurrent)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("classifier replicas")
    ax.set_ylim(0, autoscaling["max_replicas"] + 0.5)
    ax.legend(loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jobs.bench serve", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--parts", nargs="*", default=["backends", "http", "autoscaling"])
    ap.add_argument("--models", nargs="*", default=["tiny_bilstm", "xception_bilstm"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per backend measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    ap.add_argument("--concurrency", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=100, help="requests per concurrency level")
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--idle-s", type=float, default=25.0)
    ap.add_argument("--plot", type=Path, default=Path("docs/serving-autoscaling.png"))
    a = ap.parse_args(argv)
    print(
        f"{time.strftime('%Y-%m-%d')} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    if "backends" in a.parts:
        bench_backends(a.models, a.batches, a.seconds, a.threads)
    if not {"http", "autoscaling"} & set(a.parts):
        return 0
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = save_checkpoint(build_model("tiny_bilstm"), f"{d}/tiny_bilstm")
        try:
            if "http" in a.parts:
                bench_http(url, ckpt, a.concurrency, a.requests)
            if "autoscaling" in a.parts:
                bench_autoscaling(url, ckpt, a.plot, a.load_s, a.idle_s)
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
