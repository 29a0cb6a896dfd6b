"""Classification metrics in plain numpy: confusion matrix, precision/recall/F1, calibration.

Conventions (documented in docs/evaluation.md):
- rows of the confusion matrix are true classes, columns predicted classes;
- a ratio whose denominator is zero (precision of a class never predicted, recall of a
  class absent from the data) is reported as 0.0 and a note says so, never NaN, so that
  metrics.json stays valid JSON and tables stay readable;
- macro averages run over the classes present in the data (support > 0): a test split
  that lacks a class should not be scored on a recall nobody could earn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): ``cm[t, p]`` images of true class t predicted as p."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_scores(cm: np.ndarray, classes: Sequence[str]) -> tuple[dict, list[str]]:
    """Precision, recall, F1 and support per class from a confusion matrix, plus notes.

    Returns ``({class: {precision, recall, f1, support, predicted}}, notes)``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    notes = []
    for i, c in enumerate(classes):
        if predicted[i] == 0:
            notes.append(f"{c}: never predicted, so its precision is undefined; reported as 0.")
        if support[i] == 0:
            notes.append(
                f"{c}: absent from the data, so its recall is undefined; reported as 0 and "
                "left out of the macro averages."
            )
    scores = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i, c in enumerate(classes)
    }
    return scores, notes


def calibration_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability-diagram data for the top-1 confidence, in ``n_bins`` equal-width bins.

    Bin ``b`` holds confidences in ``(b/n, (b+1)/n]`` (the first bin also holds 0).
    Returns lists ``edges`` (n_bins + 1), ``count``, ``confidence`` (mean per bin) and
    ``accuracy`` (per bin; 0 for an empty bin, whose count is 0), and ``ece``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = probs.max(axis=1) if probs.size else np.zeros(0)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64) if probs.size else conf
    # ceil(conf * n) - 1 puts conf exactly on an edge into the bin below it: (lo, hi].
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    mean_conf = _safe_div(conf_sum, count)
    mean_acc = _safe_div(acc_sum, count)
    n = max(int(count.sum()), 1)
    ece = float(np.sum(count / n * np.abs(mean_acc - mean_conf)))
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
        "ece": ece,
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the support-weighted mean gap between accuracy and confidence over the bins."""
    return calibration_bins(probs, y_true, n_bins)["ece"]


def log_loss(probs: np.ndarray, y_true: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at ``eps``)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if not len(y_true):
        return 0.0
    p = probs[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(p, eps, 1.0))))


def _spread(counts: list[int]) -> dict:
    if not counts:
        return {"min": 0, "median": 0.0, "max": 0}
    return {"min": int(min(counts)), "median": float(np.median(counts)), "max": int(max(counts))}


def wilson_interval(right: int, total: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion ``right / total`` of independent trials (one
    slide, one answer): unlike the normal approximation it stays inside [0, 1] and is not
    a point at 0 or 1 right. ``[0, 1]`` when ``total`` is 0."""
    from statistics import NormalDist

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if total < 0 or not 0 <= right <= total:
        raise ValueError(f"need 0 <= right <= total, got {right} of {total}")
    if total == 0:
        return [0.0, 1.0]
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = right / total
    den = 1.0 + z * z / total
    mid = (p + z * z / (2 * total)) / den
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    lo = 0.0 if right == 0 else max(0.0, mid - half)  # exact ends where rounding would miss
    hi = 1.0 if right == total else min(1.0, mid + half)
    return [float(lo), float(hi)]


# The three accuracies the resampled intervals give, per image, cell-balanced and by vote.
RESAMPLED = ("accuracy", "cell_balanced_accuracy", "vote_accuracy")


def _check_resampling(level: float, resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def _percentile_interval(draws: list[np.ndarray], level: float) -> list[float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(np.concatenate(draws), [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def source_intervals(
    n: np.ndarray,
    correct: np.ndarray,
    vote_ok: np.ndarray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile intervals of the three accuracies from resampling whole source cells.

    ``n``, ``correct`` and ``vote_ok`` hold one entry per source: its images, its images
    predicted right, and whether its vote is right. Each resample draws as many sources as
    there are, with replacement, and recomputes per-image accuracy (right images over
    images), cell-balanced accuracy and vote accuracy on them. The copies of one cell are
    not independent draws, so resampling images would report a width the data does not
    have; resampling the cells asks how the figures would move on another set of cells of
    the same kind. Returns ``{metric: [low, high]}`` plus the settings used; ``[0, 1]``
    with no sources.
    """
    n = np.asarray(n, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    vote_ok = np.asarray(vote_ok, dtype=np.float64)
    _check_resampling(level, resamples)
    k = len(n)
    out = {"resamples": int(resamples), "level": float(level), "seed": int(seed)}
    if not k:  # no cells: nothing is known, as wilson_interval says of no slides
        return {**out, **{m: [0.0, 1.0] for m in RESAMPLED}}
    acc_of = correct / np.maximum(n, 1.0)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in RESAMPLED}
    chunk = max(1, 4_000_000 // k)  # bounds the index matrix at a few tens of MB
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, k, size=(min(chunk, resamples - start), k))
        draws["accuracy"].append(correct[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1.0))
        draws["cell_balanced_accuracy"].append(acc_of[idx].mean(axis=1))
        draws["vote_accuracy"].append(vote_ok[idx].mean(axis=1))
    for key, parts in draws.items():
        out[key] = _percentile_interval(parts, level)
    return out


def paired_gap_intervals(
    n: np.ndarray,
    correct_a: np.ndarray,
    vote_a: np.ndarray,
    correct_b: np.ndarray,
    vote_b: np.ndarray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """The gap between two sets of runs scored on the same cells (A minus B), with its
    interval from resampling those cells in pairs.

    ``n`` (k,) holds each cell's images; ``correct_a`` (runs of A, k) and ``vote_a`` its runs'
    images right and vote right per cell, ``correct_b``/``vote_b`` B's. A figure of a set of
    runs is the mean over its runs. Each resample draws the k cells with replacement and
    recomputes both sets' figures on the same draw, so a cell every run finds hard weighs on
    both sides and cancels: the interval asks whether A beats B on cells like these, which
    two separate intervals, each as wide as the cells make them, cannot tell. Returns
    ``{metric: {"gap": A - B, "interval": [low, high]}}`` for per-image, cell-balanced and
    vote accuracy, plus the settings used.
    """
    n = np.asarray(n, dtype=np.float64)
    sides = [
        np.atleast_2d(np.asarray(a, dtype=np.float64))
        for a in (correct_a, vote_a, correct_b, vote_b)
    ]
    k = len(n)
    if any(a.shape[1] != k for a in sides):
        raise ValueError(
            f"every array needs one column per cell ({k}), got {[a.shape for a in sides]}"
        )
    _check_resampling(level, resamples)
    ca, va, cb, vb = sides
    out = {"resamples": int(resamples), "level": float(level), "seed": int(seed), "cells": k}
    if not k:
        return {**out, **{m: {"gap": 0.0, "interval": [-1.0, 1.0]} for m in RESAMPLED}}

    def figures(idx: np.ndarray, c: np.ndarray, v: np.ndarray) -> dict:
        # idx (draws, k): per draw, the mean over runs of each figure on the drawn cells
        nn = n[idx]
        return {
            "accuracy": (c[:, idx].sum(axis=2) / np.maximum(nn.sum(axis=1), 1.0)).mean(axis=0),
            "cell_balanced_accuracy": (c[:, idx] / np.maximum(nn, 1.0)).mean(axis=2).mean(axis=0),
            "vote_accuracy": v[:, idx].mean(axis=2).mean(axis=0),
        }

    whole = np.arange(k)[None, :]
    point_a, point_b = figures(whole, ca, va), figures(whole, cb, vb)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in RESAMPLED}
    chunk = max(1, 2_000_000 // (k * max(len(ca), len(cb))))
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, k, size=(min(chunk, resamples - start), k))
        fa, fb = figures(idx, ca, va), figures(idx, cb, vb)
        for m in RESAMPLED:
            draws[m].append(fa[m] - fb[m])
    for m in RESAMPLED:
        gap = float(point_a[m][0] - point_b[m][0])
        out[m] = {"gap": gap, "interval": _percentile_interval(draws[m], level)}
    return out


def cell_records(sources: Sequence[dict]) -> dict[str, list]:
    """Per source cell, from :func:`source_scores`' ``sources`` rows: [images, images right,
    vote right], what :func:`paired_gap_intervals` resamples for gaps on the same cells."""
    return {
        s["source_id"]: [s["n"], round(s["image_accuracy"] * s["n"]), int(s["vote"] == s["label"])]
        for s in sources
    }


def source_scores(
    probs: np.ndarray,
    y_true: np.ndarray,
    sources: Sequence[str],
    classes: Sequence[str],
    *,
    resamples: int = 2000,
    level: float = 0.95,
) -> dict:
    """Accuracy per source cell: several crops of one cell are pooled into one decision.

    Two poolings: the majority vote of the per-image predictions (ties go to the class with
    the higher mean probability) and the argmax of the mean probability. A source whose
    images carry different labels is counted under its most common label.
    ``cell_balanced_accuracy`` is the per-image accuracy with every source weighing the
    same: the mean over sources of each one's image accuracy. Where sources hold very
    different numbers of images (augmented copies, repeated shots of one cell), plain
    per-image accuracy is mostly a verdict on the few sources with the most images.
    ``intervals`` holds each accuracy's ``level`` interval from ``resamples`` resamples of
    the sources (``source_intervals``): with a few dozen held-out cells these are wide.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    sources = np.asarray(list(sources), dtype=object)
    k = len(classes)
    uniq, inv = np.unique(sources.astype(str), return_inverse=True)
    rows = []
    vote_ok = mean_ok = 0
    counts, rights, votes_right = [], [], []
    for s in range(len(uniq)):
        m = inv == s
        p = probs[m]
        label = int(np.bincount(y_true[m], minlength=k).argmax())
        mean_p = p.mean(axis=0)
        votes = np.bincount(p.argmax(axis=1), minlength=k).astype(np.float64)
        vote = int(np.argmax(votes + mean_p * 1e-6))  # mean probability breaks ties
        mean_pred = int(np.argmax(mean_p))
        vote_ok += vote == label
        mean_ok += mean_pred == label
        hits = p.argmax(axis=1) == y_true[m]
        counts.append(int(m.sum()))
        rights.append(int(hits.sum()))
        votes_right.append(float(vote == label))
        rows.append(
            {
                "source_id": str(uniq[s]),
                "label": classes[label],
                "n": int(m.sum()),
                "image_accuracy": float(np.mean(hits)),
                "vote": classes[vote],
                "mean_prob": classes[mean_pred],
            }
        )
    n = max(len(uniq), 1)
    return {
        "n_sources": int(len(uniq)),
        "vote_accuracy": vote_ok / n,
        "mean_prob_accuracy": mean_ok / n,
        "cell_balanced_accuracy": float(np.mean([r["image_accuracy"] for r in rows]))
        if rows
        else 0.0,
        "images_per_source": _spread([r["n"] for r in rows]),
        "intervals": source_intervals(
            np.array(counts),
            np.array(rights),
            np.array(votes_right),
            resamples=resamples,
            level=level,
        ),
        "sources": rows,
    }


def classification_metrics(
    probs: np.ndarray,
    y_true: np.ndarray,
    classes: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    n_bins: int = 10,
) -> dict:
    """Every figure of the report from probabilities (N, K) and true labels (N,).

    ``sources`` (one id per image, e.g. the slide or source cell) adds ``per_source``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    classes = list(classes)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)}), got {probs.shape}")
    if len(y_true) != len(probs):
        raise ValueError(f"{len(probs)} probability rows for {len(y_true)} labels")
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    per_class, notes = per_class_scores(cm, classes)
    present = [c for c in classes if per_class[c]["support"] > 0]

    def macro(key: str) -> float:
        return float(np.mean([per_class[c][key] for c in present])) if present else 0.0

    n = int(len(y_true))
    support = np.array([per_class[c]["support"] for c in classes], dtype=np.float64)
    weighted_f1 = float(
        np.dot(support, [per_class[c]["f1"] for c in classes]) / max(support.sum(), 1.0)
    )
    calib = calibration_bins(probs, y_true, n_bins)
    out = {
        "n": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "weighted_f1": weighted_f1,
        "log_loss": log_loss(probs, y_true),
        "ece": calib["ece"],
        "mean_confidence": float(probs.max(axis=1).mean()) if n else 0.0,
        "classes": classes,
        "classes_present": present,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "calibration": calib,
        "notes": notes,
    }
    if sources is not None:
        out["per_source"] = source_scores(probs, y_true, sources, classes)
    return out
