"""Parameters, FLOPs and CPU forward time of every registered variant."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cellmodel.models.registry import build_model, list_models


def lstm_flops(lstm: nn.LSTM, seq_len: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one sequence through ``lstm``.

    The FLOP counter does not see inside the fused LSTM kernel, so the four gates'
    input and recurrent projections are counted here.
    """
    dirs = 2 if lstm.bidirectional else 1
    total, in_size = 0, lstm.input_size
    for _ in range(lstm.num_layers):
        total += dirs * seq_len * 2 * 4 * lstm.hidden_size * (in_size + lstm.hidden_size)
        in_size = lstm.hidden_size * dirs
    return total


def count_flops(model: nn.Module, batch: int = 1) -> int:
    """FLOPs of one forward at the model's input size (conv/matmul by counter, LSTM by formula)."""
    x = torch.zeros(batch, *model.cfg.input_size)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    model.train(was_training)
    total = fc.get_total_flops()
    if getattr(model, "rnn", None) is not None:
        seq_len = model.cfg.height // model.cfg.rnn_downsample
        total += batch * lstm_flops(model.rnn, seq_len)
    return int(total)


def time_forwards(
    models: dict[str, nn.Module], batch: int = 8, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of an eval-mode CPU forward at ``batch`` for each model.

    Models are timed in turn within each repeat (after one warm-up each), so a burst of load
    on a shared machine hits all of them alike instead of one.
    """
    inputs = {n: torch.randn(batch, *m.cfg.input_size) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for n, m in models.items():
            m.eval()(inputs[n])
        for _ in range(repeats):
            for n, m in models.items():
                t0 = time.perf_counter()
                m(inputs[n])
                times[n].append(time.perf_counter() - t0)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def summary_rows(names: list[str] | None = None, batch: int = 8, repeats: int = 3) -> list[dict]:
    models = {n: build_model(n) for n in names or list_models()}
    secs = time_forwards(models, batch, repeats)
    rows = []
    for name, m in models.items():
        c, h, w = m.cfg.input_size
        rows.append(
            {
                "model": name,
                "input": f"{w}x{h}",
                "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
                "gflops": count_flops(m) / 1e9,
                "forward_s": secs[name],
            }
        )
    return rows


def format_table(rows: list[dict], batch: int = 8) -> str:
    base = next((r for r in rows if r["model"] == "xception_bilstm"), rows[0])
    lines = [
        f"| model | input (WxH) | params (M) | GFLOPs / image | CPU forward, batch {batch} (ms) "
        f"| time vs {base['model']} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params_m']:.2f} | {r['gflops']:.3f} | "
            f"{r['forward_s'] * 1e3:.0f} | {r['forward_s'] / base['forward_s']:.3f} |"
        )
    return "\n".join(lines)
