"""Temperature scaling: make a checkpoint's confidences mean what they say.

A network trained with label smoothing, mixup or cutmix learns to hedge: its top
probability sits below its accuracy (the bundled recipe: 73.6 % mean confidence at 82.1 %
accuracy on held-out cells), so a "low confidence" threshold flags cells it gets right.
One number fixes most of that: the logits are divided by a temperature ``T`` before the
softmax (below 1 sharpens, above 1 softens; the class ranking, hence accuracy, does not
change). ``T`` is fitted on labelled data the model did not learn from, by the mean
negative log-likelihood of the true class (by default every source cell weighing the
same, whatever its number of copies), and stored in ``checkpoint.json``
(``calibration.temperature``); ``Predictor`` applies it, so Serve, the slide job,
``jobs.evaluate`` and ensembles all see calibrated probabilities. An ensemble (several
checkpoints named together) gets a temperature of its own, applied to the log of its
members' mean probability: stored in every member under the ensemble's digest
(``cellmodel.infer.ensemble``), it applies to that combination only.

How good the fit is, is measured without scoring on the images it was fitted on: the
images are split in folds by source cell, ``T`` is fitted on the other folds and applied
to each fold (cross-fitting); the figures after calibration are those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cellmodel import storage
from cellmodel.evaluate.metrics import expected_calibration_error, log_loss

T_RANGE = (0.05, 20.0)


def scaled(logp: np.ndarray, t: float) -> np.ndarray:
    """``softmax(logp / t)`` row-wise (``logp``: logits or log-probabilities)."""
    z = np.asarray(logp, np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def weighted_nll(probs: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of the true class, weighted by ``w`` (None: alike)."""
    p = np.clip(np.asarray(probs, np.float64)[np.arange(len(y)), y], 1e-12, 1.0)
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    return float(-(w * np.log(p)).sum() / w.sum())


def cell_weights(groups: Sequence[str] | None, n: int) -> np.ndarray:
    """One weight per image so that every source cell weighs the same in total (1 / its
    number of images); all ones without ``groups``."""
    if groups is None:
        return np.ones(n)
    keys = list(groups)
    count: dict[str, int] = {}
    for k in keys:
        count[k] = count.get(k, 0) + 1
    return np.array([1.0 / count[k] for k in keys])


def fit_temperature(logp: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """The temperature in ``T_RANGE`` that minimises the mean negative log-likelihood of the
    true class of ``softmax(logp / T)``, weighted by ``w`` (None: every image alike):
    golden-section search over log T (the loss is convex in 1 / T)."""
    logp = np.asarray(logp, np.float64)
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        raise ValueError("no labelled images to fit a temperature on")

    def nll(log_t: float) -> float:
        return weighted_nll(scaled(logp, math.exp(log_t)), y, w)

    a, b = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


def _summary(probs: np.ndarray, y: np.ndarray, low: float, cw: np.ndarray) -> dict:
    conf = probs.max(axis=1)
    return {
        "nll": round(log_loss(probs, y), 4),
        "nll_cell_balanced": round(weighted_nll(probs, y, cw), 4),
        "ece": round(expected_calibration_error(probs, y), 4),
        "accuracy": round(float((probs.argmax(1) == y).mean()), 4),
        "mean_confidence": round(float(conf.mean()), 4),
        "low_confidence_share": round(float((conf < low).mean()), 4),
        "low_confidence_right": round(float(((conf < low) & (probs.argmax(1) == y)).mean()), 4),
    }


def cross_fit(
    logp: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str] | None,
    folds: int = 2,
    seed: int = 0,
    low: float = 0.5,
    weight: str = "cell",
) -> dict:
    """Fit on all but one fold of source cells (``groups``; None: single images), apply to
    that fold; returns the figures before and after, each fold's temperature, and the
    temperature fitted on everything (what gets stored).

    ``weight="cell"``: the fit weighs every source cell alike (a cell with 100 copies counts
    as much as one with 5, as on a slide, where each cell is seen once); ``"image"``: every
    image alike."""
    if weight not in ("cell", "image"):
        raise ValueError(f"weight must be 'cell' or 'image', got {weight!r}")
    logp = np.asarray(logp, np.float64)
    y = np.asarray(y, np.int64)
    cw = cell_weights(groups, len(y))
    w = cw if weight == "cell" else None
    keys = list(groups) if groups is not None else [str(i) for i in range(len(y))]
    uniq = sorted(set(keys))
    if len(uniq) < folds:
        raise ValueError(f"{len(uniq)} source cell(s): too few for {folds} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_key = {uniq[i]: f for f, idx in enumerate(np.array_split(order, folds)) for i in idx}
    fold = np.array([fold_of_key[k] for k in keys])
    after = np.zeros_like(logp)
    temps = []
    for f in range(folds):
        held = fold == f
        t = fit_temperature(logp[~held], y[~held], None if w is None else w[~held])
        temps.append(round(t, 4))
        after[held] = scaled(logp[held], t)
    return {
        "n": int(len(y)),
        "groups": len(uniq),
        "grouped_by": "source cell" if groups is not None else "image",
        "weight": weight if groups is not None else "image",
        "folds": folds,
        "fold_temperatures": temps,
        "before": _summary(scaled(logp, 1.0), y, low, cw),
        "after_cross_fitted": _summary(after, y, low, cw),
        "temperature": round(fit_temperature(logp, y, w), 4),
    }


def calibrate_checkpoint(
    checkpoint: str | Sequence[str],
    data_uri: str,
    split: str = "val",
    *,
    folds: int = 2,
    seed: int = 0,
    low: float = 0.5,
    weight: str = "cell",
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Predict ``split`` of ``data_uri`` with ``checkpoint`` (its stored temperature, if
    any, undone) and fit the temperature; nothing is written (see :func:`write_temperature`).
    Several checkpoints: their ensemble's temperature, on the mean of the members'
    probabilities (each member's own temperature applied)."""
    from cellmodel.evaluate.data import open_data
    from cellmodel.evaluate.run import predict_data
    from cellmodel.infer.ensemble import load_predictor

    predictor = load_predictor(checkpoint, device=device)
    t0, predictor.temperature = predictor.temperature, 1.0  # fit on the raw logits
    data = open_data(data_uri, predictor.classes, split)
    preds = predict_data(predictor, data, batch_size, progress)
    # log(softmax(z)) = z + c: the logits, up to a constant per row.
    logp = np.log(np.clip(preds.probs, 1e-30, 1.0)).astype(np.float64)
    out = cross_fit(logp, preds.labels, preds.sources, folds, seed, low, weight)
    out.update(checkpoint=checkpoint, data=data_uri, split=split, stored_temperature=t0)
    return out


def write_temperature(checkpoint: str | Sequence[str], temperature: float, fitted: dict) -> dict:
    """Store ``temperature`` in ``checkpoint``'s ``checkpoint.json`` (the weights are not
    touched); ``fitted`` says where it came from. Returns the new ``calibration`` entry.

    Several checkpoints (or an ensemble folder): the temperature of their ensemble, stored in
    every member under the ensemble's digest (``ensemble_calibration``), beside any other
    ensemble's and the member's own temperature, which stay as they were."""
    import hashlib
    import json

    from cellmodel.infer.ensemble import CALIBRATION_KEY, combination_digest
    from cellmodel.models.checkpoint import (
        META_FILE,
        WEIGHTS_FILE,
        expand_checkpoints,
        read_checkpoint_meta,
    )

    if not (T_RANGE[0] <= temperature <= T_RANGE[1]):
        raise ValueError(f"temperature must lie in {T_RANGE}, got {temperature}")
    members = expand_checkpoints(checkpoint)  # an ensemble folder: its members
    if len(set(members)) < len(members):
        raise ValueError(f"a checkpoint is named twice in {members}")
    metas = [read_checkpoint_meta(c) for c in members]  # every member read before any write
    entry = {"temperature": round(float(temperature), 4), **fitted}
    if len(members) > 1:
        key = combination_digest(
            m.get("weights_sha256")  # older checkpoints: the digest their loading computes
            or hashlib.sha256(storage.read_bytes(storage.join(c, WEIGHTS_FILE))).hexdigest()
            for c, m in zip(members, metas)
        )
        entry["members"] = members
        for m in metas:
            m.setdefault(CALIBRATION_KEY, {})[key] = entry
    else:
        metas[0]["calibration"] = entry
    for c, m in zip(members, metas):
        storage.write_bytes(storage.join(c, META_FILE), json.dumps(m, indent=2).encode())
    return entry
