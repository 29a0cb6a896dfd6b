"""The proxy's admission middleware (serve/proxy.py) over real HTTP, in a real uvicorn server.

Through Serve itself it runs in every Serve test of the session (tests/conftest.py loads it
into the session's proxies) and in the cluster test, where a limit of 1 is checked on a real
``ray start`` head.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve.proxy import MAX_INFLIGHT_ENV, ProxyAdmission, middlewares


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _GatedApp:
    """A plain ASGI app: /v1/classify waits until the test opens the gate; other paths answer."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        body = b"{}"
        if "/v1/classify" in scope["path"]:
            self.entered += 1
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            body = b'{"class": "NEUTROPHIL"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server():
    import uvicorn

    app = _GatedApp()
    admission = ProxyAdmission(app, max_inflight=2, retry_after_s=3)
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(admission, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app, admission
    app.gate.set()
    srv.should_exit = True
    thread.join(timeout=10)


def _post(url: str) -> requests.Response:
    return requests.post(
        f"{url}/v1/classify", data=b"jpeg", headers={"content-type": "image/jpeg"}, timeout=30
    )


def _wait_for(cond, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_requests_past_the_limit_get_a_json_503_with_retry_after_at_once(server):
    url, app, admission = server
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(_post, url) for _ in range(2)]
        _wait_for(lambda: app.entered == 2 and admission.inflight == 2, "two requests held")

        refused = _post(url)  # the app never sees it: the gate is still shut
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3"
        assert refused.headers["content-type"] == "application/json"
        err = refused.json()["error"]
        assert err["reason"] == "overloaded" and err["retry_after_s"] == 3
        assert "2 requests in flight" in err["message"]
        assert app.entered == 2 and admission.refused == 1

        # Health and other routes are never limited.
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        # An application deployed under a route prefix is limited all the same.
        prefixed = requests.post(f"{url}/cells/v1/classify/batch", data=b"x", timeout=30)
        assert prefixed.status_code == 503 and admission.refused == 2

        app.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
    # Both left the count when their answers went out: the next request is admitted.
    _wait_for(lambda: admission.inflight == 0, "the count to fall back to 0")
    assert _post(url).status_code == 200
    assert admission.inflight == 0 and admission.refused == 2


def test_the_limit_and_retry_after_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(MAX_INFLIGHT_ENV, "7")
    monkeypatch.setenv("CELLMODEL_PROXY_RETRY_AFTER_S", "2")
    (mw,) = middlewares()
    assert mw.cls is ProxyAdmission and mw.kwargs == {"max_inflight": 7, "retry_after_s": 2}

    monkeypatch.setenv(MAX_INFLIGHT_ENV, "0")
    with pytest.raises(ValueError, match=f"{MAX_INFLIGHT_ENV}='0'.*whole number >= 1"):
        middlewares()
    monkeypatch.setenv(MAX_INFLIGHT_ENV, "many")
    with pytest.raises(ValueError, match=f"{MAX_INFLIGHT_ENV}='many'"):
        middlewares()


def test_a_large_upload_refused_at_the_limit_gets_its_503_not_a_reset(server):
    """The middleware answers without reading the body; the server reads and drops the rest,
    so a client still sending a large batch gets the 503, not a connection reset."""
    url, app, admission = server
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_post, url) for _ in range(2)]
        _wait_for(lambda: admission.inflight == 2, "two requests held")
        for _ in range(3):
            r = requests.post(
                f"{url}/v1/classify/batch",
                data=b"\xff" * (8 << 20),
                headers={"content-type": "application/octet-stream"},
                timeout=60,
            )
            assert r.status_code == 503 and r.json()["error"]["reason"] == "overloaded"
        app.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]


class _LosingApp:
    """Stands for the proxy when a replica dies under a request: the handler returns without
    an answer on /v1/classify; /v1/classify/batch answers a real 500 (an application error)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["path"].endswith("/batch"):
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"boom"})


def test_a_request_whose_replica_died_gets_a_503_not_a_500():
    import uvicorn

    admission = ProxyAdmission(_LosingApp(), max_inflight=4, retry_after_s=2)
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(admission, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    )
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        r = requests.post(f"http://127.0.0.1:{port}/v1/classify", data=b"x", timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert r.json()["error"]["reason"] == "replica_lost"
        assert admission.lost == 1 and admission.inflight == 0
        # An answer the application did send, even a 500, passes unchanged: bugs stay visible.
        r = requests.post(f"http://127.0.0.1:{port}/v1/classify/batch", data=b"x", timeout=10)
        assert r.status_code == 500 and r.text == "boom"
        assert admission.lost == 1
    finally:
        srv.should_exit = True
        t.join(timeout=10)
