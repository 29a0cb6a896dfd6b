"""ONNX export of a classifier and an ONNX Runtime session that stands in for its forward.

The export runs in memory when a predictor starts (no file to keep in sync with the
checkpoint), and is checked against eager PyTorch on a random batch before it is used.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

# Outputs must match eager PyTorch this closely (logits), or the export is refused.
ATOL = 1e-4


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not match eager PyTorch."""


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], opset: int = 17) -> bytes:
    """The model's forward as ONNX bytes, with a dynamic batch dimension."""
    x = torch.zeros(2, *input_size)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter handles nn.LSTM with a dynamic batch directly.
            torch.onnx.export(
                model.eval(),
                (x,),
                buf,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {e}") from e
    return buf.getvalue()


class OnnxForward:
    """Logits from an ONNX model through ONNX Runtime on CPU."""

    def __init__(self, onnx_bytes: bytes, num_threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


def onnx_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    num_threads: int | None = None,
    atol: float = ATOL,
    seed: int = 0,
) -> OnnxForward:
    """Export ``model`` and return its ONNX Runtime forward, after checking it against eager.

    Raises ``ExportError`` when the largest logit difference on a random batch exceeds ``atol``.
    """
    runner = OnnxForward(export_onnx(model, input_size), num_threads)
    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = model.eval()(x).float().numpy()
    diff = float(np.abs(runner(x.numpy()) - ref).max())
    if not diff <= atol:
        raise ExportError(
            f"ONNX Runtime logits differ from eager PyTorch by {diff:.2e} (> {atol:.0e}); "
            "use backend 'eager'"
        )
    return runner
