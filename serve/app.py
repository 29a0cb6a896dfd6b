"""The Serve application: a FastAPI ingress in front of a batching classifier deployment.

Two layouts (``AppArgs.layout``): ``split`` (an ingress deployment calls a classifier
deployment, each scaled on its own; what a GPU cluster wants) and ``fused`` (every ingress
replica holds the model itself and batches its own requests: one Ray hop and one process
fewer per request, which a CPU-only service wants; serve/config-cpu.yaml).

Ingress: admits a request only while it has room (else 503 with Retry-After at once), reads
and decodes the upload under the format allow-list and pixel limits (refusing bad input with
a 4xx before it reaches a model), resizes each image to the model's input and sends it to
the classifier as uint8. Calls to the classifier have a deadline; one that fails because its
replica died is retried once, and anything the client cannot fix is a 503 with Retry-After.
Classifier: loads the checkpoint once, refusing weights other than the ones the application
was built with, normalises and runs dynamic batches (``@serve.batch``) whose size and wait
time come from its ``user_config``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type on the
# route methods, which Serve ships to replicas by value.
import asyncio
import contextlib
import hashlib
import logging
import math
import os

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import cellmodel
from cellmodel import storage
from cellmodel.data.light import has_colour
from cellmodel.data.transforms import ImageDecodeError, frame_of
from cellmodel.infer.ensemble import combination_digest, load_predictor, member_differences
from cellmodel.models.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    ensemble_members,
    read_checkpoint_meta,
)
from serve import images as imgs
from serve import metrics
from serve import openapi as oa
from serve.requests import ApiError, Image, decode_error, read_images, unavailable
from serve.settings import AppArgs, BatchConfig

log = logging.getLogger("ray.serve")

# Batches one replica may run at once (BatchConfig.concurrent_batches; Predictor lanes).
MAX_CONCURRENT_BATCHES = 2

# A call that failed because its replica died or went away: worth one more try elsewhere.
RETRYABLE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, WorkerCrashedError)


def model_version(meta: dict) -> str:
    """The served model's version: the first 12 hex digits of its weights' sha256."""
    return meta["weights_sha256"][:12]


def pinned_meta(checkpoint: str) -> dict:
    """The checkpoint's metadata with ``weights_sha256`` checked against the weights file.

    The application is built from this one reading: the ingress describes, and every
    classifier replica must load, exactly these weights. A folder whose weights do not hash
    to what its checkpoint.json names (a save in progress, a file replaced by hand) is
    refused with ``CheckpointError``.

    An ensemble folder: every member pinned so, and they must read and answer alike; the
    metadata is the first member's with ``weights_sha256`` naming the combination (what the
    replicas check and the version derives from), ``members`` listing each member, and no
    training ``metrics`` (no one run's figures describe the ensemble).
    """
    if members := ensemble_members(checkpoint):
        metas = [_pinned_one(m) for m in members]
        first = metas[0]
        for uri, m in zip(members[1:], metas[1:]):
            problems = member_differences(
                first["classes"], first["preprocessing"], m["classes"], m["preprocessing"]
            )
            if problems:
                raise CheckpointError(
                    f"{uri} cannot join an ensemble with {members[0]}: " + "; ".join(problems)
                )
        return {
            **first,
            "weights_sha256": combination_digest(m["weights_sha256"] for m in metas),
            "metrics": {},
            "members": [
                {
                    "checkpoint": c,
                    "weights_sha256": m["weights_sha256"],
                    "created": m.get("created"),
                }
                for c, m in zip(members, metas)
            ],
        }
    return _pinned_one(checkpoint)


def _pinned_one(checkpoint: str) -> dict:
    meta = read_checkpoint_meta(checkpoint)
    try:
        digest = hashlib.sha256(
            storage.read_bytes(storage.join(checkpoint, WEIGHTS_FILE))
        ).hexdigest()
    except FileNotFoundError as e:
        raise CheckpointError(f"{checkpoint}: {WEIGHTS_FILE} is missing") from e
    named = meta.get("weights_sha256")
    if named and named != digest:
        raise CheckpointError(
            f"{checkpoint}: {WEIGHTS_FILE} has sha256 {digest[:12]}..., but checkpoint.json "
            f"names {named[:12]}...; refusing to serve a model other than the one named"
        )
    return {**meta, "weights_sha256": digest}


def image_warnings(
    image: np.ndarray,
    size: tuple[int, int] | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[str]:
    """What makes an answer for this resized RGB image unreliable, as codes (empty: none).
    ``grayscale``: the image has no colour, and the model reads the stain's colours.
    ``low_resolution``: the image as sent (``size``, width x height) has under half of
    ``input_size`` on a side, either way round (the model's input, or for a model that reads
    the window around the cell, the picture that gives that window at the input's
    resolution), so the model sees it enlarged more than twice: its granules and nucleus
    edges are not there to read."""
    out = [] if has_colour(image) else ["grayscale"]
    if size is not None and input_size is not None:
        (short, long), (in_short, in_long) = sorted(size), sorted(input_size)
        if 2 * short < in_short or 2 * long < in_long:
            out.append("low_resolution")
    return out


def _replica_cpus() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(round(cpus)))


async def _result_of(response):
    """Await a DeploymentResponse (``asyncio.wait_for`` wants a coroutine)."""
    return await response


@serve.deployment(
    name="Classifier",
    max_ongoing_requests=32,
    max_queued_requests=256,
    ray_actor_options={"num_cpus": 1},
    user_config=BatchConfig().model_dump(),
)
class Classifier:
    """Holds one loaded checkpoint (or an ensemble folder's members); classifies resized
    uint8 images in dynamic batches."""

    def __init__(
        self,
        checkpoint: str,
        backend: str = "auto",
        torch_threads: int | None = None,
        *,
        weights_sha256: str | None = None,
        tta: bool = False,
        int8_calibration: str | None = None,
    ):
        # expected_sha256: a replica started after the folder was rewritten (a retrain into
        # the same place) refuses to load, instead of serving another model than the ingress
        # names. Redeploy to serve the new one.
        self.predictor = load_predictor(
            checkpoint,
            backend=backend,
            num_threads=torch_threads or _replica_cpus(),
            tta=tta,
            expected_sha256=weights_sha256,
            calibration=int8_calibration,
            concurrent_batches=MAX_CONCURRENT_BATCHES,
        )
        self.classes = self.predictor.classes
        self._predictions = metrics.predictions_counter()
        self._batch_sizes = metrics.batch_size_histogram()
        self._running = 0  # batches in the model now
        self.reconfigure({})

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``user_config`` (batch size, wait timeout, concurrent batches) without
        reloading the model."""
        cfg = BatchConfig.model_validate(user_config or {})
        self.classify.set_max_batch_size(cfg.max_batch_size)
        self.classify.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # Serve forms batches whether or not one is running; these slots decide how many run.
        self._slots = asyncio.Semaphore(min(cfg.concurrent_batches, self.predictor.lanes))
        self.batch_config = cfg

    @serve.batch(
        max_batch_size=16,
        batch_wait_timeout_s=0.005,
        max_concurrent_batches=MAX_CONCURRENT_BATCHES,
    )
    async def classify(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for each resized RGB uint8 image (H, W, 3); Serve gathers concurrent
        calls into ``xs``."""
        async with self._slots:
            # Alone: every thread; beside a running batch: the predictor's second lane.
            concurrent = self._running > 0
            self._running += 1
            try:
                # Off the event loop, so new requests keep queueing for the next batch.
                probs = await asyncio.to_thread(
                    self.predictor.predict_uint8, np.stack(xs), concurrent=concurrent
                )
            finally:
                self._running -= 1
        self._batch_sizes.observe(len(xs))
        for k, n in zip(*np.unique(probs.argmax(axis=1), return_counts=True)):
            self._predictions.inc(int(n), {"class_name": self.classes[k]})
        return list(probs)

    def info(self) -> dict:
        return {
            "backend": self.predictor.backend,
            "backend_timings_ms": self.predictor.backend_timings,
            "device": str(self.predictor.device),
            "tta": self.predictor.tta,
            "lanes": self.predictor.lanes,
            "pid": os.getpid(),
            "weights_sha256": self.predictor.weights_sha256,
            # An ensemble's own temperature (1.0: none stored, or one checkpoint).
            "ensemble_temperature": self.predictor.meta.get("ensemble_temperature", 1.0),
            "batching": self.batch_config.model_dump(),
        }


api = FastAPI(
    title="cellmodel",
    version=cellmodel.__version__,
    description="White-blood-cell classification (EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL).",
    openapi_url=None,  # served by the ingress itself, with this deployment's limits filled in
    docs_url=None,
    redoc_url=None,
)


_rejected = None


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    """Every refusal: its JSON body, and one count in the rejected-inputs metric."""
    global _rejected
    if _rejected is None:  # created in the replica process, where the metric is exported
        _rejected = metrics.rejected_counter()
    _rejected.inc(tags={"reason": e.reason})
    return e.response()


_ROUTES = (("POST", "/v1/classify"), ("POST", "/v1/classify/batch"), ("GET", "/v1/model"),
           ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs"))  # fmt: skip


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path, a method the route does not take) in the same
    JSON as every other refusal, saying what the service does take."""
    path, prefix = request.url.path, request.scope.get("root_path", "").rstrip("/")
    if e.status_code == 404:
        routes = ", ".join(f"{method} {prefix}{route}" for method, route in _ROUTES)
        err = ApiError(404, "not_found", f"no route {path}; this service answers {routes}")
    elif e.status_code == 405:
        allow = (e.headers or {}).get("Allow", "")  # Starlette's 405 names the methods
        err = ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not accepted on {path}; use {allow or 'another method'} "
            "(see /docs)",
            headers={"Allow": allow} if allow else None,
        )
    else:
        err = ApiError(e.status_code, "http_error", str(e.detail), headers=e.headers)
    return await _api_error(request, err)


@serve.deployment(
    name="Ingress",
    # Far above max_inflight_images (48 by default), so that overload is refused by the
    # ingress's own admission (a JSON 503 before the body is read), not by the proxy's
    # router: when the router finds every ingress replica at max_ongoing_requests it holds
    # requests and retries with back-off, which stalled whole seconds under a flood
    # (BENCHMARKS.md, Serving). The proxy's queue and backpressure_config (serve/config.yaml)
    # are the last resort past this.
    max_ongoing_requests=320,
    max_queued_requests=32,
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress(api)
class Ingress:
    """HTTP routes; admission, decoding and validation happen here, inference in the
    classifier deployment (``classifier``) or, in the fused layout (``classifier=None``), in a
    ``Classifier`` held by this replica."""

    def __init__(self, classifier: DeploymentHandle | None, args: dict, meta: dict | None = None):
        self.classifier = classifier
        self.args = AppArgs.model_validate(args)
        self.checkpoint = self.args.resolved_checkpoint()
        # The metadata build_app read and pinned (else read and pinned now).
        self.meta = meta or pinned_meta(self.checkpoint)
        # Fused layout (no classifier deployment): the model lives in this replica, with the
        # classifier's own batching, metrics and weight check.
        self.local: Classifier | None = None
        if classifier is None:
            a = self.args
            self.local = Classifier.func_or_class(
                self.checkpoint,
                a.backend,
                a.torch_threads,
                weights_sha256=self.meta["weights_sha256"],
                tta=a.tta,
                int8_calibration=a.int8_calibration,
            )
        self.pre = self.meta["preprocessing"]
        _, h, w = self.pre["input_size"]
        self.size = (int(w), int(h))
        # a model that reads the window around the cell needs the whole picture decoded at
        # its input's resolution over that window: the JPEG draft decodes no smaller
        self.frame = frame_of(self.pre)
        f = self.frame or 1.0
        self.decode_size = (math.ceil(w / f), math.ceil(h / f))
        self.classes = list(self.meta["classes"])
        self.model = {"name": self.meta["model_name"], "version": model_version(self.meta)}
        self._inflight = 0  # images admitted and not yet answered, on this replica
        self._openapi: dict | None = None

    def reconfigure(self, user_config: dict) -> None:
        """The fused layout's batching (``BatchConfig``); in the split layout batching is the
        classifier deployment's user_config, and one given here is refused."""
        if self.local is None:
            raise ValueError(
                "the Ingress deployment takes a user_config only in the fused layout "
                "(args.layout: fused); set batching on the Classifier deployment instead"
            )
        self.local.reconfigure(user_config)

    # -- admission ----------------------------------------------------------------------------
    def _overloaded(self) -> ApiError:
        return unavailable(
            "overloaded",
            f"the service is at its limit of {self.args.max_inflight_images} images in flight",
            self.args.retry_after_s,
        )

    def _check_room(self) -> None:
        """Refuse at once, before reading the body, when this replica is full."""
        if self._inflight >= self.args.max_inflight_images:
            raise self._overloaded()

    @contextlib.contextmanager
    def _admit(self, n: int):
        """Hold room for ``n`` images while the request runs; 503 when there is none (a
        request is always admitted when nothing else is in flight, however many images)."""
        if self._inflight and self._inflight + n > self.args.max_inflight_images:
            raise self._overloaded()
        self._inflight += n
        try:
            yield
        finally:
            self._inflight -= n

    # -- decoding -----------------------------------------------------------------------------
    def _decode(self, images: list[Image]) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """Probe every image (format, size), check the request's pixel budget, then decode:
        each image as the model's input and its size as sent."""
        many = len(images) > 1
        probed = []
        for i, im in enumerate(images):
            try:
                probed.append(
                    imgs.probe(
                        im.data,
                        input_size=self.decode_size,
                        formats=self.args.formats,
                        max_pixels=self.args.max_image_pixels,
                    )
                )
            except (ImageDecodeError, imgs.UnsupportedFormat) as e:
                raise decode_error(e, i if many else None, im.filename) from e
        total, budget = sum(p.pixels for p in probed), self.args.max_request_pixels
        if total > budget:
            raise ApiError(
                413,
                "pixel_budget",
                f"the images of this request decode to {total} pixels, over the budget of "
                f"{budget} per request; send fewer or smaller images per request",
                limit_pixels=budget,
                pixels=total,
            )
        out = []
        for i, (im, p) in enumerate(zip(images, probed)):
            try:
                x = imgs.load(p, self.size, self.pre.get("interpolation", "bilinear"), self.frame)
                out.append((x, p.size))
            except ImageDecodeError as e:
                raise decode_error(e, i if many else None, im.filename) from e
        return out

    # -- model calls --------------------------------------------------------------------------
    async def _call(self, x: np.ndarray, deadline: float) -> np.ndarray:
        """One image through the classifier: retried once if its replica dies, bounded by the
        request's deadline; every failure the client cannot fix becomes a 503."""
        loop, retry_after = asyncio.get_running_loop(), self.args.retry_after_s
        if self.local is not None:  # fused: this process's own batch queue, nothing to retry
            try:
                return await asyncio.wait_for(self.local.classify(x), deadline - loop.time())
            except TimeoutError:
                raise unavailable(
                    "model_timeout",
                    f"no answer from the model within {self.args.model_timeout_s:g} s",
                    retry_after,
                ) from None
        last: Exception | None = None
        for _ in range(2):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            response = self.classifier.classify.remote(x)
            try:
                return await asyncio.wait_for(_result_of(response), remaining)
            except TimeoutError:
                response.cancel()
                break
            except asyncio.CancelledError:
                response.cancel()
                raise
            except BackPressureError as e:
                raise unavailable("overloaded", "the model's queue is full", retry_after) from e
            except DeploymentUnavailableError as e:
                raise unavailable(
                    "model_unavailable", "the model is not deployed", retry_after
                ) from e
            except RETRYABLE as e:
                log.warning("classifier call failed (%s); retrying once", type(e).__name__)
                last = e
        if last is not None and deadline - loop.time() > 0:
            raise unavailable(
                "model_unavailable",
                f"the model replica failed twice ({type(last).__name__})",
                retry_after,
            )
        raise unavailable(
            "model_timeout",
            f"no answer from the model within {self.args.model_timeout_s:g} s",
            retry_after,
        )

    async def _classify(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        # One call per image: Serve's batching groups them with other clients' images.
        deadline = asyncio.get_running_loop().time() + self.args.model_timeout_s
        tasks = [asyncio.ensure_future(self._call(a, deadline)) for a in arrays]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    def _result(self, p: np.ndarray, decoded: tuple[np.ndarray, tuple[int, int]]) -> dict:
        k = int(p.argmax())
        image, size = decoded
        return {
            "class": self.classes[k],
            "class_index": k,
            "probability": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
            "warnings": image_warnings(image, size, self.decode_size),
        }

    async def _info(self, timeout: float = 2.0) -> dict:
        if self.local is not None:
            return self.local.info()
        return await asyncio.wait_for(_result_of(self.classifier.info.remote()), timeout)

    # -- routes -------------------------------------------------------------------------------
    @api.post(
        "/v1/classify",
        summary="Classify one cell image",
        response_model=None,
        responses=oa.classify_responses(oa.ClassifyResult),
        openapi_extra=oa.single_body(),
    )
    async def classify(self, request: Request):
        """One image as a raw ``image/*`` body, one file part of a multipart form, or JSON
        ``{"image": base64}``."""
        self._check_room()
        images = await read_images(request, self.args.max_body_bytes)
        if len(images) != 1:
            raise ApiError(
                400,
                "wrong_image_count",
                f"expected exactly one image, got {len(images)}; post several to /v1/classify/batch",
            )
        with self._admit(1):
            decoded = await run_in_threadpool(self._decode, images)
            (p,) = await self._classify([x for x, _ in decoded])
        return {**self._result(p, decoded[0]), "model": self.model}

    @api.post(
        "/v1/classify/batch",
        summary="Classify several cell images, results in order",
        response_model=None,
        responses=oa.classify_responses(oa.BatchResult),
        openapi_extra=oa.batch_body(64),
    )
    async def classify_batch(self, request: Request):
        """Multipart file parts, or JSON ``{"images": [base64, ...]}``; one result per image."""
        self._check_room()
        images = await read_images(request, self.args.max_body_bytes)
        n, limit = len(images), self.args.max_images_per_request
        if n == 0:
            raise ApiError(400, "no_images", "the request holds no images; attach file parts")
        if n > limit:
            raise ApiError(
                413,
                "too_many_images",
                f"{n} images in one request, over the limit of {limit}; split them into requests "
                f"of at most {limit}",
                limit=limit,
            )
        with self._admit(n):
            decoded = await run_in_threadpool(self._decode, images)
            probs = await self._classify([x for x, _ in decoded])
        results = [
            {"index": i, "filename": im.filename, **self._result(p, d)}
            for i, (im, p, d) in enumerate(zip(images, probs, decoded))
        ]
        return {"results": results, "model": self.model}

    @api.get(
        "/healthz",
        summary="Liveness: the ingress answers",
        response_model=None,
        responses={200: {"model": oa.Health, "description": "alive"}},
    )
    async def healthz(self):
        return {"status": "ok"}

    @api.get(
        "/readyz",
        summary="Readiness: a classifier replica has the named model loaded",
        response_model=None,
        responses={
            200: {"model": oa.Ready, "description": "ready"},
            503: {"model": oa.NotReady, "description": "not ready", "headers": oa.RETRY_AFTER},
        },
    )
    async def readyz(self):
        headers = {"Retry-After": str(self.args.retry_after_s)}
        try:
            info = await self._info()
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            body = {"status": "not_ready", "reason": f"{type(e).__name__}: {e}"[:300]}
            return JSONResponse(body, status_code=503, headers=headers)
        if info.get("weights_sha256") != self.meta["weights_sha256"]:
            body = {
                "status": "not_ready",
                "reason": f"the classifier serves weights {str(info.get('weights_sha256'))[:12]}, "
                f"not {self.model['version']}",
            }
            return JSONResponse(body, status_code=503, headers=headers)
        return JSONResponse({"status": "ready", "model": self.model, **info})

    @api.get(
        "/v1/model",
        summary="The served model: name, version, classes, input size, metrics, limits",
        response_model=None,
        responses={
            200: {"description": "the model and the service's limits"},
            503: oa.error_response("no classifier replica answered", headers=oa.RETRY_AFTER),
        },
    )
    async def model_info(self):
        try:
            info = await self._info()
        except Exception as e:  # noqa: BLE001
            raise unavailable(
                "model_unavailable",
                f"no classifier answered ({type(e).__name__})",
                self.args.retry_after_s,
            ) from e
        a = self.args
        return {
            **self.model,
            "weights_sha256": self.meta["weights_sha256"],
            "classes": self.classes,
            "input_size": self.pre["input_size"],
            "preprocessing": self.pre,
            "metrics": self.meta.get("metrics", {}),
            "created": self.meta.get("created"),
            "checkpoint": self.checkpoint,
            **({"members": self.meta["members"]} if "members" in self.meta else {}),
            "limits": {
                "max_images_per_request": a.max_images_per_request,
                "max_body_bytes": a.max_body_bytes,
                "max_image_pixels": a.max_image_pixels,
                "max_request_pixels": a.max_request_pixels,
                "formats": list(a.formats),
                "max_inflight_images": a.max_inflight_images,
                "model_timeout_s": a.model_timeout_s,
            },
            **info,
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self, request: Request):
        """The OpenAPI document, with this deployment's image-count limit in the schemas and
        its route prefix as the server URL."""
        if self._openapi is None:
            root = request.scope.get("root_path") or ""
            doc = get_openapi(
                title=api.title,
                version=api.version,
                description=api.description,
                routes=api.routes,
                servers=[{"url": root}] if root else None,
            )
            body = doc["paths"]["/v1/classify/batch"]["post"]["requestBody"]["content"]
            n = self.args.max_images_per_request
            body["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] = n
            body["application/json"]["schema"]["properties"]["images"]["maxItems"] = n
            self._openapi = doc
        return JSONResponse(self._openapi)

    @api.get("/docs", include_in_schema=False)
    async def docs(self):
        return HTMLResponse(
            get_swagger_ui_html(openapi_url="/openapi.json", title="cellmodel").body
        )


def build_app(args: AppArgs) -> serve.Application:
    """The application for ``serve run serve.app:build_app checkpoint=...`` and config.yaml.

    Reads the checkpoint's metadata and hashes its weights first, so a wrong path or
    inconsistent folder fails here with a clear message instead of in a replica that restarts
    forever; the ingress and every classifier replica are then pinned to those weights.
    """
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    ckpt = args.resolved_checkpoint()
    meta = pinned_meta(ckpt)
    resolved = args.model_copy(update={"checkpoint": ckpt})
    if args.layout == "fused":
        # The replica's CPUs are its model's threads (config files may say otherwise).
        cpus = args.torch_threads or 1
        return Ingress.options(ray_actor_options={"num_cpus": cpus}).bind(
            None, resolved.model_dump(), meta
        )
    classifier = Classifier.bind(
        ckpt,
        args.backend,
        args.torch_threads,
        weights_sha256=meta["weights_sha256"],
        tta=args.tta,
        int8_calibration=args.int8_calibration,
    )
    return Ingress.bind(classifier, resolved.model_dump(), meta)
