"""Write an evaluation's files: report.md (a person reads it), metrics.json, predictions.csv, PNGs."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from cellmodel import storage
from cellmodel.data.transforms import ImageDecodeError, decode_image
from cellmodel.evaluate import plots

FILES = {
    "report": "report.md",
    "metrics": "metrics.json",
    "predictions": "predictions.csv",
    "confusion_matrix": "confusion_matrix.png",
    "reliability": "reliability.png",
    "mistakes": "confident_mistakes.png",
    "featuremaps": "featuremaps.png",
}


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _intervals(ps: dict) -> str:
    ci = ps["intervals"]
    span = "; ".join(
        f"{name} {_pct(ci[key][0])} to {_pct(ci[key][1])}"
        for name, key in (
            ("per image", "accuracy"),
            ("by vote", "vote_accuracy"),
            ("cell-balanced", "cell_balanced_accuracy"),
        )
    )
    return (
        f"{ci['level']:.0%} intervals from {ci['resamples']} resamples of the "
        f"{ps['n_sources']} source cells (whole cells drawn with replacement, since a "
        f"cell's copies are not independent): {span}. They say how far the figures could "
        "move on another set of cells like these."
    )


def _thumb(data: bytes) -> np.ndarray:
    try:
        img = decode_image(data)
    except ImageDecodeError:
        return np.zeros((120, 160, 3), np.uint8)
    img.thumbnail((200, 150))
    return np.asarray(img)


def _predictions_csv(metrics: dict, preds) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    classes = metrics["classes"]
    w.writerow(["id", "source_id", "true", "pred", "confidence", *[f"p_{c}" for c in classes]])
    pred = preds.probs.argmax(axis=1)
    for i, p in enumerate(preds.probs):
        src = preds.sources[i] if preds.sources is not None else ""
        w.writerow(
            [preds.ids[i], src, classes[preds.labels[i]], classes[pred[i]], f"{p.max():.4f}"]
            + [f"{v:.4f}" for v in p]
        )
    return buf.getvalue().encode()


def write_outputs(out_dir: str, metrics: dict, preds, data, model, featuremap_image=None) -> dict:
    """Render every file into ``out_dir``; returns ``{kind: file name}`` of what was written."""
    from cellmodel.evaluate.featuremaps import feature_layers, feature_maps_png

    def put(key: str, blob: bytes) -> None:
        storage.write_bytes(storage.join(out_dir, FILES[key]), blob)
        written[key] = FILES[key]

    written: dict[str, str] = {}
    classes = metrics["classes"]
    put("confusion_matrix", plots.confusion_matrix_png(metrics["confusion_matrix"], classes))
    put("reliability", plots.reliability_png(metrics["calibration"]))
    mistakes = metrics["confident_mistakes"]
    blobs = data.fetch([preds.refs[m["index"]] for m in mistakes]) if mistakes else []
    put(
        "mistakes",
        plots.image_grid_png(
            [_thumb(b) for b in blobs],
            [f"{m['true']} -> {m['pred']} ({m['confidence']:.2f})\n{m['id']}" for m in mistakes],
            title="Most confident mistakes (true -> predicted, confidence)",
        ),
    )
    if getattr(model, "cnns", None):
        if featuremap_image is not None:
            img, name = storage.read_bytes(featuremap_image), featuremap_image
        else:
            img, name = data.fetch([preds.refs[0]])[0], preds.ids[0]
        layers = feature_layers(model)
        put(
            "featuremaps",
            feature_maps_png(model, img, layers=layers, title=f"Feature maps: {name}"),
        )
        metrics["featuremaps"] = {"image": name, "layers": layers}
    else:
        metrics["notes"].append("The model has no CNN branch: no feature maps were drawn.")
    put("predictions", _predictions_csv(metrics, preds))
    written["metrics"] = FILES["metrics"]
    written["report"] = FILES["report"]
    metrics["files"] = dict(written)
    storage.write_bytes(
        storage.join(out_dir, FILES["metrics"]), json.dumps(metrics, indent=2).encode()
    )
    # The report goes last: its presence means the folder is complete.
    storage.write_bytes(storage.join(out_dir, FILES["report"]), render_markdown(metrics).encode())
    return written


def render_markdown(m: dict) -> str:
    """The report as markdown; pictures are linked by relative path (they sit beside it)."""
    classes = m["classes"]
    files = m.get("files", {})
    where = "class folders" if m["data_kind"] == "class_folders" else f"shard split `{m['split']}`"
    out = [
        f"# Evaluation of `{m['model_name']}`",
        "",
        f"**Accuracy {_pct(m['accuracy'])}**, macro F1 {m['macro_f1']:.3f} on {m['n']} images.",
        "",
        _table(
            ["", ""],
            [
                ["Checkpoint", f"`{m['checkpoint']}`"],
                ["Data", f"`{m['data']}` ({where})"],
                ["Images", f"{m['n']} scored of {m['n_found']} found, {m['n_skipped']} skipped"],
                ["Accuracy", _pct(m["accuracy"])],
                [
                    "Macro precision / recall / F1",
                    "{:.3f} / {:.3f} / {:.3f}".format(
                        m["macro_precision"], m["macro_recall"], m["macro_f1"]
                    ),
                ],
                ["Weighted F1", f"{m['weighted_f1']:.3f}"],
                ["Expected calibration error", f"{m['ece']:.3f}"],
                ["Log loss", f"{m['log_loss']:.3f}"],
                ["Created", m["created"]],
            ],
        ),
        "",
        "## Per class",
        "",
        _table(
            ["class", "precision", "recall", "F1", "support", "predicted"],
            [
                [
                    c,
                    f"{s['precision']:.3f}",
                    f"{s['recall']:.3f}",
                    f"{s['f1']:.3f}",
                    s["support"],
                    s["predicted"],
                ]
                for c, s in m["per_class"].items()
            ],
        ),
        "",
        "## Confusion matrix",
        "",
        "Rows are true classes, columns predicted classes.",
        "",
        _table(
            ["true \\ predicted", *classes],
            [[c, *row] for c, row in zip(classes, m["confusion_matrix"])],
        ),
        "",
        f"![confusion matrix]({files.get('confusion_matrix', FILES['confusion_matrix'])})",
        "",
    ]
    if "per_source" in m:
        ps = m["per_source"]
        worst = sorted(ps["sources"], key=lambda r: (r["image_accuracy"], r["source_id"]))[:20]
        out += [
            "## Per source cell",
            "",
            f"{ps['n_sources']} source cells. Accuracy per source: "
            f"{_pct(ps['vote_accuracy'])} by majority vote of its images, "
            f"{_pct(ps['mean_prob_accuracy'])} by mean probability. Per image with every "
            f"source weighing the same: {_pct(ps['cell_balanced_accuracy'])} (images per "
            f"source {ps['images_per_source']['min']}-{ps['images_per_source']['max']}, "
            f"median {ps['images_per_source']['median']:g}).",
            "",
            _intervals(ps),
            "",
            "Lowest per-image accuracy first (at most 20 rows):",
            "",
            _table(
                ["source", "label", "images", "image accuracy", "vote", "mean probability"],
                [
                    [
                        r["source_id"],
                        r["label"],
                        r["n"],
                        _pct(r["image_accuracy"]),
                        r["vote"],
                        r["mean_prob"],
                    ]
                    for r in worst
                ],
            ),
            "",
        ]
    cal = m["calibration"]
    edges = cal["edges"]
    out += [
        "## Calibration",
        "",
        f"Expected calibration error {m['ece']:.3f} over {len(cal['count'])} equal-width bins "
        f"of top-1 confidence (mean confidence {m['mean_confidence']:.3f}, "
        f"accuracy {m['accuracy']:.3f}).",
        "",
        _table(
            ["confidence", "images", "mean confidence", "accuracy"],
            [
                [
                    f"{edges[i]:.1f}-{edges[i + 1]:.1f}",
                    n,
                    f"{cal['confidence'][i]:.3f}",
                    f"{cal['accuracy'][i]:.3f}",
                ]
                for i, n in enumerate(cal["count"])
                if n
            ],
        ),
        "",
        f"![reliability diagram]({files.get('reliability', FILES['reliability'])})",
        "",
        "## Most confident mistakes",
        "",
    ]
    if m["confident_mistakes"]:
        out += [
            _table(
                ["id", "true", "predicted", "confidence"],
                [
                    [f"`{r['id']}`", r["true"], r["pred"], f"{r['confidence']:.3f}"]
                    for r in m["confident_mistakes"]
                ],
            ),
            "",
            f"![most confident mistakes]({files.get('mistakes', FILES['mistakes'])})",
            "",
        ]
    else:
        out += ["No mistakes.", ""]
    if "featuremaps" in m:
        fm = m["featuremaps"]
        out += [
            "## Feature maps",
            "",
            f"Image `{fm['image']}`: the first convolution (`{fm['layers'][0]}`) and later "
            f"stages ({', '.join(f'`{n}`' for n in fm['layers'][1:])}) of the CNN branch; "
            "each row shows the channels with the highest mean activation.",
            "",
            f"![feature maps]({files.get('featuremaps', FILES['featuremaps'])})",
            "",
        ]
    if m["n_skipped"]:
        out += [
            "## Skipped images",
            "",
            f"{m['n_skipped']} images could not be decoded and were left out: "
            + ", ".join(f"{k} {v}" for k, v in sorted(m["skipped_by_reason"].items()))
            + ".",
            "",
            *[f"- `{s['id']}`: {s['reason']}" for s in m["skipped"]],
            "",
        ]
    if m["notes"]:
        out += ["## Notes", "", *[f"- {n}" for n in m["notes"]], ""]
    out += [
        f"Per-image predictions: [{FILES['predictions']}]({FILES['predictions']}); "
        f"all figures: [{FILES['metrics']}]({FILES['metrics']}).",
        "",
    ]
    return "\n".join(out)
