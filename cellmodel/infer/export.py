"""ONNX export of a classifier, and the runtimes that stand in for its forward on CPU.

The export runs in memory when a predictor starts (no file to keep in sync with the
checkpoint). ONNX Runtime (fp32) and OpenVINO (fp32) are checked against eager PyTorch on a
random batch before they are used. The int8 path (ONNX Runtime static quantisation,
calibrated on real images) cannot match within 1e-4 by design: its accuracy is measured
against the fp32 model on held-out images instead (``python -m jobs.bench serve --parts int8``).
"""

from __future__ import annotations

import io
import os
import tempfile
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
    """Logits from an ONNX model through ONNX Runtime on CPU.

    ``optimization``: ONNX Runtime's graph optimisation level (``all``: constant folding,
    node fusions and layout changes; ``extended``; ``basic``; ``none``). ``spin``: whether idle
    intra-op threads busy-wait for work; off by default, because on a CPU shared by several
    replicas (or other jobs) spinning threads burn the cores the others need.
    """

    LEVELS = ("none", "basic", "extended", "all")

    def __init__(
        self,
        onnx_bytes: bytes,
        num_threads: int | None = None,
        *,
        optimization: str = "all",
        spin: bool = False,
    ) -> None:
        import onnxruntime as ort

        levels = dict(
            zip(
                self.LEVELS,
                (
                    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                ),
            )
        )
        self.onnx_bytes, self.optimization, self.spin = onnx_bytes, optimization, spin
        self.num_threads = num_threads
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(
            onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def with_threads(self, num_threads: int) -> OnnxForward:
        """A second session of the same model on ``num_threads`` intra-op threads (already
        checked: the same bytes and options)."""
        return OnnxForward(
            self.onnx_bytes, num_threads, optimization=self.optimization, spin=self.spin
        )


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
    check_against_eager(runner, model, input_size, atol, seed, "ONNX Runtime")
    return runner


def check_against_eager(runner, model, input_size, atol: float, seed: int, what: str) -> float:
    """The largest logit difference between ``runner`` and eager PyTorch on a random batch;
    raises ``ExportError`` when it is over ``atol``."""
    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = model.eval()(x).float().numpy()
    diff = float(np.abs(runner(x.numpy()) - ref).max())
    if not diff <= atol:
        raise ExportError(
            f"{what} logits differ from eager PyTorch by {diff:.2e} (> {atol:.0e}); "
            "use backend 'eager'"
        )
    return diff


class OpenVinoForward:
    """Logits from the ONNX export compiled by OpenVINO for the CPU, in fp32.

    OpenVINO may run a CPU in bf16 where the hardware has it; the precision hint keeps fp32
    so that the load-time check against eager holds.
    """

    def __init__(self, onnx_bytes: bytes, num_threads: int | None = None) -> None:
        import openvino as ov

        self.onnx_bytes, self.num_threads = onnx_bytes, num_threads
        core = ov.Core()
        with tempfile.TemporaryDirectory() as d:  # read_model wants a path
            path = os.path.join(d, "model.onnx")
            with open(path, "wb") as f:
                f.write(onnx_bytes)
            model = core.read_model(path)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.output = self.compiled.output(0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.compiled(x)[self.output])

    def with_threads(self, num_threads: int) -> OpenVinoForward:
        """The same model compiled again for ``num_threads`` threads."""
        return OpenVinoForward(self.onnx_bytes, num_threads)


def openvino_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    num_threads: int | None = None,
    atol: float = ATOL,
    seed: int = 0,
) -> OpenVinoForward:
    """``model`` exported and compiled by OpenVINO, checked against eager like ONNX Runtime."""
    blob = export_onnx(model, input_size)  # ExportError when the export itself fails
    try:
        runner = OpenVinoForward(blob, num_threads)
    except ImportError:
        raise  # not installed: the caller decides
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own RuntimeError types
        raise ExportError(f"OpenVINO could not compile {type(model).__name__}: {e}") from e
    check_against_eager(runner, model, input_size, atol, seed, "OpenVINO")
    return runner


def quantize_int8(
    onnx_bytes: bytes,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    activations: str = "int8-symmetric",
    method: str = "percentile",
    op_types: tuple[str, ...] = ("Conv",),
) -> bytes:
    """Static int8 quantisation (QDQ, int8 weights per channel, int8 activations with ranges
    from ``calibration``, a preprocessed float32 batch of real images) of an fp32 ONNX model.

    By default the convolutions (nearly all of a CNN's FLOPs) are quantised, with activation
    ranges at the 99.999th percentile of the calibration values (``method``: ``percentile``,
    ``minmax`` or ``entropy``); the head's matrix products and the LSTM stay fp32 (ONNX
    Runtime has no static int8 LSTM). ``activations``: ``int8-symmetric``, ``int8`` or
    ``uint8``. These defaults were chosen by top-1 agreement with fp32 on images outside any
    validation split (BENCHMARKS.md). Raises ``ExportError`` when quantisation fails.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.items = iter([{"x": x[i : i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, pre, out = (os.path.join(d, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(onnx_bytes)
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            quantize_static(
                pre,
                out,
                Reader(np.ascontiguousarray(calibration, dtype=np.float32)),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types),
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[method],
                extra_options={"ActivationSymmetric": activations == "int8-symmetric"},
            )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"int8 quantisation failed: {e}") from e
        with open(out, "rb") as f:
            return f.read()


def int8_forward(
    model: nn.Module,
    input_size: tuple[int, int, int],
    calibration: np.ndarray,
    num_threads: int | None = None,
) -> OnnxForward:
    """``model`` exported, quantised to int8 on ``calibration`` and run by ONNX Runtime."""
    return OnnxForward(quantize_int8(export_onnx(model, input_size), calibration), num_threads)
