"""``python -m jobs.bench models``: the model summary table (same as ``python -m cellmodel.models``)."""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cellmodel.models.summary import format_table, summary_rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench models", description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*")
    a = ap.parse_args(argv)
    print(
        f"{time.strftime('%Y-%m-%d')} {platform.machine()} torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(format_table(summary_rows(a.models, a.batch, a.repeats), a.batch))
    return 0
