"""Bytes or arrays in, class probabilities out, for a checkpoint loaded once.

Backends compute the same logits: ``eager`` (PyTorch under ``inference_mode`` with
channels_last input), ``onnx`` (the model exported in memory at load time and run by ONNX
Runtime, refused unless it matches eager within 1e-4) and ``openvino`` (the same export
compiled by OpenVINO, same check; only when the ``openvino`` package is installed).
``onnx-int8`` is different on purpose: ONNX Runtime with int8 weights and activations
(static post-training quantisation, calibrated on real images): faster, not bit-equal, so
it is never picked by ``auto`` and its accuracy is measured separately (BENCHMARKS.md).

``auto`` times every exact backend available on this device at load and keeps the fastest
(on a GPU: eager). ``tta=True`` averages the softmax over the 8 flips and quarter turns of
each image (8 forwards per image).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cellmodel.data.transforms import stack_bytes
from cellmodel.models.checkpoint import load_checkpoint

BACKENDS = ("auto", "eager", "onnx", "onnx-int8", "openvino")
# Test-time augmentation: (quarter turns counter-clockwise, mirrored left-right first).
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((k, f) for f in (False, True) for k in range(4))
log = logging.getLogger(__name__)


def _fit(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """``a`` cut to its centre ``n`` entries along ``axis``, or mirrored outwards to ``n``."""
    size = a.shape[axis]
    if size > n:
        start = (size - n) // 2
        return np.take(a, np.arange(start, start + n), axis=axis)
    if size < n:
        pad = [(0, 0)] * a.ndim
        before = (n - size) // 2
        pad[axis] = (before, n - size - before)
        return np.pad(a, pad, mode="symmetric")
    return a


def dihedral(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Images ``x`` (..., H, W) mirrored left-right (if ``flip``), then turned by ``k`` quarter
    turns counter-clockwise about the centre, in the same H x W frame.

    On a square frame this is exactly ``np.rot90``. On a rectangle (the paper's 320x240) a
    quarter turn does not fit: as in the rotation augmentation used for training
    (``cellmodel.data.augment``), the ends that leave the frame are cut off and the uncovered
    sides are filled by mirroring the image outwards.
    """
    if flip:
        x = x[..., ::-1]
    k %= 4
    h, w = x.shape[-2:]
    y = np.rot90(x, k, axes=(-2, -1))
    if k % 2 and h != w:
        y = _fit(_fit(y, h, y.ndim - 2), w, y.ndim - 1)
    return np.ascontiguousarray(y)


def _time_ms(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, repeats: int = 3) -> float:
    """Best per-image time of a few calls (other load on a shared machine only adds time)."""
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best / len(x) * 1e3


def _calibration_arrays(source, cfg, limit: int = 64) -> np.ndarray:
    """A preprocessed float32 batch for int8 calibration: from an array, encoded images, or a
    folder of images (its first ``limit`` JPEG/PNG files, sorted)."""
    if isinstance(source, np.ndarray):
        return source.astype(np.float32)
    if isinstance(source, (str, Path)):
        files = sorted(
            p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
        )
        step = max(1, len(files) // limit)
        source = [p.read_bytes() for p in files[::step][:limit]]
    if not source:
        raise ValueError("backend 'onnx-int8' needs calibration images (none found)")
    return stack_bytes(list(source), cfg)


class Predictor:
    """A checkpoint ready for inference: eval mode, no autograd, channels_last on 4-D input.

    ``backend``: ``"eager"``, ``"onnx"``, ``"openvino"``, ``"onnx-int8"`` (CPU only; needs
    ``calibration``: a folder of images, encoded images or a preprocessed batch) or
    ``"auto"`` (the fastest exact backend measured at load; ``backend_timings`` holds the
    figures). ``num_threads`` caps the intra-op threads (a Serve replica sets it to its CPU
    share so replicas do not oversubscribe). ``tta=True`` averages the softmax over the 8
    dihedral transforms of each image (``DIHEDRAL``, ``dihedral``). ``expected_sha256``
    refuses weights other than the named ones (``CheckpointError``).

    ``concurrent_batches=2`` prepares a second forward of an exported backend on half the
    threads, for a caller that runs two batches at once: a batch alone takes every thread
    (the lowest latency), a batch that starts while another runs takes the second forward
    (``concurrent=True``), so that under load two batches run side by side instead of
    sharing threads that wait on each other at every operator. ``lanes`` says whether it is
    there (2) or not (1: eager PyTorch, one thread, or not asked for).
    """

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        *,
        backend: str = "eager",
        num_threads: int | None = None,
        tta: bool = False,
        expected_sha256: str | None = None,
        calibration=None,
        concurrent_batches: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if backend not in ("auto", "eager") and self.device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on CPU only; use backend 'eager' on a GPU")
        if num_threads:
            torch.set_num_threads(num_threads)
        self.num_threads = num_threads or torch.get_num_threads()
        self.tta = bool(tta)
        self.model, self.meta = load_checkpoint(
            checkpoint, map_location=self.device, expected_sha256=expected_sha256
        )
        self.weights_sha256: str = self.meta["weights_sha256"]
        # Temperature scaling (cellmodel.evaluate.calibrate): logits / T before the softmax.
        self.temperature = float((self.meta.get("calibration") or {}).get("temperature", 1.0))
        self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = self.model.cfg
        self.classes = list(self.cfg.classes)
        pre = self.cfg.preprocessing()
        self._mean = np.asarray(pre["mean"], np.float32)
        self._std = np.asarray(pre["std"], np.float32)
        self._forward: Callable[[np.ndarray], np.ndarray] = self._eager
        self.backend = "eager"
        self.backend_timings: dict[str, float] = {}
        if backend == "auto":
            if self.device.type == "cpu":
                self._pick_fastest(num_threads)
        elif backend != "eager":
            self._forward = self._build(backend, num_threads, calibration)
            self.backend = backend
        # The second lane: exported backends only (torch's threads are one per process).
        self._lane_forward: Callable[[np.ndarray], np.ndarray] | None = None
        if (
            concurrent_batches > 1
            and self.num_threads > 1
            and hasattr(self._forward, "with_threads")
        ):
            self._lane_forward = self._forward.with_threads(max(1, self.num_threads // 2))
        self.lanes = 2 if self._lane_forward is not None else 1

    # -- backends ---------------------------------------------------------------------------
    def _build(self, backend: str, num_threads: int | None, calibration=None):
        from cellmodel.infer import export

        size = self.cfg.input_size
        if backend == "onnx":
            return export.onnx_forward(self.model, size, num_threads)
        if backend == "openvino":
            return export.openvino_forward(self.model, size, num_threads)
        if calibration is None:
            raise ValueError("backend 'onnx-int8' needs calibration images (calibration=...)")
        calib = _calibration_arrays(calibration, self.cfg)
        return export.int8_forward(self.model, size, calib, num_threads)

    def _pick_fastest(self, num_threads: int | None, batch: int = 4) -> None:
        """Time eager and every exact exported backend that builds here; keep the fastest."""
        from cellmodel.infer.export import ExportError

        candidates = {"eager": self._eager}
        names = ["onnx"] * (importlib.util.find_spec("onnxruntime") is not None)
        names += ["openvino"] * (importlib.util.find_spec("openvino") is not None)
        for name in names:
            try:
                candidates[name] = self._build(name, num_threads)
            except (ExportError, ImportError, RuntimeError) as e:
                log.warning("backend auto: %s is unavailable (%s)", name, e)
        x = np.random.default_rng(0).standard_normal((batch, *self.cfg.input_size), np.float32)
        self.backend_timings = {n: round(_time_ms(f, x), 3) for n, f in candidates.items()}
        self.backend = min(self.backend_timings, key=self.backend_timings.get)
        self._forward = candidates[self.backend]
        log.info(
            "backend auto: %s (ms/img at batch %d: %s)", self.backend, batch, self.backend_timings
        )

    @torch.inference_mode()
    def _eager(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        t = t.contiguous(memory_format=torch.channels_last)
        return self.model(t).float().cpu().numpy()

    # -- inference --------------------------------------------------------------------------
    def logits_arrays(self, x: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """Logits (N, num_classes) for a preprocessed float32 batch (N, 3, H, W); no TTA.
        ``concurrent``: another batch is running beside this one (the second lane, if any)."""
        if concurrent and self._lane_forward is not None:
            return self._lane_forward(x)
        return self._forward(x)

    def predict_arrays(self, x: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """Probabilities (N, num_classes) for a preprocessed float32 batch (N, 3, H, W).

        With ``tta``, the mean of the softmax over the 8 dihedral transforms of each image.
        The logits are divided by the checkpoint's temperature (``calibration.temperature``
        in ``checkpoint.json``; 1 when it has none).
        """
        t = self.temperature
        if not self.tta:
            return softmax(self.logits_arrays(x, concurrent=concurrent) / t)
        n = len(x)
        views = np.concatenate([dihedral(x, k, f) for k, f in DIHEDRAL])
        probs = softmax(self.logits_arrays(views, concurrent=concurrent) / t)
        return probs.reshape(len(DIHEDRAL), n, -1).mean(axis=0)

    def normalize_uint8(self, x: np.ndarray) -> np.ndarray:
        """Resized RGB uint8 images (N, H, W, 3) to the model's float32 input (N, 3, H, W):
        the same arithmetic as ``cellmodel.data.transforms.to_array``."""
        a = np.asarray(x, dtype=np.float32) / 255.0
        a = (a - self._mean) / self._std
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))

    def predict_uint8(self, x: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """Probabilities for resized RGB uint8 images (N, H, W, 3) (what the serving ingress
        sends: a quarter of the float32 bytes)."""
        return self.predict_arrays(self.normalize_uint8(x), concurrent=concurrent)

    def predict_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images; raises ``ImageDecodeError`` on a bad one."""
        return self.predict_arrays(stack_bytes(images, self.cfg))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
