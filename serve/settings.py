"""Typed settings of the Serve application: builder arguments and the batching user_config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cellmodel import storage
from cellmodel.data.transforms import MAX_PIXELS
from cellmodel.models.checkpoint import BUNDLED, CHECKPOINT_ENV, default_checkpoint
from serve.images import DEFAULT_FORMATS, MEDIA_TYPES

# Where the quickstart (`make demo`, jobs/demo.py) leaves its best checkpoint, from the repo root.
DEFAULT_CHECKPOINT = BUNDLED  # the bundled model (models/README.md)


class AppArgs(BaseModel):
    """Arguments of ``serve.app:build_app`` (the ``args`` of an application in config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None,
        description=f"checkpoint folder (local path or s3:// URI); default ${CHECKPOINT_ENV}, "
        f"else {DEFAULT_CHECKPOINT}",
    )
    backend: Literal["auto", "eager", "onnx", "openvino", "onnx-int8"] = Field(
        "auto",
        description="auto (the fastest exact backend measured when the replica starts; eager on "
        "a GPU), eager PyTorch, ONNX Runtime or OpenVINO (CPU only; checked against eager "
        "within 1e-4 at load), or onnx-int8 (int8 ONNX Runtime, needs int8_calibration; not "
        "bit-equal: see BENCHMARKS.md for its accuracy)",
    )
    layout: Literal["split", "fused"] = Field(
        "split",
        description="split: an Ingress deployment calls a Classifier deployment (scaled apart; "
        "GPU classifiers behind CPU ingresses); fused: each Ingress replica holds the model and "
        "batches its own requests (one Ray hop fewer per request; for CPU-only serving, "
        "serve/config-cpu.yaml). In the fused layout the Ingress takes the batching user_config",
    )
    int8_calibration: str | None = Field(
        None, description="folder of images to calibrate backend onnx-int8 on (local path)"
    )
    tta: bool = Field(
        False,
        description="test-time augmentation: average over the 8 flips and quarter turns of "
        "each image (8 forwards per image: about 8x the model time)",
    )
    max_images_per_request: int = Field(64, ge=1, description="images per batch request")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request body size limit")
    max_image_pixels: int = Field(MAX_PIXELS, ge=1, description="width x height limit per image")
    max_request_pixels: int = Field(
        MAX_PIXELS,
        ge=1,
        description="pixels one request may decode, summed over its images (after JPEG draft "
        "reduction)",
    )
    formats: tuple[str, ...] = Field(
        DEFAULT_FORMATS, min_length=1, description="accepted image formats (Pillow names)"
    )
    max_inflight_images: int = Field(
        48,
        ge=1,
        description="images an ingress replica has in flight at once; a request over it is "
        "answered 503 with Retry-After at once (one request is always admitted when none is "
        "in flight)",
    )
    model_timeout_s: float = Field(
        10.0, gt=0, description="deadline of the calls to the classifier for one request"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) on a 503")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per classifier replica; default its CPU share"
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        v = tuple(f.upper() for f in v)
        unknown = sorted(set(v) - set(MEDIA_TYPES))
        if unknown:
            raise ValueError(f"unknown formats {unknown}; choose from {sorted(MEDIA_TYPES)}")
        return v

    def resolved_checkpoint(self) -> str:
        """The checkpoint URI to load: the argument, the env variable, or the default.

        A local relative path is made absolute here, because replicas may start in another
        working directory than the one ``serve run`` was called from.
        """
        uri = self.checkpoint or default_checkpoint()
        return uri if storage.is_remote(uri) else str(Path(uri).expanduser().absolute())


class BatchConfig(BaseModel):
    """The classifier's ``user_config``: changeable on a running deployment without restarts."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
    concurrent_batches: int = Field(
        2,
        ge=1,
        le=2,
        description="batches a replica runs at once: 2 (exported CPU backends on 2+ threads): a "
        "batch alone gets every thread, two batches run side by side on half the threads each; "
        "1: one batch at a time on every thread. Eager PyTorch always runs one at a time",
    )
