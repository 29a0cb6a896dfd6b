"""The Serve application: a FastAPI ingress in front of a batching classifier deployment.

Ingress: reads and decodes the upload (refusing bad input with a 4xx before it reaches a
model), preprocesses it with the checkpoint's own preprocessing, and sends one array per
image to the classifier. Classifier: loads the checkpoint once and runs dynamic batches
(``@serve.batch``) whose size and wait time come from its ``user_config``.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` type on the
# route methods, which Serve ships to replicas by value.
import asyncio
import hashlib
import json

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

import cellmodel
from cellmodel.data.transforms import ImageDecodeError, decode_image, to_array
from cellmodel.infer.predictor import Predictor
from cellmodel.models.checkpoint import read_checkpoint_meta
from serve import metrics
from serve.requests import ApiError, Image, decode_error, read_images
from serve.settings import AppArgs, BatchConfig


def model_version(meta: dict) -> str:
    """A short digest of the checkpoint's metadata: changes whenever a new checkpoint is saved."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def _replica_cpus() -> int:
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(round(cpus)))


@serve.deployment(
    name="Classifier",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 1},
    user_config=BatchConfig().model_dump(),
)
class Classifier:
    """Holds one loaded checkpoint; classifies preprocessed arrays in dynamic batches."""

    def __init__(self, checkpoint: str, backend: str = "auto", torch_threads: int | None = None):
        self.predictor = Predictor(
            checkpoint, backend=backend, num_threads=torch_threads or _replica_cpus()
        )
        self.classes = self.predictor.classes
        self._predictions = metrics.predictions_counter()
        self._batch_sizes = metrics.batch_size_histogram()
        self.batch_config = BatchConfig()

    def reconfigure(self, user_config: dict) -> None:
        """Apply a new ``user_config`` (batch size, wait timeout) without reloading the model."""
        cfg = BatchConfig.model_validate(user_config or {})
        self.classify.set_max_batch_size(cfg.max_batch_size)
        self.classify.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_config = cfg

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for each (3, H, W) array; Serve gathers concurrent calls into ``xs``."""
        # The forward runs off the event loop so new requests keep queueing for the next batch.
        probs = await asyncio.to_thread(self.predictor.predict_arrays, np.stack(xs))
        self._batch_sizes.observe(len(xs))
        for k, n in zip(*np.unique(probs.argmax(axis=1), return_counts=True)):
            self._predictions.inc(int(n), {"class_name": self.classes[k]})
        return list(probs)

    def info(self) -> dict:
        return {
            "backend": self.predictor.backend,
            "device": str(self.predictor.device),
            "batching": self.batch_config.model_dump(),
        }


api = FastAPI(
    title="cellmodel",
    version=cellmodel.__version__,
    description="White-blood-cell classification (EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL).",
)


_rejected = None


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    """Every client mistake: its 4xx JSON body, and one count in the rejected-inputs metric."""
    global _rejected
    if _rejected is None:  # created in the replica process, where the metric is exported
        _rejected = metrics.rejected_counter()
    _rejected.inc(tags={"reason": e.reason})
    return e.response()


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress:
    """HTTP routes; decoding and validation happen here, inference in the classifier."""

    def __init__(self, classifier: DeploymentHandle, args: dict) -> None:
        self.classifier = classifier
        self.args = AppArgs.model_validate(args)
        self.checkpoint = self.args.resolved_checkpoint()
        self.meta = read_checkpoint_meta(self.checkpoint)
        self.pre = self.meta["preprocessing"]
        self.classes = list(self.meta["classes"])
        self.model = {"name": self.meta["model_name"], "version": model_version(self.meta)}

    # -- helpers ----------------------------------------------------------------------------
    def _decode(self, images: list[Image]) -> list[np.ndarray]:
        out = []
        for i, im in enumerate(images):
            try:
                img = decode_image(im.data, max_pixels=self.args.max_image_pixels)
            except ImageDecodeError as e:
                raise decode_error(e, None if len(images) == 1 else i, im.filename) from e
            out.append(to_array(img, self.pre))
        return out

    def _result(self, p: np.ndarray) -> dict:
        k = int(p.argmax())
        return {
            "class": self.classes[k],
            "class_index": k,
            "probability": float(p[k]),
            "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
        }

    async def _classify(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        # One call per image: Serve's batching groups them with other clients' images.
        return await asyncio.gather(*(self.classifier.classify.remote(a) for a in arrays))

    # -- routes -----------------------------------------------------------------------------
    @api.post("/v1/classify", summary="Classify one cell image")
    async def classify(self, request: Request) -> dict:
        """One image as a raw ``image/*`` body, or one file part of a multipart form."""
        images = await read_images(request, self.args.max_body_bytes, allow_json=False)
        if len(images) != 1:
            raise ApiError(
                400,
                "wrong_image_count",
                f"expected exactly one image, got {len(images)}; post several to /v1/classify/batch",
            )
        arrays = await run_in_threadpool(self._decode, images)
        (p,) = await self._classify(arrays)
        return {**self._result(p), "model": self.model}

    @api.post("/v1/classify/batch", summary="Classify several cell images, results in order")
    async def classify_batch(self, request: Request) -> dict:
        """Multipart file parts, or JSON ``{"images": [base64, ...]}``; one result per image."""
        images = await read_images(request, self.args.max_body_bytes, allow_json=True)
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
        arrays = await run_in_threadpool(self._decode, images)
        probs = await self._classify(arrays)
        results = [
            {"index": i, "filename": im.filename, **self._result(p)}
            for i, (im, p) in enumerate(zip(images, probs))
        ]
        return {"results": results, "model": self.model}

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: a classifier replica has the model loaded")
    async def readyz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.classifier.info.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            body = {"status": "not_ready", "reason": f"{type(e).__name__}: {e}"[:300]}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "model": self.model, **info})

    @api.get("/v1/model", summary="The served model: name, classes, input size, metrics")
    async def model_info(self) -> dict:
        info = await self.classifier.info.remote()
        return {
            **self.model,
            "classes": self.classes,
            "input_size": self.pre["input_size"],
            "preprocessing": self.pre,
            "metrics": self.meta.get("metrics", {}),
            "created": self.meta.get("created"),
            "checkpoint": self.checkpoint,
            "limits": {
                "max_images_per_request": self.args.max_images_per_request,
                "max_body_bytes": self.args.max_body_bytes,
                "max_image_pixels": self.args.max_image_pixels,
            },
            **info,
        }


def build_app(args: AppArgs) -> serve.Application:
    """The application for ``serve run serve.app:build_app checkpoint=...`` and config.yaml.

    Reads the checkpoint's metadata first, so a wrong path fails here with a clear message
    instead of in a replica that restarts forever.
    """
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    ckpt = args.resolved_checkpoint()
    read_checkpoint_meta(ckpt)
    resolved = args.model_copy(update={"checkpoint": ckpt})
    classifier = Classifier.bind(ckpt, args.backend, args.torch_threads)
    return Ingress.bind(classifier, resolved.model_dump())
