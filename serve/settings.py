"""Typed settings of the Serve application: builder arguments and the batching user_config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cellmodel import storage
from cellmodel.data.transforms import MAX_PIXELS

CHECKPOINT_ENV = "CELLMODEL_CHECKPOINT"
# Where the quickstart (`make demo`, jobs/demo.py) leaves its best checkpoint, from the repo root.
DEFAULT_CHECKPOINT = "runs/quickstart/model"


class AppArgs(BaseModel):
    """Arguments of ``serve.app:build_app`` (the ``args`` of an application in config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None,
        description=f"checkpoint folder (local path or s3:// URI); default ${CHECKPOINT_ENV}, "
        f"else {DEFAULT_CHECKPOINT}",
    )
    backend: Literal["auto", "eager", "onnx"] = Field(
        "auto",
        description="auto (ONNX Runtime on CPU, eager on GPU), eager PyTorch, or ONNX Runtime "
        "(CPU only; checked against eager within 1e-4 at load)",
    )
    max_images_per_request: int = Field(64, ge=1, description="images per batch request")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request body size limit")
    max_image_pixels: int = Field(MAX_PIXELS, ge=1, description="width x height limit per image")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per classifier replica; default its CPU share"
    )

    def resolved_checkpoint(self) -> str:
        """The checkpoint URI to load: the argument, the env variable, or the default.

        A local relative path is made absolute here, because replicas may start in another
        working directory than the one ``serve run`` was called from.
        """
        uri = self.checkpoint or os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT
        return uri if storage.is_remote(uri) else str(Path(uri).expanduser().absolute())


class BatchConfig(BaseModel):
    """The classifier's ``user_config``: changeable on a running deployment without restarts."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
