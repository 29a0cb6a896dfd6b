"""The cluster path, end to end: a real ``ray start --head``, jobs submitted with the Job SDK.

What a user does with a cluster (docs/cluster.md), on 127.0.0.1:

1. start a head node with token authentication (Ray 2.60) on its own ports and temp dir;
2. submit ingest, quickstart training (few epochs), evaluation and the slide job with
   ``JobSubmissionClient``, the code travelling as the job's ``working_dir``;
3. ``serve deploy`` the Serve config (serve/config.yaml with a free port and the trained
   checkpoint) and classify a crop over HTTP;
4. stop that head, and only it, by its own process ids (never a blanket stop command, which would end
   every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
VENV_BIN = Path(sys.executable).parent
CLASSES = {"EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"}

# What the working_dir upload leaves out (it also honours .gitignore); the sample data stays.
EXCLUDES = [".git", ".venv", "runs", "data/shards", "mlruns", "out", "__pycache__", "*.pyc"]

pytestmark = [
    pytest.mark.slow,
    # About 4 minutes on 2 cores (head start-up included); room for a loaded CI machine.
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to stop Ray"),
]


# -- a head node of our own ---------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    proc: subprocess.Popen
    temp_dir: Path
    dashboard: str  # http://127.0.0.1:PORT, the Job and Serve REST address
    token: str
    env: dict  # what a client shell needs: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    log: Path
    known_pids: set[int] = field(default_factory=set)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _proc_children(), set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def _pids_mentioning(text: str) -> set[int]:
    """Processes whose command line names ``text`` (our unique temp dir)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if text in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    out.add(int(d))
            except OSError:
                pass
    return out - {os.getpid()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def start_head(num_cpus: int = 4) -> Head:
    # Ray puts Unix sockets under the temp dir and their paths may not exceed ~107 bytes, so
    # the temp dir is a short one of our own (pytest's tmp_path is too deep).
    temp_dir = Path(tempfile.mkdtemp(prefix="cmray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # Nothing of this process's own Ray (address, token) leaks into the head.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # The head's `python` (which runs job entry points) is the project's environment.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(auth, RAY_USAGE_STATS_ENABLED="0")
    # The proxy's admission middleware as a deployment turns it on (docs/serving.md), with a
    # limit of 1 so that the test sees it refuse.
    env.update(
        RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH="serve.proxy:middlewares",
        CELLMODEL_PROXY_MAX_INFLIGHT="1",
    )
    port, dash, client, node, objects, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    log = temp_dir / "ray-start.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={512 * 1024**2}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(proc, temp_dir, f"http://127.0.0.1:{dash}", token, auth, log)
    try:
        _wait_ready(head, timeout=240)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_ready(head: Head, timeout: float) -> None:
    """Until the dashboard's Job API answers an authenticated request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head.known_pids |= _descendants(head.proc.pid)
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited {head.proc.returncode}:\n{_tail(head.log)}")
        try:
            r = requests.get(f"{head.dashboard}/api/jobs/", headers=head.headers, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the head did not come up in {timeout} s:\n{_tail(head.log)}")


def stop_head(head: Head) -> None:
    """Stop this head and everything it started, and nothing else.

    ``ray start --block`` stops its own processes on SIGTERM; whatever is left (workers,
    job entry points started in their own sessions) is found by ancestry, recorded while the
    head ran, or by the head's unique temp dir on its command line.
    """
    pids = {head.proc.pid} | head.known_pids | _descendants(head.proc.pid)
    pids |= _pids_mentioning(str(head.temp_dir))
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    pids |= _pids_mentioning(str(head.temp_dir))
    left = _wait_gone(pids - {head.proc.pid}, timeout=10)
    _signal_all(left, signal.SIGTERM)
    left = _wait_gone(left, timeout=10)
    _signal_all(left | ({head.proc.pid} if head.proc.poll() is None else set()), signal.SIGKILL)
    try:
        head.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _wait_gone(left, timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"({path}: {e})"


@pytest.fixture(scope="module")
def head():
    h = start_head()
    yield h
    stop_head(h)


# -- jobs ---------------------------------------------------------------------------------------


def submit(client, head: Head, entrypoint: str, env: dict | None = None) -> str:
    """Submit ``entrypoint`` as a user does: the repository is the job's working_dir."""
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def wait_job(client, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-6000:]}"
    return logs


def test_auth_token_is_required(head):
    r = requests.get(f"{head.dashboard}/api/jobs/", timeout=10)
    assert r.status_code == 401, r.text
    r = requests.get(f"{head.dashboard}/api/jobs/", headers=head.headers, timeout=10)
    assert r.status_code == 200


def test_jobs_and_serve_deploy_on_a_head_node(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard, headers=head.headers)
    clock = _Clock()
    shards = tmp_path / "shards"
    runs = tmp_path / "runs"

    # 1. ingest the committed sample crops (a path inside the uploaded working_dir)
    logs = wait_job(
        client,
        submit(client, head, f"python -m jobs.ingest --source data/sample/crops --out {shards}"),
    )
    clock.lap("ingest")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert set(manifest["classes"]) == CLASSES, logs[-2000:]
    assert {"train", "val"} <= set(manifest["splits"])

    # 2. the quickstart training run, shortened; Ray Train runs inside the job's cluster
    train = (
        "python -m jobs.train --config jobs/configs/quickstart.toml"
        f" phase1.epochs=2 phase2.epochs=1 run.storage={runs} data.uri={shards}"
    )
    logs = wait_job(client, submit(client, head, train))
    clock.lap("train")
    run_dir = runs / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["phase"] for h in history] == [1, 1, 2], logs[-2000:]
    model = run_dir / "model"
    assert (model / "model.safetensors").is_file() and (model / "checkpoint.json").is_file()
    assert summary["model_uri"].rstrip("/").endswith("model")

    # 3. evaluation and 4. the slide job, submitted together and run side by side
    evaluation, slides = tmp_path / "evaluation", tmp_path / "slides"
    eval_id = submit(
        client,
        head,
        f"python -m jobs.evaluate --checkpoint {model} --data {shards} --out {evaluation} --quiet",
    )
    slides_id = submit(
        client,
        head,
        "python -m jobs.classify_slides --input data/sample/slides/JPEGImages"
        f" --checkpoint {model} --output {slides} --concurrency 1 --quiet",
    )
    wait_job(client, eval_id)
    wait_job(client, slides_id)
    clock.lap("evaluate + slides")
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["n"] == manifest["splits"]["val"]["rows"] > 0
    assert (evaluation / "report.md").is_file()
    slide_summary = json.loads((slides / "summary.json").read_text())
    n_slides = len(list((SAMPLE / "slides" / "JPEGImages").glob("*.jpg")))
    assert slide_summary["n_new"] == n_slides and slide_summary["n_skipped"] == 0
    assert list((slides / "slides").glob("*.parquet")) and list((slides / "cells").glob("*"))

    # 5. serve deploy: serve/config.yaml with a free port and the trained checkpoint
    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (port,) = free_ports(1)
    cfg["http_options"].update(host="127.0.0.1", port=port)
    (app,) = cfg["applications"]
    app["args"]["checkpoint"] = str(model)
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(head.env)
    # `serve` imports this repository's serve/ package; run it from a neutral directory
    deploy = subprocess.run(
        [str(VENV_BIN / "serve"), "deploy", str(serve_cfg), "--address", head.dashboard],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    crop = next((SAMPLE / "crops" / "NEUTROPHIL").glob("*.jpeg"))
    result = _classify_when_ready(f"http://127.0.0.1:{port}", crop.read_bytes(), head)
    clock.lap("serve deploy + first answer")
    assert result["class"] in CLASSES
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-3
    # The head's proxy loaded the admission middleware from its environment: past its limit
    # of 1, concurrent requests are refused by the proxy (JSON 503, Retry-After), never lost.
    codes, refusals = _concurrent_posts(f"http://127.0.0.1:{port}", crop.read_bytes())
    assert set(codes) <= {200, 503} and 200 in codes, codes
    assert refusals and all("through this proxy" in r["message"] for r in refusals), codes
    print("cluster path timings:", clock)


def _concurrent_posts(url: str, image: bytes, n: int = 8, rounds: int = 5):
    """Status codes of ``n`` simultaneous posts, repeated until the proxy refused one."""
    from concurrent.futures import ThreadPoolExecutor

    def post(_):
        return requests.post(
            f"{url}/v1/classify", data=image, headers={"content-type": "image/jpeg"}, timeout=60
        )

    codes, refusals = [], []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(rounds):
            got = list(pool.map(post, range(n)))
            codes += [r.status_code for r in got]
            refusals += [r.json()["error"] for r in got if r.status_code == 503]
            if refusals:
                break
    return codes, refusals


class _Clock:
    """Wall time per step, printed for the report (never asserted on)."""

    def __init__(self):
        self.t0, self.laps = time.monotonic(), {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self.t0, 1)
        self.t0 = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v} s" for k, v in self.laps.items())


def _classify_when_ready(url: str, image: bytes, head: Head, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.post(
                f"{url}/v1/classify",
                data=image,
                headers={"content-type": "image/jpeg"},
                timeout=30,
            )
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:300]}"
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(2)
    status = requests.get(
        f"{head.dashboard}/api/serve/applications/", headers=head.headers, timeout=10
    ).text
    raise AssertionError(f"Serve did not answer in {timeout} s: {last}\n{status[-3000:]}")
