"""``python -m cellmodel.models``: a table of every variant (parameters, GFLOPs, CPU time)."""

import argparse

import torch

from cellmodel.models.summary import format_table, summary_rows

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", help="registered names (default: all)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(format_table(summary_rows(a.models, a.batch, a.repeats), a.batch))
