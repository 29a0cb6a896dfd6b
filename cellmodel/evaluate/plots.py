"""The report's pictures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Counts in each cell, colour by the row-normalised rate (recall along the diagonal)."""
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.3 * k + 2, 1.1 * k + 1.5))
    im = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(k):
        for p in range(k):
            color = "white" if rate[t, p] > 0.55 else "black"
            ax.text(p, t, f"{cm[t, p]}\n{rate[t, p]:.0%}", ha="center", va="center", color=color)
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (count, share of the true class)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def reliability_png(calibration: dict) -> bytes:
    """Accuracy against mean confidence per bin, with the bin counts underneath."""
    edges = np.asarray(calibration["edges"])
    count = np.asarray(calibration["count"])
    acc = np.asarray(calibration["accuracy"])
    conf = np.asarray(calibration["confidence"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, (ax, axc) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    nonempty = count > 0
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(
        centers[nonempty],
        acc[nonempty],
        width=width * 0.9,
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    ax.plot(conf[nonempty], acc[nonempty], "o", color="tab:red", label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centers, count, width=width * 0.9, color="tab:grey")
    axc.set_xlim(0, 1)
    axc.set_xlabel("top-1 confidence")
    axc.set_ylabel("images")
    return _png(fig)


def image_grid_png(
    images: Sequence[np.ndarray], titles: Sequence[str], *, cols: int = 4, title: str = ""
) -> bytes:
    """Images (H, W, 3 uint8) in a grid with a small caption each."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes to show", ha="center", va="center")
        return _png(fig)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, t in zip(axes.ravel(), images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig)
