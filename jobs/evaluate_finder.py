"""Evaluate the slide job on annotated slides (BCCD / Pascal VOC layout), in one command.

    python -m jobs.evaluate_finder --slides ../shared/data/bccd [--checkpoint URI --output URI]

1. The white-cell finder against the VOC ``WBC`` boxes: recall and precision at
   IoU >= 0.5 (greedy one-to-one matching, best score first). No Ray, no model.
2. With ``--checkpoint``: the slide job itself runs over ``JPEGImages`` (resumable into
   ``--output``), and each slide's ``top_class`` is compared with ``labels.csv`` on the
   slides with exactly one label among the model's classes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time

from cellmodel import storage


def evaluate_finder(slides: str, finder: dict | None = None, iou_threshold: float = 0.5) -> dict:
    """Finder recall/precision against the WBC boxes of every annotated slide."""
    from cellmodel.data.transforms import decode_image
    from cellmodel.data.voc import parse_voc
    from cellmodel.infer.finder import FinderConfig, find_cells, match

    cfg = FinderConfig.from_dict(finder)
    fs, root = storage.get_fs(slides)
    xmls = sorted(p for p in fs.find(f"{root}/Annotations") if p.endswith(".xml"))
    if not xmls:
        raise FileNotFoundError(f"no Annotations/*.xml under {slides}; give a VOC-layout folder")
    tp = n_pred = n_true = 0
    missed, t_find = [], 0.0
    for x in xmls:
        stem = x.rsplit("/", 1)[1][:-4]
        _, boxes = parse_voc(fs.cat_file(x))
        truth = [b.as_tuple() for b in boxes if b.name == "WBC"]
        img = decode_image(fs.cat_file(f"{root}/JPEGImages/{stem}.jpg"))
        t0 = time.perf_counter()
        dets = find_cells(img, cfg)
        t_find += time.perf_counter() - t0
        m = match([d.as_tuple() for d in dets], truth, iou_threshold)
        tp, n_pred, n_true = tp + m, n_pred + len(dets), n_true + len(truth)
        if m < len(truth):
            missed.append(stem)
    return {
        "slides": len(xmls),
        "iou_threshold": iou_threshold,
        "wbc_boxes": n_true,
        "detections": n_pred,
        "true_positives": tp,
        "recall": tp / n_true if n_true else None,
        "precision": tp / n_pred if n_pred else None,
        "finder_ms_per_slide": round(1000 * t_find / len(xmls), 2),
        "slides_with_a_missed_cell": missed,
    }


def evaluate_slide_class(slides: str, checkpoint: str, output: str, cfg=None) -> dict:
    """Run the slide job over ``<slides>/JPEGImages``; compare ``top_class`` with labels.csv."""
    from cellmodel.data.voc import read_labels_csv
    from cellmodel.infer.slides import read_results, run_slides

    labels = read_labels_csv(storage.read_bytes(storage.join(slides, "labels.csv")))
    run_slides(storage.join(slides, "JPEGImages"), checkpoint, output, cfg, progress=True)
    _, table = read_results(output)
    classes = [c for c in table.columns if c.startswith("count_")]
    names = {c.removeprefix("count_").upper() for c in classes}
    right = total = 0
    confusion: dict[str, dict[str, int]] = {}
    for row in table.itertuples():
        num = "".join(ch for ch in row.slide_id.rsplit("/", 1)[-1] if ch.isdigit())
        truth = labels.get(int(num)) if num else None
        if not truth or len(truth) != 1 or truth[0] not in names or row.status != "ok":
            continue  # unlabelled, multi-label, BASOPHIL or unreadable: no single answer
        pred = row.top_class or "none"
        confusion.setdefault(truth[0], {}).setdefault(pred, 0)
        confusion[truth[0]][pred] += 1
        right, total = right + (pred == truth[0]), total + 1
    return {
        "single_label_slides": total,
        "slide_accuracy": right / total if total else None,
        "confusion": confusion,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jobs.evaluate_finder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--slides", required=True, help="VOC-layout folder or URI (bccd)")
    ap.add_argument("--checkpoint", help="also evaluate the slide-level class with this model")
    ap.add_argument("--output", help="where the slide job writes (default: a temporary folder)")
    ap.add_argument("--config", help="slide-job TOML (default jobs/configs/slides.toml)")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU for a match (default 0.5)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    from jobs.classify_slides import load_config

    try:
        cfg = load_config(args.config, {})
        result = {"finder": evaluate_finder(args.slides, cfg.finder.to_dict(), args.iou)}
        if args.checkpoint:
            out = args.output or tempfile.mkdtemp(prefix="evaluate-slides-")
            result["slide_class"] = evaluate_slide_class(args.slides, args.checkpoint, out, cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = result["finder"]
    print(
        f"finder on {f['slides']} slides: recall {f['recall']:.3f}, precision "
        f"{f['precision']:.3f} at IoU >= {args.iou} ({f['true_positives']} of "
        f"{f['wbc_boxes']} WBC boxes, {f['detections']} detections)"
    )
    if "slide_class" in result:
        s = result["slide_class"]
        acc = "n/a" if s["slide_accuracy"] is None else f"{s['slide_accuracy']:.3f}"
        print(f"slide class: accuracy {acc} on {s['single_label_slides']} single-label slides")
    if args.json:
        storage.write_bytes(args.json, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
