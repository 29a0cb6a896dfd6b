"""``python -m jobs.bench serve``: the Serve application through HTTP, next to the raw model.

Parts (``--parts``; the default runs the first three):
1. backends: per-image forward time of eager PyTorch (plain, then inference_mode +
   channels_last), ONNX Runtime, OpenVINO (when installed) and ONNX Runtime int8, the
   largest logit difference to eager, and the FLOP floor (the model's GFLOPs per image over
   this machine's measured fp32 matmul rate);
2. http: requests/s and p50/p95/p99 latency at concurrency 1, 8 and 32 on one classifier
   replica, with dynamic batching on (max_batch_size 16) and off (1);
3. autoscaling: the classifier's replica count over time under a load burst, plotted;
4. ort: ONNX Runtime graph optimisation levels and thread spinning, per thread count;
5. load: the application as serve/config.yaml deploys it, at concurrency 32 and 256: status
   codes, p50/p99 of the 200s and of the 503s (clients wait Retry-After after a 503), with a
   plot of latency and replicas over time; ``--load-checkpoint bundled`` serves the shipped
   model instead of the tiny one;
6. chaos: SIGKILL a classifier replica under load: status codes (only 200 and 503 allowed),
   latency and replicas over time, plotted;
7. int8: accuracy of ONNX Runtime int8 against fp32 on held-out images (``--int8-data``: a
   shard dataset, whose val split is scored and train split calibrates, or a class-folder
   tree calibrated on ``--int8-calibration``; ``--checkpoint``), with a 95 % interval of the
   difference over source cells;
8. ensemble: an ensemble folder (``--ensemble``, default the bundled model when it is one)
   against its first member alone, in the same run: the raw forward (backend auto, every
   core) at batch 1 and 16, then the endpoint (split layout, one classifier replica) at
   each ``--concurrency``: requests/s and p50/p99, with the ensemble/member ratios;
9. replica: what a classifier replica's model path costs on each device of this machine (its
   CPU, with every core and the fastest exact backend, and CUDA when there is one), without
   Ray or HTTP: decoding the uploads (one thread) and ``predict_arrays`` per image at each
   ``--batches`` size, with and without test-time augmentation, for ``--models`` (random
   weights) and the bundled model (``--ensemble``), each device's figure beside the CPU's.
   It runs where Ray does not (an accelerator machine without it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import random
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cellmodel import CLASSES
from cellmodel.data.transforms import stack_bytes
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, save_checkpoint
from cellmodel.models.checkpoint import default_checkpoint
from cellmodel.models.summary import count_flops
from jobs.bench._timing import measure

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "crops"


def _images(n: int = 32) -> list[bytes]:
    files = [p for c in CLASSES for p in sorted((SAMPLE / c).glob("*.jpeg"))[: n // len(CLASSES)]]
    return [p.read_bytes() for p in files]


def _per_image_ms(fn, x: np.ndarray, seconds: float) -> float:
    """Milliseconds per image of ``fn(x)``: the median of the calls that fit in ``seconds``
    (at least 5, after a warm-up call), timed like every bench (``_timing.measure``)."""
    return measure(lambda: fn(x), repeats=5, seconds=seconds).median / len(x) * 1e3


def _raw_worker(ckpt: str, backend: str, threads: int, batch: int, seconds: float, start, out):
    """One process of ``_parallel_raw_rate``: images classified in ``seconds`` after ``start``."""
    pred = Predictor(ckpt, "cpu", backend=backend, num_threads=threads)
    x = np.zeros((batch, *pred.cfg.input_size[1:], 3), np.uint8)
    pred.predict_uint8(x)  # warm-up
    start.wait()
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        pred.predict_uint8(x)
        n += batch
    # Over the time the counted batches took (the last one ends past ``end``): counting them
    # against ``seconds`` alone rounded the rate to whole batches (8 / 6 s steps).
    out.put(n / (time.perf_counter() - t0))


def _parallel_raw_rate(ckpt: str, backend: str, procs: int, threads: int, batch: int = 8,
                       seconds: float = 10.0) -> float:  # fmt: skip
    """Images/s of ``procs`` processes running the raw model side by side, ``threads`` each:
    what the cores give when no process waits on another's threads."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [
        ctx.Process(target=_raw_worker, args=(ckpt, backend, threads, batch, seconds, start, out))
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    start.wait()
    rates = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    return float(sum(rates))


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured fp32 matmul rate of this machine with torch's current threads (median call)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    ms = _per_image_ms(lambda _: a @ b, np.zeros(1), seconds)
    return 2 * size**3 / (ms / 1e3) / 1e9


def bench_backends(models: list[str], batches: list[int], seconds: float, threads: int) -> None:
    torch.set_num_threads(threads)
    rate = matmul_gflops()
    print(f"\n## backends  (fp32 matmul: {rate:.1f} GFLOP/s, {threads} thread(s))")
    has_ov = importlib.util.find_spec("openvino") is not None
    print(
        "| model | GFLOPs/img | floor ms/img | batch | no_grad NCHW (baseline) | inference_mode NCHW "
        "| inference_mode channels_last | ONNX Runtime | "
        + ("OpenVINO | " if has_ov else "")
        + "ONNX Runtime int8 | max logit diff fp32 (int8) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_ov else ""))
    with tempfile.TemporaryDirectory() as d:
        for name in models:
            torch.manual_seed(0)
            ckpt = save_checkpoint(build_model(name), f"{d}/{name}")
            eager = Predictor(ckpt, "cpu", num_threads=threads)
            onnx = Predictor(ckpt, "cpu", backend="onnx", num_threads=threads)
            # Built only when installed (a list times False would still build it).
            extra = (
                [Predictor(ckpt, "cpu", backend="openvino", num_threads=threads)] if has_ov else []
            )
            int8 = Predictor(
                ckpt, "cpu", backend="onnx-int8", num_threads=threads, calibration=_images(32)
            )
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
                fns = [no_grad, inference_nchw, eager.logits_arrays, onnx.logits_arrays]
                fns += [p.logits_arrays for p in extra] + [int8.logits_arrays]
                t = [_per_image_ms(f, x, seconds) for f in fns]
                ref = eager.logits_arrays(x)
                diffs = [float(np.abs(p.logits_arrays(x) - ref).max()) for p in (onnx, *extra)]
                d8 = float(np.abs(int8.logits_arrays(x) - ref).max())
                cells = " | ".join(f"{v:.2f} ms ({t[0] / v:.2f}x)" for v in t)
                diff = ", ".join(f"{v:.1e}" for v in diffs) + f" ({d8:.1e})"
                print(
                    f"| {name} | {gflops:.3f} | {gflops / rate * 1e3:.2f} | {b} | {cells} | {diff} |",
                    flush=True,
                )


def bench_replica(models: list[str], batches: list[int], seconds: float, folder: str) -> None:
    """The classifier replica's model path per device (see the module's docstring, part 9)."""
    from cellmodel.infer.ensemble import load_predictor

    cores = os.cpu_count() or 1
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    images = (_images(32) * 8)[: max(max(batches), 16)]
    tta_batch = min(16, max(batches))
    with tempfile.TemporaryDirectory() as d:
        cases = {}
        for name in models:
            torch.manual_seed(0)
            cases[f"{name} (random weights)"] = save_checkpoint(build_model(name), f"{d}/{name}")
        cases[f"bundled ({Path(folder).name})"] = folder
        gpu = (
            f"CUDA: {torch.cuda.get_device_name(0)}, eager fp32" if "cuda" in devices else "no CUDA"
        )
        print(f"\n## replica  (decode + predict_arrays, ms per image; CPU: {cores} thread(s), "
              f"backend auto; {gpu})")  # fmt: skip
        print("| model | input | device (backend) | decode, 1 thread | "
              + " | ".join(f"batch {b}" for b in batches)
              + f" | TTA x8, batch {tta_batch} | batch {batches[-1]} vs CPU |")  # fmt: skip
        print("|---|---|---|---:|" + "---:|" * (len(batches) + 2))
        for case, ckpt in cases.items():
            cpu_ms = None
            for dev in devices:
                kw = {"device": dev, "backend": "auto" if dev == "cpu" else "eager"}
                if dev == "cpu":
                    kw["num_threads"] = cores
                pred = load_predictor(ckpt, **kw)
                cfg = pred.cfg
                dec = _per_image_ms(lambda xs, c=cfg: stack_bytes(xs, c), images[:16], seconds)
                ms = [_per_image_ms(pred.predict_arrays, stack_bytes(images[:b], cfg), seconds)
                      for b in batches]  # fmt: skip
                tta = load_predictor(ckpt, tta=True, **kw)
                t = _per_image_ms(tta.predict_arrays, stack_bytes(images[:tta_batch], cfg), seconds)
                cpu_ms = ms[-1] if dev == "cpu" else cpu_ms
                size = "x".join(str(v) for v in cfg.input_size[:0:-1])
                print(f"| {case} | {size} | {dev} ({pred.backend}) | {dec:.2f} | "
                      + " | ".join(f"{v:.3f}" for v in ms)
                      + f" | {t:.3f} | {cpu_ms / ms[-1]:.1f}x |", flush=True)  # fmt: skip
        if "cuda" in devices:
            print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


# -- HTTP ---------------------------------------------------------------------------------------


def _client(concurrency: int):
    """The load generator's HTTP client: aiohttp, whose client costs several times less CPU
    per request than httpx's; the generator shares the cores with the server, and every
    millisecond it spends is taken from the server and added to the latencies it measures."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def _load(
    url: str, images: list[bytes], concurrency: int, n: int
) -> tuple[float, np.ndarray]:
    """Wall time and per-request latencies (ms) of ``n`` posts at ``concurrency``; any
    status but 200 raises."""
    lat: list[float] = []
    todo = iter(range(n))
    headers = {"content-type": "image/jpeg"}
    async with _client(concurrency) as c:

        async def worker() -> None:
            for i in todo:
                t = time.perf_counter()
                async with c.post(url, data=images[i % len(images)], headers=headers) as r:
                    await r.read()
                    r.raise_for_status()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, np.array(lat) * 1e3


def _deploy(
    ckpt: str,
    *,
    user_config: dict,
    autoscaling: dict | None = None,
    threads: int = 1,
    replicas: int = 1,
    logging_config: dict | None = None,
    layout: str = "split",
) -> None:
    from ray import serve

    from serve.app import Classifier, Ingress
    from serve.settings import AppArgs

    opts = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    if layout == "fused":  # each ingress replica runs the model: ``threads`` CPUs each
        args = AppArgs(checkpoint=ckpt, layout="fused", torch_threads=threads).model_dump()
        fused = Ingress.options(
            user_config=user_config, ray_actor_options={"num_cpus": threads}, **opts
        ).bind(None, args)
        serve.run(fused, name="cellmodel", route_prefix="/", logging_config=logging_config)
        return
    classifier = Classifier.options(
        user_config=user_config, ray_actor_options={"num_cpus": threads}, **opts
    ).bind(ckpt, "auto", threads)
    args = AppArgs(checkpoint=ckpt).model_dump()
    serve.run(
        Ingress.options(num_replicas=1).bind(classifier, args),
        name="cellmodel",
        route_prefix="/",
        logging_config=logging_config,
    )


def bench_http(
    url: str,
    ckpt: str,
    levels: list[int],
    requests: int,
    threads: int = 1,
    batch_sizes: tuple[int, ...] = (16, 1),
    replicas: int = 1,
    batch_wait_s: float = 0.005,
    logging_config: dict | None = None,
    layout: str = "split",
) -> None:
    """The endpoint against the raw model on the same cores: ``replicas`` classifier
    replicas (in the fused layout, ingress replicas holding the model) with ``threads`` CPUs
    and intra-op threads each, backend auto. The reference is the best the cores give the raw
    model, whatever the endpoint's layout: one process on every core, one single-threaded
    process per core, and the endpoint's own processes x threads; the latency reference is
    batch 1 on every core in one process."""
    images = _images(32)
    cores = os.cpu_count() or 1
    raw = Predictor(ckpt, "cpu", backend="auto", num_threads=cores)
    x1 = stack_bytes(images[:1], raw.cfg)
    x8 = stack_bytes(images[:8], raw.cfg)
    t_raw = _per_image_ms(raw.predict_arrays, x1, 3.0)
    t_raw8 = _per_image_ms(raw.predict_arrays, x8, 2.0)
    best_rate = 1e3 / min(t_raw, t_raw8)
    for procs, th in sorted({(cores, 1), (replicas, threads)} - {(1, cores)}):
        par = _parallel_raw_rate(ckpt, raw.backend, procs, th)
        print(f"raw model in {procs} process(es) x {th} thread(s), batch 8: {par:.1f} img/s")
        best_rate = max(best_rate, par)
    print(
        f"\n## http  ({raw.cfg.name}; {layout} layout, {replicas} model replica(s) x "
        f"{threads} thread(s), "
        f"batch wait {batch_wait_s * 1e3:g} ms; raw forward, backend {raw.backend}, "
        f"{cores} thread(s), "
        f"median call: batch 1 {t_raw:.2f} ms/img, batch 8 {t_raw8:.2f} ms/img; best rate "
        f"{best_rate:.1f} img/s)"
    )
    print(
        "| max_batch_size | concurrency | requests | req/s | req/s / raw best rate | p50 ms | "
        "p95 ms | p99 ms | p50 / raw batch-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mbs in batch_sizes:
        _deploy(
            ckpt,
            user_config={"max_batch_size": mbs, "batch_wait_timeout_s": batch_wait_s},
            threads=threads,
            replicas=replicas,
            logging_config=logging_config,
            layout=layout,
        )
        asyncio.run(_load(f"{url}/v1/classify", images, 4, 16))  # warm-up
        for c in levels:
            wall, lat = asyncio.run(_load(f"{url}/v1/classify", images, c, max(requests, 2 * c)))
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            rate = len(lat) / wall
            print(
                f"| {mbs} | {c} | {len(lat)} | {rate:.1f} | {rate / best_rate:.2f}x | {p50:.1f} | "
                f"{p95:.1f} | {p99:.1f} | {p50 / t_raw:.2f}x |",
                flush=True,
            )


def bench_ensemble(
    url: str, folder: str, levels: list[int], requests: int, threads: int = 1
) -> None:
    """An ensemble folder against its first member, raw and through the endpoint, measured
    alternately in this run (see the module's docstring, part 8)."""
    from cellmodel.infer.ensemble import load_predictor
    from cellmodel.models.checkpoint import ensemble_members

    members = ensemble_members(folder)
    if not members:
        raise SystemExit(f"--ensemble {folder} is not an ensemble folder (no ensemble.json)")
    images = _images(32)
    cores = os.cpu_count() or 1
    models = {"member": members[0], "ensemble": folder}
    raw = {k: load_predictor(c, device="cpu", backend="auto", num_threads=cores)
           for k, c in models.items()}  # fmt: skip
    name = raw["member"].cfg.name
    print(f"\n## ensemble  ({folder}: {len(members)} x {name}; backend "
          f"{raw['ensemble'].backend}, {cores} thread(s); endpoint: split layout, one "
          f"classifier replica x {threads} thread(s), max_batch_size 16)")  # fmt: skip
    print("| what | member | ensemble | ensemble / member |")
    print("|---|---|---|---|")
    for b in (1, 16):
        x = stack_bytes(images[:b], raw["member"].cfg)
        ms = {k: _per_image_ms(p.predict_arrays, x, 2.0) for k, p in raw.items()}
        print(f"| raw forward, batch {b}, ms/img | {ms['member']:.2f} | {ms['ensemble']:.2f} | "
              f"{ms['ensemble'] / ms['member']:.2f}x |", flush=True)  # fmt: skip
    got: dict[str, dict[int, tuple]] = {}
    for k, c in models.items():
        _deploy(c, user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
                threads=threads)  # fmt: skip
        asyncio.run(_load(f"{url}/v1/classify", images, 4, 16))  # warm-up
        got[k] = {}
        for n in levels:
            wall, lat = asyncio.run(_load(f"{url}/v1/classify", images, n, max(requests, 2 * n)))
            got[k][n] = (len(lat) / wall, *np.percentile(lat, [50, 99]))
    for n in levels:
        (rm, pm, qm), (re, pe, qe) = got["member"][n], got["ensemble"][n]
        print(f"| endpoint, concurrency {n}: req/s | {rm:.1f} | {re:.1f} | {re / rm:.2f}x |")
        print(f"| endpoint, concurrency {n}: p50 / p99 ms | {pm:.1f} / {qm:.1f} | "
              f"{pe:.1f} / {qe:.1f} | {pe / pm:.2f}x / {qe / qm:.2f}x |")  # fmt: skip


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


def bench_ort(models: list[str], threads_list: list[int], seconds: float) -> None:
    """ONNX Runtime's graph optimisation levels and thread spinning, per thread count."""
    from cellmodel.infer.export import OnnxForward, export_onnx

    print("\n## ort  (ONNX Runtime session settings; ms/img, median call)")
    print("| model | threads | batch | level none | basic | extended | all | all + spinning |")
    print("|---|---|---|---|---|---|---|---|")
    for name in models:
        torch.manual_seed(0)
        model = build_model(name).eval()
        blob = export_onnx(model, model.cfg.input_size)
        for th in threads_list:
            runs = [OnnxForward(blob, th, optimization=lv) for lv in OnnxForward.LEVELS]
            runs.append(OnnxForward(blob, th, optimization="all", spin=True))
            for b in (1, 8):
                x = stack_bytes((_images(32) * 4)[:b], model.cfg)
                cells = " | ".join(f"{_per_image_ms(r, x, seconds):.2f}" for r in runs)
                print(f"| {name} | {th} | {b} | {cells} |", flush=True)


# -- the application as configured, under load and faults -------------------------------------------

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"
CPU_CONFIG = CONFIG.with_name("config-cpu.yaml")


def _deploy_configured(
    ckpt: str, *, name: str = "cellmodel", replicas: int | None = None, config: Path = CONFIG
) -> None:
    """The application with the arguments and deployment options of ``config``
    (serve/config.yaml, or serve/config-cpu.yaml for the fused layout); ``replicas`` fixes
    the model's replicas (the classifier's, or in the fused layout the ingress's)."""
    import yaml
    from ray import serve

    from serve.app import Classifier, Ingress, pinned_meta
    from serve.settings import AppArgs

    (app,) = yaml.safe_load(config.read_text())["applications"]
    opts = {d.pop("name"): d for d in app["deployments"]}
    args = AppArgs.model_validate({**app["args"], "checkpoint": ckpt})
    meta = pinned_meta(ckpt)
    model = "Ingress" if args.layout == "fused" else "Classifier"
    if replicas is not None:
        opts[model].pop("autoscaling_config", None)
        opts[model]["num_replicas"] = replicas
    cls = None
    if args.layout != "fused":
        cls = Classifier.options(**opts["Classifier"]).bind(
            ckpt, args.backend, args.torch_threads, weights_sha256=meta["weights_sha256"],
            tta=args.tta,
        )  # fmt: skip
    ingress = Ingress.options(**opts["Ingress"]).bind(cls, args.model_dump(), meta)
    serve.run(ingress, name=name, route_prefix="/")


async def _timed_load(
    url: str,
    images: list[bytes],
    concurrency: int,
    *,
    n: int | None = None,
    seconds: float | None = None,
    t0: float | None = None,
    honour_retry_after: bool = True,
) -> list[tuple[float, float, str]]:
    """(start time since ``t0``, latency s, status) per request; a client that gets a 503
    waits its Retry-After (times 1 to 2, jitter) before its next request, unless
    ``honour_retry_after`` is off (then it sends its next request at once)."""
    t0 = time.monotonic() if t0 is None else t0
    out: list[tuple[float, float, str]] = []
    count = iter(range(n if n is not None else 10**9))
    end = None if seconds is None else time.monotonic() + seconds
    headers = {"content-type": "image/jpeg"}
    async with _client(concurrency) as c:

        async def worker() -> None:
            for i in count:
                if end is not None and time.monotonic() > end:
                    return
                t = time.monotonic()
                try:
                    async with c.post(
                        f"{url}/v1/classify", data=images[i % len(images)], headers=headers
                    ) as r:
                        await r.read()
                        status, wait = str(r.status), r.headers.get("retry-after")
                except Exception as e:  # noqa: BLE001 - every client error is a result here
                    status, wait = f"error:{type(e).__name__}", None
                out.append((t - t0, time.monotonic() - t, status))
                if status == "503" and wait and honour_retry_after:
                    # Jittered, as a well-behaved client does: no synchronised herds.
                    await asyncio.sleep(float(wait) * (1 + random.random()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def _summary(rows: list[tuple[float, float, str]], wall: float) -> str:
    from collections import Counter

    codes = Counter(s for _, _, s in rows)
    ok = np.array([lat for _, lat, s in rows if s == "200"]) * 1e3
    busy = np.array([lat for _, lat, s in rows if s == "503"]) * 1e3

    def pct(a: np.ndarray) -> str:
        return " | ".join(f"{v:.0f}" for v in np.percentile(a, [50, 99])) if len(a) else "- | -"

    code_s = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))
    return f"{len(rows)} | {code_s} | {len(ok) / wall:.1f} | {pct(ok)} | {pct(busy)}"


class _ReplicaSampler:
    """Model replicas (running, starting) of ``deployment`` sampled every ``every`` seconds in
    a thread."""

    def __init__(
        self, t0: float, app: str = "cellmodel", every: float = 0.5, deployment: str = "Classifier"
    ) -> None:
        self.t0, self.app, self.every, self.samples = t0, app, every, []
        self.deployment = deployment
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                states = (
                    serve.status()
                    .applications[self.app]
                    .deployments[self.deployment]
                    .replica_states
                )
                running = int(states.get("RUNNING", 0))
                self.samples.append(
                    (time.monotonic() - self.t0, running, running + int(states.get("STARTING", 0)))
                )
            except Exception:  # noqa: BLE001 - a sample missed is fine
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _plot(rows, samples, out: Path, title: str, marks: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=[3, 1])
    for status, color in (("200", "tab:blue"), ("503", "tab:orange")):
        pts = [(t + lat, lat * 1e3) for t, lat, s in rows if s == status]
        if pts:
            ax.scatter(*zip(*pts), s=3, alpha=0.4, color=color, label=f"{status} ({len(pts)})")
    other = [(t + lat, lat * 1e3) for t, lat, s in rows if s not in ("200", "503")]
    if other:
        ax.scatter(*zip(*other), s=12, color="red", marker="x", label=f"other ({len(other)})")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms), at completion")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    if samples:
        ts = [t for t, _, _ in samples]
        ax2.step(ts, [w for _, _, w in samples], where="post", ls="--", label="wanted")
        ax2.step(ts, [r for _, r, _ in samples], where="post", label="running")
        ax2.set_ylim(0, max(w for _, _, w in samples) + 1)
    ax2.set_ylabel("classifier\nreplicas")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="upper right", fontsize=8)
    for label, t in (marks or {}).items():
        for a in (ax, ax2):
            a.axvline(t, color="k", ls=":", lw=1)
        ax.annotate(label, (t, ax.get_ylim()[1]), fontsize=8, va="top")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"plot: {out}")


def bench_load(
    url: str,
    ckpt: str,
    levels: list[int],
    requests: dict[int, int],
    plot: Path,
    *,
    honour_retry_after: bool = True,
) -> None:
    _deploy_configured(ckpt)
    images = _images(32)
    asyncio.run(_timed_load(url, images, 4, n=32))  # warm-up
    clients = (
        "clients wait Retry-After after a 503"
        if honour_retry_after
        else "clients ignore Retry-After and send again at once"
    )
    print(f"\n## load  ({Path(ckpt).name}; serve/config.yaml deployment options; aiohttp "
          f"client; {clients})")  # fmt: skip
    print(
        "| concurrency | requests | status codes | 200s/s | p50 ms (200) | p99 ms (200) "
        "| p50 ms (503) | p99 ms (503) | load generator CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    last = None
    for c in levels:
        t0, cpu0 = time.monotonic(), time.process_time()
        with _ReplicaSampler(t0) as sampler:
            rows = asyncio.run(
                _timed_load(
                    url, images, c, n=requests.get(c, 2000), t0=t0,
                    honour_retry_after=honour_retry_after,
                )
            )  # fmt: skip
        wall = time.monotonic() - t0
        # This process's CPU per wall second: the load generator (and the replica sampler).
        cpu = (time.process_time() - cpu0) / wall
        print(f"| {c} | {_summary(rows, wall)} | {cpu:.2f} cores |", flush=True)
        last = (c, rows, sampler.samples)
    if last:
        c, rows, samples = last
        _plot(rows, samples, plot, f"load: {len(rows)} requests at concurrency {c} (aiohttp)")


def bench_chaos(
    url: str,
    ckpt: str,
    concurrency: int,
    seconds: float,
    kill_at: float,
    plot: Path,
    replicas: int,
    layout: str = "split",
) -> None:
    """SIGKILL one model replica ``kill_at`` seconds into ``seconds`` of load: a classifier
    replica (split layout, serve/config.yaml's options) or, ``layout="fused"``, an ingress
    replica holding the model (serve/config-cpu.yaml's options; the requests in flight there
    die with it)."""
    import httpx

    _deploy_configured(ckpt, replicas=replicas, config=CPU_CONFIG if layout == "fused" else CONFIG)
    images = _images(32)
    asyncio.run(_timed_load(url, images, 4, n=32))  # warm-up
    t0 = time.monotonic()
    killed: dict[str, float] = {}

    def killer() -> None:
        time.sleep(kill_at)
        pid = httpx.get(f"{url}/readyz", timeout=30).json()["pid"]
        os.kill(pid, signal.SIGKILL)
        killed[f"SIGKILL replica (pid {pid})"] = time.monotonic() - t0

    k = threading.Thread(target=killer)
    with _ReplicaSampler(
        t0, deployment="Ingress" if layout == "fused" else "Classifier"
    ) as sampler:
        k.start()
        rows = asyncio.run(_timed_load(url, images, concurrency, seconds=seconds, t0=t0))
        k.join()
    print(
        f"\n## chaos  ({layout} layout, {replicas} model replica(s), concurrency {concurrency} "
        f"for {seconds:.0f} s, "
        f"one replica SIGKILLed at {kill_at:.0f} s)"
    )
    print(
        "| requests | status codes | 200s/s | p50 ms (200) | p99 ms (200) | p50 ms (503) | p99 ms (503) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| {_summary(rows, seconds)} |")
    bad = [s for _, _, s in rows if s not in ("200", "503")]
    print(f"responses other than 200/503: {len(bad)}")
    if killed:
        t_kill = min(killed.values())
        after = [(t, r) for t, r, _ in sampler.samples if t > t_kill]
        down = next((t for t, r in after if r < replicas), None)
        up = next((t for t, r in after if down is not None and t > down and r >= replicas), None)
        if down is not None:
            back = f"; {replicas} running again after {up - t_kill:.1f} s" if up else ""
            print(f"Serve saw the replica gone {down - t_kill:.1f} s after the kill{back}")
    _plot(
        rows,
        sampler.samples,
        plot,
        f"chaos: concurrency {concurrency}, {replicas} replica(s)",
        killed,
    )


def _int8_images(data: Path, calibration: Path | None, classes: list[str]):
    """(encoded images, labels, source cells, calibration) for the int8 part: a shard
    dataset's ``val`` split (calibrated on 64 images spread over its ``train`` split, other
    cells by construction) or a class-folder tree (calibrated on ``calibration``)."""
    if (data / "manifest.json").exists():
        from cellmodel.data.dataset import iter_rows

        rows = list(iter_rows(str(data), "val", ["image", "label", "source_id"]))
        if calibration is None:
            train = [r["image"] for r in iter_rows(str(data), "train", ["image"])]
            calib = train[:: max(1, len(train) // 64)][:64]
        else:
            calib = calibration
        return (
            [r["image"] for r in rows],
            np.array([r["label"] for r in rows]),
            np.array([r["source_id"] for r in rows]),
            calib,
        )
    if calibration is None:
        raise SystemExit("int8: --int8-calibration is needed with a class-folder --int8-data")
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((data / c).glob("*.*"))]
    images = [p.read_bytes() for p, _ in files]
    return (
        images,
        np.array([k for _, k in files]),
        np.array([p.stem for p, _ in files]),
        calibration,
    )


def _paired_interval(
    hit_a, hit_b, groups, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of mean(hit_b) - mean(hit_a) in points, resampling whole ``groups``
    (source cells): images of one cell are not independent."""
    rng = np.random.default_rng(seed)
    names, idx = np.unique(groups, return_inverse=True)
    diff = np.bincount(idx, hit_b.astype(float) - hit_a.astype(float), len(names))
    size = np.bincount(idx, minlength=len(names)).astype(float)
    pick = rng.integers(0, len(names), (n_boot, len(names)))
    boot = diff[pick].sum(1) / size[pick].sum(1) * 100
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def bench_int8(ckpt: str, data: Path, calibration: Path | None, threads: int) -> None:
    """Accuracy and agreement of int8 against fp32 ONNX Runtime on held-out images: a shard
    dataset's ``val`` split (split by source cell or slide at ingest) or a class-folder tree."""
    fp32 = Predictor(ckpt, "cpu", backend="onnx", num_threads=threads)
    images, y, groups, calib = _int8_images(data, calibration, fp32.classes)
    int8 = Predictor(ckpt, "cpu", backend="onnx-int8", num_threads=threads, calibration=calib)
    p32, p8 = [], []
    for i in range(0, len(images), 32):
        x = stack_bytes(images[i : i + 32], fp32.cfg)
        p32.append(fp32.predict_arrays(x))
        p8.append(int8.predict_arrays(x))
    p32, p8 = np.concatenate(p32), np.concatenate(p8)
    h32, h8 = p32.argmax(1) == y, p8.argmax(1) == y
    x1 = stack_bytes(images[:1], fp32.cfg)
    x8 = stack_bytes(images[:8], fp32.cfg)
    t = {
        n: (_per_image_ms(m.logits_arrays, x1, 2.0), _per_image_ms(m.logits_arrays, x8, 2.0))
        for n, m in (("fp32", fp32), ("int8", int8))
    }
    print(
        f"\n## int8  ({ckpt}; {len(images)} held-out images of {len(set(groups))} source "
        f"cells from {data}; calibration: {len(calib) if isinstance(calib, list) else calib}; "
        f"{threads} thread(s))"
    )
    print("| | accuracy | ms/img batch 1 | ms/img batch 8 |")
    print("|---|---|---|---|")
    for n, h in (("fp32 ONNX Runtime", h32), ("int8 ONNX Runtime", h8)):
        k = n.split()[0]
        print(f"| {n} | {h.mean():.4f} | {t[k][0]:.1f} | {t[k][1]:.1f} |")
    lo, hi = _paired_interval(h32, h8, groups)
    print(
        f"int8 - fp32: {100 * (h8.mean() - h32.mean()):+.2f} points (95 % interval over source "
        f"cells {lo:+.2f} to {hi:+.2f}); top-1 agreement {(p32.argmax(1) == p8.argmax(1)).mean():.4f}; "
        f"max probability difference {np.abs(p32 - p8).max():.3f}"
    )


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
    ap.add_argument("--http-model", default="tiny_bilstm", help="http part: model (random weights)")
    ap.add_argument("--http-threads", type=int, default=1, help="http part: classifier CPUs")
    ap.add_argument("--http-batch-sizes", nargs="*", type=int, default=[16, 1])
    ap.add_argument(
        "--access-log", choices=["on", "off"], default="on", help="Serve's per-request log lines"
    )
    ap.add_argument("--http-replicas", type=int, default=1, help="http part: model replicas")
    ap.add_argument(
        "--http-layout",
        choices=["split", "fused"],
        default="split",
        help="http and chaos parts: ingress + classifier deployments, or the model in the ingress",
    )
    ap.add_argument(
        "--http-batch-wait-ms", type=float, default=5.0, help="http part: batch_wait_timeout_s"
    )
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--idle-s", type=float, default=25.0)
    ap.add_argument("--plot", type=Path, default=Path("docs/serving-autoscaling.png"))
    ap.add_argument("--load-levels", nargs="*", type=int, default=[32, 256])
    ap.add_argument(
        "--load-requests",
        nargs="*",
        type=int,
        default=[10000, 2000],
        help="requests per load level, in the order of --load-levels",
    )
    ap.add_argument("--load-plot", type=Path, default=Path("docs/serving-load.png"))
    ap.add_argument(
        "--load-checkpoint",
        help="load part: the checkpoint served (default: tiny_bilstm with random weights; "
        "'bundled' for the shipped model)",
    )
    ap.add_argument(
        "--proxy-max-inflight",
        type=int,
        default=40,
        help="admission in the Serve proxy (serve/proxy.py), requests in flight; 0: off",
    )
    ap.add_argument(
        "--ignore-retry-after",
        action="store_true",
        help="load: clients send their next request at once after a 503",
    )
    ap.add_argument("--chaos-s", type=float, default=60.0)
    ap.add_argument("--chaos-kill-at", type=float, default=15.0)
    ap.add_argument("--chaos-concurrency", type=int, default=32)
    ap.add_argument("--chaos-replicas", type=int, default=1, help="classifier replicas")
    ap.add_argument("--chaos-plot", type=Path, default=Path("docs/serving-chaos.png"))
    ap.add_argument("--checkpoint", help="int8 part: the checkpoint to quantise")
    ap.add_argument(
        "--int8-data",
        type=Path,
        help="int8 part: a shard dataset (its val split) or a held-out class-folder tree",
    )
    ap.add_argument("--int8-calibration", type=Path, help="int8 part: calibration images")
    ap.add_argument(
        "--ensemble",
        help="ensemble part: an ensemble folder (default: the bundled model, when it is one)",
    )
    a = ap.parse_args(argv)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    if "backends" in a.parts:
        bench_backends(a.models, a.batches, a.seconds, a.threads)
    if "ort" in a.parts:
        bench_ort(a.models, sorted({1, a.threads}), a.seconds)
    if "int8" in a.parts:
        bench_int8(a.checkpoint, a.int8_data, a.int8_calibration, a.threads)
    if "replica" in a.parts:
        bench_replica(a.models, a.batches, a.seconds, a.ensemble or default_checkpoint())
    if not {"http", "autoscaling", "load", "chaos", "ensemble"} & set(a.parts):
        return 0
    import ray
    from ray import serve

    if a.proxy_max_inflight > 0:
        # Read by the proxy when it starts: set before this process starts Ray.
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "serve.proxy:middlewares"
        os.environ["CELLMODEL_PROXY_MAX_INFLIGHT"] = str(a.proxy_max_inflight)
        print(f"proxy admission on: {a.proxy_max_inflight} requests in flight per proxy")
    else:
        os.environ.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
        print("proxy admission off")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --access-log off: no line per request in the proxy and the replicas.
    logging_config = {"enable_access_log": False} if a.access_log == "off" else None
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = save_checkpoint(build_model("tiny_bilstm"), f"{d}/tiny_bilstm")
        try:
            if "http" in a.parts:
                http_ckpt = ckpt
                if a.http_model != "tiny_bilstm":
                    torch.manual_seed(0)
                    http_ckpt = save_checkpoint(build_model(a.http_model), f"{d}/{a.http_model}")
                bench_http(
                    url,
                    http_ckpt,
                    a.concurrency,
                    a.requests,
                    a.http_threads,
                    tuple(a.http_batch_sizes),
                    replicas=a.http_replicas,
                    batch_wait_s=a.http_batch_wait_ms / 1e3,
                    logging_config=logging_config,
                    layout=a.http_layout,
                )
            if "ensemble" in a.parts:
                folder = a.ensemble or default_checkpoint()
                bench_ensemble(url, folder, a.concurrency, a.requests, a.http_threads)
            if "autoscaling" in a.parts:
                bench_autoscaling(url, ckpt, a.plot, a.load_s, a.idle_s)
            if "load" in a.parts:
                load_ckpt = a.load_checkpoint or ckpt
                load_ckpt = default_checkpoint() if load_ckpt == "bundled" else load_ckpt
                bench_load(
                    url,
                    load_ckpt,
                    a.load_levels,
                    dict(zip(a.load_levels, a.load_requests)),
                    a.load_plot,
                    honour_retry_after=not a.ignore_retry_after,
                )
            if "chaos" in a.parts:
                bench_chaos(
                    url,
                    ckpt,
                    a.chaos_concurrency,
                    a.chaos_s,
                    a.chaos_kill_at,
                    a.chaos_plot,
                    a.chaos_replicas,
                    a.http_layout,
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
