"""Bytes or arrays in, class probabilities out, for a checkpoint loaded once.

Two backends compute the same logits: ``eager`` (PyTorch under ``inference_mode`` with
channels_last input) and ``onnx`` (the model exported in memory at load time and run by
ONNX Runtime, refused unless it matches eager within 1e-4). ``auto`` picks ONNX Runtime on
CPU, where it measured fastest (BENCHMARKS.md, Serving), and eager on a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import numpy as np
import torch

from cellmodel.data.transforms import stack_bytes
from cellmodel.models.checkpoint import load_checkpoint

BACKENDS = ("auto", "eager", "onnx")
log = logging.getLogger(__name__)


class Predictor:
    """A checkpoint ready for inference: eval mode, no autograd, channels_last on 4-D input.

    ``backend`` is ``"eager"``, ``"onnx"`` (CPU only) or ``"auto"`` (ONNX on CPU when
    onnxruntime is installed and the export matches, else eager); ``num_threads`` caps the intra-op
    threads (a Serve replica sets it to its CPU share so replicas do not oversubscribe).
    """

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        *,
        backend: str = "eager",
        num_threads: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if backend == "onnx" and self.device.type != "cpu":
            raise ValueError("backend 'onnx' runs on CPU only; use backend 'eager' on a GPU")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.meta = load_checkpoint(checkpoint, map_location=self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = self.model.cfg
        self.classes = list(self.cfg.classes)
        self._onnx = None
        self.backend = "eager"
        want_onnx = backend == "onnx" or (
            backend == "auto"
            and self.device.type == "cpu"
            and importlib.util.find_spec("onnxruntime") is not None
        )
        if want_onnx:
            from cellmodel.infer.export import ExportError, onnx_forward

            try:
                self._onnx = onnx_forward(self.model, self.cfg.input_size, num_threads)
                self.backend = "onnx"
            except ExportError as e:
                if backend == "onnx":
                    raise
                log.warning("backend auto: using eager PyTorch (%s)", e)

    @torch.inference_mode()
    def logits_arrays(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) for a preprocessed float32 batch (N, 3, H, W)."""
        if self._onnx is not None:
            return self._onnx(x)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        t = t.contiguous(memory_format=torch.channels_last)
        return self.model(t).float().cpu().numpy()

    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) for a preprocessed float32 batch (N, 3, H, W)."""
        return softmax(self.logits_arrays(x))

    def predict_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images; raises ``ImageDecodeError`` on a bad one."""
        return self.predict_arrays(stack_bytes(images, self.cfg))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
