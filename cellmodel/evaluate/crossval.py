"""Pool the evaluations of a K-fold cross-validation over source cells into one figure.

Each fold's network is scored by ``jobs.evaluate`` on the cells it never saw (an ingest with
``folds``/``fold``); pooled, the K evaluations score every cell once. With a few dozen
held-out cells a single split's figure turns on a handful of cells (docs/evaluation.md);
pooling K folds bases it on all of them, and the spread over folds says how much the
choice of held-out cells moves it. Two cross-validations of the same cells (two recipes, or
one with and without TTA) compare by :func:`gap`: the difference on those cells with an
interval from resampling them in pairs.
"""

from __future__ import annotations

import csv
import io
import json
import statistics

import numpy as np

from cellmodel import storage
from cellmodel.evaluate.metrics import (
    RESAMPLED,
    cell_records,
    classification_metrics,
    paired_gap_intervals,
    source_scores,
)

FIGURES = (
    ("per image", "accuracy"),
    ("by vote", "vote_accuracy"),
    ("cell-balanced", "cell_balanced_accuracy"),
)


class CrossValError(ValueError):
    """Evaluations that cannot be pooled: unreadable, without sources, or overlapping."""


def read_evaluation(uri: str) -> dict:
    """One ``jobs.evaluate`` output folder: its metrics and per-image predictions."""
    try:
        metrics = json.loads(storage.read_bytes(storage.join(uri, "metrics.json")))
        text = storage.read_bytes(storage.join(uri, "predictions.csv")).decode()
    except FileNotFoundError as e:
        raise CrossValError(
            f"{uri}: no metrics.json or predictions.csv ({e}); give the --out folder of a "
            "finished `python -m jobs.evaluate` run"
        ) from None
    classes = list(metrics["classes"])
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not all(r["source_id"] for r in rows):
        raise CrossValError(
            f"{uri}: predictions without source cells; cross-validation pools cells, so "
            "evaluate a shard dataset that records them (jobs.ingest with --slides or grouping)"
        )
    index = {c: i for i, c in enumerate(classes)}
    return {
        "uri": uri,
        "metrics": metrics,
        "classes": classes,
        "sources": [r["source_id"] for r in rows],
        "labels": np.array([index[r["true"]] for r in rows], dtype=np.int64),
        "probs": np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]).reshape(
            len(rows), len(classes)
        ),
    }


def fold_of(data_uri: str) -> dict | None:
    """The fold an evaluation's shard dataset holds out (``folds``, ``fold``, ``seed`` and
    the source it was ingested from), or None where its manifest does not say."""
    try:
        params = json.loads(storage.read_bytes(storage.join(data_uri, "manifest.json")))["params"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None
    if not params.get("folds"):
        return None
    return {k: params.get(k) for k in ("folds", "fold", "seed", "slides")}


def _fold_checks(folds: list[dict | None]) -> list[str]:
    """Warnings where the evaluations do not look like the K folds of one partition."""
    if any(f is None for f in folds):
        return [
            "some evaluations' datasets record no fold (ingest with --folds): that their "
            "cells never trained the other folds' networks is up to you"
        ]
    keys = {(f["folds"], f["seed"], f["slides"]) for f in folds}
    if len(keys) > 1:
        return ["the datasets come from different partitions (folds, seed or slides differ)"]
    k = folds[0]["folds"]
    got = sorted(f["fold"] for f in folds)
    if got != list(range(k)):
        return [f"folds {got} of {k}: the pooled figure covers only these folds' cells"]
    return []


def _worst_first(row: dict) -> tuple:
    return row["image_accuracy"], -row["n"]


def pool(uris: list[str], *, resamples: int = 2000, level: float = 0.95) -> dict:
    """Every fold's figures, their mean and spread, and the figures of all folds pooled
    (with intervals from resampling the pooled cells)."""
    if len(uris) < 2:
        raise CrossValError("give two or more evaluations, one per fold")
    evals = [read_evaluation(u) for u in uris]
    classes = evals[0]["classes"]
    for e in evals[1:]:
        if e["classes"] != classes:
            raise CrossValError(
                f"{e['uri']} scores classes {e['classes']}, {uris[0]} scores {classes}: "
                "pool folds of one dataset"
            )
    seen: dict[str, str] = {}
    for e in evals:
        for s in set(e["sources"]):
            if s in seen:
                raise CrossValError(
                    f"source cell {s} is scored by both {seen[s]} and {e['uri']}: these are not "
                    "folds of one partition (each cell must be held out once)"
                )
            seen[s] = e["uri"]
    per_fold = []
    for e in evals:
        m = e["metrics"]
        ps = m.get("per_source") or {}
        per_fold.append(
            {
                "evaluation": e["uri"],
                "checkpoint": m.get("checkpoint"),
                "data": m.get("data"),
                "fold": fold_of(m["data"]) if m.get("data") else None,
                "tta": m.get("tta"),
                "n": m["n"],
                "n_sources": ps.get("n_sources", 0),
                "accuracy": m["accuracy"],
                "vote_accuracy": ps.get("vote_accuracy"),
                "cell_balanced_accuracy": ps.get("cell_balanced_accuracy"),
            }
        )
    probs = np.concatenate([e["probs"] for e in evals])
    labels = np.concatenate([e["labels"] for e in evals])
    sources = [s for e in evals for s in e["sources"]]
    pooled = classification_metrics(probs, labels, classes)
    ps = source_scores(probs, labels, sources, classes, resamples=resamples, level=level)
    over_folds = {}
    for _, key in FIGURES:
        vals = [f[key] for f in per_fold if f[key] is not None]
        over_folds[key] = {
            "mean": float(statistics.fmean(vals)) if vals else None,
            "sd": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0,
        }
    return {
        "classes": classes,
        "folds": per_fold,
        "over_folds": over_folds,
        "pooled": {
            "n": pooled["n"],
            "n_sources": ps["n_sources"],
            "accuracy": pooled["accuracy"],
            "vote_accuracy": ps["vote_accuracy"],
            "cell_balanced_accuracy": ps["cell_balanced_accuracy"],
            "macro_f1": pooled["macro_f1"],
            "per_class_recall": {c: pooled["per_class"][c]["recall"] for c in classes},
            "confusion_matrix": pooled["confusion_matrix"],
            "intervals": ps["intervals"],
            "worst_sources": sorted(ps["sources"], key=_worst_first)[:10],
            # per cell: [images, images right, vote right], for gaps on the same cells
            "cells": cell_records(ps["sources"]),
        },
        "warnings": _fold_checks([f["fold"] for f in per_fold]),
    }


def gap(a: dict, b: dict, *, resamples: int = 2000, level: float = 0.95) -> dict:
    """Cross-validation ``a`` minus ``b`` (two :func:`pool` results) on the cells both
    scored, with intervals from resampling those cells in pairs
    (``metrics.paired_gap_intervals``): per image, cell-balanced and by vote, as fractions. A
    cell both find hard weighs on both sides of every draw, so the interval asks whether
    ``a`` beats ``b`` on cells like these. Each shared cell must have been scored on the same
    number of images; cells only one side scored are left out, with a warning."""
    ca, cb = a["pooled"]["cells"], b["pooled"]["cells"]
    shared = sorted(set(ca) & set(cb))
    if not shared:
        raise CrossValError(
            "the two cross-validations share no cell: compare folds of one partition "
            "(jobs.ingest with the same --folds and --seed)"
        )
    for c in shared:
        if ca[c][0] != cb[c][0]:
            raise CrossValError(
                f"cell {c} has {ca[c][0]} images in one cross-validation and {cb[c][0]} in the "
                "other: score both on the same shard datasets"
            )
    warnings = []
    if len(shared) < max(len(ca), len(cb)):
        warnings.append(
            f"{len(ca) + len(cb) - 2 * len(shared)} cells are scored by one side only: the gap "
            f"covers the {len(shared)} both scored"
        )

    def side(cells: dict, col: int) -> np.ndarray:
        return np.array([[cells[c][col] for c in shared]], dtype=np.float64)

    n = side(ca, 0)[0]
    g = paired_gap_intervals(
        n, side(ca, 1), side(ca, 2), side(cb, 1), side(cb, 2), resamples=resamples, level=level
    )
    return {**g, "warnings": warnings}


def points(v: dict) -> str:
    """One figure of :func:`gap` in points: the gap and its interval."""
    lo, hi = v["interval"]
    return f"{100 * v['gap']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def gap_markdown(g: dict) -> str:
    """The gap of :func:`gap` as a table, in points (``g["against"]``: what it is to)."""

    lines = [
        "",
        "## Gap to the `--against` cross-validation on the same cells",
        "",
        "Against: " + ", ".join(f"`{u}`" for u in g.get("against", [])) + ".",
        "",
        f"Points, this cross-validation minus that one, on the {g['cells']} cells both scored; "
        f"{g['level']:.0%} interval from {g['resamples']} resamples of those cells in pairs.",
        "",
        "| per image | cell-balanced | by vote |",
        "|---:|---:|---:|",
        "| " + " | ".join(points(g[k]) for k in RESAMPLED) + " |",
    ]
    if g["warnings"]:
        lines += ["", *[f"- warning: {w}" for w in g["warnings"]]]
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def render_markdown(r: dict) -> str:
    p, ci = r["pooled"], r["pooled"]["intervals"]
    lines = [
        "# Cross-validation over source cells",
        "",
        f"{len(r['folds'])} evaluations pooled: {p['n']} images of {p['n_sources']} cells, "
        "each cell scored once by a network that never saw it.",
        "",
        "| | per image | by vote | cell-balanced | images | cells | checkpoint |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for f in r["folds"]:
        name = f"fold {f['fold']['fold']}" if f["fold"] else f["evaluation"]
        lines.append(
            f"| {name} | {_pct(f['accuracy'])} | {_pct(f['vote_accuracy'])} | "
            f"{_pct(f['cell_balanced_accuracy'])} | {f['n']} | {f['n_sources']} | "
            f"`{f['checkpoint']}`{' (TTA)' if f['tta'] else ''} |"
        )
    of = r["over_folds"]
    lines.append(
        "| mean ± sd over folds | "
        + " | ".join(
            f"{_pct(of[k]['mean'])} ± {100 * of[k]['sd']:.1f}"
            if of[k]["mean"] is not None
            else "n/a"  # fmt: skip
            for _, k in FIGURES
        )
        + " | | | |"
    )
    lines.append(
        f"| **pooled** [{ci['level']:.0%} interval] | "
        + " | ".join(f"**{_pct(p[k])}** [{_pct(ci[k][0])}, {_pct(ci[k][1])}]" for _, k in FIGURES)
        + f" | {p['n']} | {p['n_sources']} | |"
    )
    lines += [
        "",
        f"Intervals: {ci['resamples']} resamples of the {p['n_sources']} pooled cells (whole "
        "cells with replacement). Recall per class: "
        + ", ".join(f"{c} {_pct(v)}" for c, v in p["per_class_recall"].items())
        + f"; macro F1 {_pct(p['macro_f1'])}.",
        "",
        "Cells with the lowest image accuracy:",
        "",
        "| cell | label | images | image accuracy | vote |",
        "|---|---|---:|---:|---|",
    ]
    for s in p["worst_sources"]:
        lines.append(
            f"| {s['source_id']} | {s['label']} | {s['n']} | {_pct(s['image_accuracy'])} | "
            f"{s['vote']} |"
        )
    if r["warnings"]:
        lines += ["", *[f"- warning: {w}" for w in r["warnings"]]]
    return "\n".join(lines) + "\n"
