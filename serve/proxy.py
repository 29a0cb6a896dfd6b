"""Admission in the Serve proxy: a flood is refused where HTTP is parsed, before any routing.

Every request that reaches the ingress costs a hop from the proxy to a replica and back, even
when the ingress only refuses it: on a small machine under a flood, those refusals took
about 0.4 of the CPU a classified image does, so the accepted requests slowed with them
(BENCHMARKS.md, Serving). This middleware runs inside each Serve proxy. It counts the
classification requests the proxy has forwarded and not yet answered, and past
``max_inflight`` answers at once with the application's own 503 body and ``Retry-After``,
without routing the request anywhere. Health, readiness, model and schema routes are never
limited. A classification request whose replica dies before answering (the proxy's handler
then ends without a response, and the HTTP server would send a bare 500) is answered with a
JSON 503 ``replica_lost`` and ``Retry-After``: the client cannot tell a crash from a bug
otherwise, and sending the request again is safe (classification has no side effects).

Ray loads proxy middlewares from an import path in the environment of the Ray cluster
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read when the proxy starts), so the limit is
switched on where Ray starts, not in serve/config.yaml::

    export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy:middlewares
    export CELLMODEL_PROXY_MAX_INFLIGHT=40   # optional; the default is 40
    serve run serve/config.yaml              # or: ray start --head, then serve deploy

The limit is per proxy (one per node on a cluster), so it is set from what one node's ingress
replicas admit (``max_inflight_images``, 48 each): a little below it, so that a flood of
single images is refused here, cheaply, while batch requests are still counted per image by
the ingress.
"""

from __future__ import annotations

import os

from serve.requests import unavailable

MAX_INFLIGHT_ENV = "CELLMODEL_PROXY_MAX_INFLIGHT"
RETRY_AFTER_ENV = "CELLMODEL_PROXY_RETRY_AFTER_S"
DEFAULT_MAX_INFLIGHT = 40
# The classification routes, under whatever route prefix the application is deployed at.
LIMITED_SUFFIXES = ("/v1/classify", "/v1/classify/batch")


class ProxyAdmission:
    """Pure ASGI middleware: at most ``max_inflight`` classification requests in flight
    through this proxy; the next ones get a JSON 503 with ``Retry-After`` at once."""

    def __init__(self, app, max_inflight: int = DEFAULT_MAX_INFLIGHT, retry_after_s: int = 1):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0
        self.refused = 0
        # The application's own error (serve.requests): the same JSON body and Retry-After as
        # the ingress's refusals. A Starlette response is an ASGI app and can be sent again.
        self._refusal = unavailable(
            "overloaded",
            f"the service is at its limit of {max_inflight} requests in flight through this proxy",
            retry_after_s,
        ).response()
        # A request whose replica died under it: the proxy's handler ends without an answer
        # (the HTTP server would then send a bare 500); the client gets a 503 it can retry.
        self._lost = unavailable(
            "replica_lost",
            "the replica handling this request stopped before answering; send it again",
            retry_after_s,
        ).response()
        self.lost = 0

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or not path.endswith(LIMITED_SUFFIXES):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            self.refused += 1
            await self._refusal(scope, receive, send)
            return
        # A request leaves the count when its last byte is sent, not when the proxy's handler
        # returns: the proxy does bookkeeping after the answer, and by then the client may
        # have sent its next request, which must not find its own previous one still counted.
        self.inflight += 1
        done = started = False

        async def send_counted(message) -> None:
            nonlocal done, started
            started = started or message["type"] == "http.response.start"
            await send(message)
            if (
                not done
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                done = True
                self.inflight -= 1

        try:
            await self.app(scope, receive, send_counted)
            if not started:
                self.lost += 1
                await self._lost(scope, receive, send)
        finally:
            if not done:
                done = True
                self.inflight -= 1


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return value


def middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy:middlewares`` loads."""
    from starlette.middleware import Middleware

    return [
        Middleware(
            ProxyAdmission,
            max_inflight=_env_int(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT, 1),
            retry_after_s=_env_int(RETRY_AFTER_ENV, 1, 0),
        )
    ]
