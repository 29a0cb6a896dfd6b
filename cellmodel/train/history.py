"""Per-epoch training history: CSV and JSON files and a loss/accuracy plot (the paper's Fig. 6).

Rows are plain dicts with at least ``epoch``, ``phase``, ``train_loss``, ``train_acc``,
``val_loss`` and ``val_acc``. Files go to any local folder or URI through ``cellmodel.storage``.
"""

from __future__ import annotations

import csv
import io
import json

from cellmodel import storage

COLUMNS = (
    "epoch",
    "phase",
    "phase_epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "train_n",
    "val_n",
    "lr",
    "epoch_s",
    "images_per_s",
    "cached",
)
CSV_FILE, JSON_FILE, PLOT_FILE = "history.csv", "history.json", "history.png"


def to_csv(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n"
    )
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], title: str = "") -> bytes:
    """A PNG with loss (left) and accuracy (right) against epoch, phase 2 shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], label=f"train {label}")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], label=f"validation {label}")
        p2 = [r["epoch"] + 1 for r in rows if r["phase"] == 2]
        if p2:
            ax.axvspan(min(p2) - 0.5, max(p2) + 0.5, color="0.92", label="phase 2 (CNN thawed)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_history(
    run_dir: str, rows: list[dict], *, title: str = "", with_plot: bool = True
) -> None:
    """Write ``history.csv``, ``history.json`` and (if there are rows) ``history.png``."""
    storage.write_bytes(storage.join(run_dir, CSV_FILE), to_csv(rows).encode())
    storage.write_bytes(storage.join(run_dir, JSON_FILE), json.dumps(rows, indent=1).encode())
    if with_plot and rows:
        storage.write_bytes(storage.join(run_dir, PLOT_FILE), plot(rows, title))


def read_history(run_dir: str) -> list[dict]:
    """The rows written by ``write_history`` (an empty list when there is none yet)."""
    uri = storage.join(run_dir, JSON_FILE)
    if not storage.exists(uri):
        return []
    return json.loads(storage.read_bytes(uri))
