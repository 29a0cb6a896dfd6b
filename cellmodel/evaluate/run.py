"""Evaluate a checkpoint on labelled data: predictions, metrics and (optionally) the report."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

import cellmodel
from cellmodel import storage
from cellmodel.data.transforms import ImageDecodeError, bytes_to_array, decode_image
from cellmodel.evaluate.data import open_data
from cellmodel.evaluate.metrics import classification_metrics

# Skipped images are all counted; only this many are named in metrics.json and the report.
MAX_SKIPPED_LISTED = 50


class EvalOutputError(OSError):
    """The output folder cannot be created or written."""


@dataclass
class Predictions:
    """Per-image results of one pass over the data (corrupt images already left out)."""

    classes: list[str]
    probs: np.ndarray
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    sources: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)


def check_writable(out_dir: str) -> None:
    """Fail before any work when ``out_dir`` cannot be written (saves a long run)."""
    probe = storage.join(out_dir, ".cellmodel-write-test")
    try:
        storage.write_bytes(probe, b"")
        fs, path = storage.get_fs(probe)
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise EvalOutputError(
            f"cannot write to the output folder {out_dir} ({type(e).__name__}: {e}); "
            "choose a folder you can write to"
        ) from e


def _decode(args) -> tuple[np.ndarray | None, str | None]:
    data, pre = args
    if isinstance(data, BaseException):
        return None, f"unreadable: {data}"
    try:
        return bytes_to_array(data, pre), None
    except ImageDecodeError as e:
        return None, f"{e.reason}: {e}"


def predict_data(
    predictor, data, batch_size: int = 64, progress: bool = False, workers: int = 4
) -> Predictions:
    """Run ``predictor`` over every batch of ``data``; corrupt images are skipped and listed.

    ``workers`` threads decode images (``1`` decodes in the calling thread's pool of one).
    """
    k = len(predictor.classes)
    pre = predictor.cfg.preprocessing()
    probs, labels, ids, refs, sources, skipped = [], [], [], [], [], []
    bar = tqdm(total=len(data), unit="img", desc="evaluate", disable=not progress)
    # Decoding is mostly C code that releases the GIL: threads overlap it with the model.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for b in data.batches(batch_size):
            decoded = list(pool.map(_decode, [(img, pre) for img in b.images]))
            keep = [i for i, (a, _) in enumerate(decoded) if a is not None]
            for i, (_, why) in enumerate(decoded):
                if why is not None:
                    skipped.append({"id": b.ids[i], "reason": why})
            if keep:
                x = np.stack([decoded[i][0] for i in keep])
                probs.append(predictor.predict_arrays(x))
                labels.append(b.labels[keep])
                ids += [b.ids[i] for i in keep]
                refs += [b.refs[i] for i in keep]
                if b.sources is not None:
                    sources += [b.sources[i] for i in keep]
            bar.update(len(b.ids))
    bar.close()
    return Predictions(
        classes=list(predictor.classes),
        probs=np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        ids=ids,
        refs=refs,
        sources=sources if data.has_sources else None,
        skipped=skipped,
    )


def evaluate_checkpoint(
    checkpoint_uri: str | Sequence[str],
    data_uri: str,
    out_dir: str | None = None,
    batch_size: int = 64,
    split: str = "val",
    *,
    device: str | None = None,
    n_bins: int = 10,
    top_mistakes: int = 16,
    featuremap_image: str | None = None,
    progress: bool = False,
    tta: bool = False,
) -> dict:
    """Score a checkpoint on a class-folder tree or one split of a shard dataset.

    Returns the metrics dict (the content of ``metrics.json``). With ``out_dir`` (a local
    folder or URI) also writes ``report.md``, ``metrics.json``, ``predictions.csv`` and the
    PNGs there. ``featuremap_image`` is an image path/URI for the feature-map picture
    (default: the first image of the data). ``tta`` averages each image's softmax over its 8
    flips and quarter turns (test-time augmentation; 8x the compute). Several checkpoints
    (a list) are scored as one ensemble: the mean of their probabilities. Raises ``CheckpointError``, ``EvalDataError``
    or ``EvalOutputError`` with a message that names the bad input.
    """
    from cellmodel.evaluate.data import EvalDataError
    from cellmodel.infer.ensemble import load_predictor

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out_dir is not None:
        check_writable(out_dir)
    if featuremap_image is not None:
        # Checked now rather than after the whole pass over the data.
        try:
            decode_image(storage.read_bytes(featuremap_image))
        except FileNotFoundError as e:
            raise EvalDataError(f"feature-map image not found: {featuremap_image}") from e
        except ImageDecodeError as e:
            raise EvalDataError(f"feature-map image {featuremap_image}: {e}") from e
    started = time.time()
    predictor = load_predictor(checkpoint_uri, device=device, tta=tta)
    data = open_data(data_uri, predictor.classes, split)
    preds = predict_data(predictor, data, batch_size, progress)
    if not len(preds.labels):
        raise EvalDataError(
            f"none of the {len(data)} images in {data_uri} could be decoded "
            f"(first problem: {preds.skipped[0]['reason']}); check the files"
        )
    metrics = classification_metrics(
        preds.probs, preds.labels, preds.classes, sources=preds.sources, n_bins=n_bins
    )
    missing = [c for c in preds.classes if c not in data.data_classes]
    if missing:
        metrics["notes"].insert(
            0,
            f"The data has no images of {', '.join(missing)}; only a subset of classes is scored.",
        )
    reasons = Counter(s["reason"].split(":", 1)[0] for s in preds.skipped)
    metrics.update(
        {
            "checkpoint": checkpoint_uri
            if isinstance(checkpoint_uri, str)
            else list(checkpoint_uri),
            "model_name": predictor.cfg.name,
            "tta": bool(tta),
            "checkpoint_metrics": predictor.meta.get("metrics", {}),
            "data": data_uri,
            "data_kind": data.kind,
            "split": split if data.kind == "shards" else None,
            "data_classes": list(data.data_classes),
            "n_found": len(data),
            "n_skipped": len(preds.skipped),
            "skipped_by_reason": dict(reasons),
            "skipped": preds.skipped[:MAX_SKIPPED_LISTED],
            "confident_mistakes": _confident_mistakes(preds, top_mistakes),
            "seconds": round(time.time() - started, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"cellmodel": cellmodel.__version__},
        }
    )
    if out_dir is not None:
        from cellmodel.evaluate.report import write_outputs

        write_outputs(out_dir, metrics, preds, data, predictor.model, featuremap_image)
    return metrics


def _confident_mistakes(preds: Predictions, k: int) -> list[dict]:
    pred = preds.probs.argmax(axis=1)
    conf = preds.probs.max(axis=1)
    wrong = np.flatnonzero(pred != preds.labels)
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
    return [
        {
            "index": int(i),
            "id": preds.ids[i],
            "true": preds.classes[int(preds.labels[i])],
            "pred": preds.classes[int(pred[i])],
            "confidence": float(conf[i]),
            **({"source_id": preds.sources[i]} if preds.sources is not None else {}),
        }
        for i in order
    ]
