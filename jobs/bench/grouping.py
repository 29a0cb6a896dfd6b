"""Source recovery on a pre-augmented crop folder: ``python -m jobs.bench grouping``.

Runs ``group_crops`` (near-duplicate groups within each class) and, with ``--slides``,
``match_to_slides`` (each crop to the BCCD slide it was cut from) on the blood-cells TRAIN
folder; prints per class the groups found against the known number of source cells, the
group-size histogram, unassigned rows and the time; compares the two methods where both
assign a crop; writes a PNG grid of a few recovered groups for a person to check by eye.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from cellmodel.data import grouping

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "blood-cells" / "TRAIN"
DEFAULT_SLIDES = ROOT.parent / "shared" / "data" / "bccd"
# Source cells per class in blood-cells TRAIN (shared/data/README.md): for reporting only,
# never used to choose a threshold.
KNOWN_SOURCES = {"EOSINOPHIL": 75, "LYMPHOCYTE": 27, "MONOCYTE": 16, "NEUTROPHIL": 159}


def list_crops(source: Path, per_class: int | None) -> tuple[list[Path], list[str]]:
    files, labels = [], []
    for cls_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        fs = sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if per_class:
            fs = fs[:per_class]
        files += fs
        labels += [cls_dir.name] * len(fs)
    return files, labels


def _cpu() -> float:
    """CPU seconds of this process and its finished workers."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def run(
    method: str, files: list[Path], labels: list[str], slides: Path | None, workers: int
) -> tuple:
    def load(i: int) -> Image.Image:
        with Image.open(files[i]) as im:
            return im.convert("RGB")

    t, c = time.perf_counter(), _cpu()
    if method == "group_crops":
        g = grouping.group_crops(load, labels, workers=workers)
    else:
        g = grouping.match_to_slides(load, labels, slides, workers=workers)
    return g, time.perf_counter() - t, _cpu() - c


def agreement(groups: list, slides: list) -> dict:
    """Purity and completeness of ``groups`` against the slide ids, on rows with a slide."""
    rows = [(g, s) for g, s in zip(groups, slides) if s is not None]
    n = len(rows)
    if not n:
        return {"rows": 0}
    by_g, by_s = defaultdict(Counter), defaultdict(Counter)
    for g, s in rows:
        by_g[g][s] += 1
        by_s[s][g] += 1
    purity = sum(c.most_common(1)[0][1] for c in by_g.values()) / n
    completeness = sum(c.most_common(1)[0][1] for c in by_s.values()) / n
    return {"rows": n, "purity": round(purity, 4), "completeness": round(completeness, 4)}


def print_report(name: str, rep: dict, wall: float, cpu: float) -> None:
    print(f"\n## {name}: {wall:.0f} s wall, {cpu:.0f} s CPU ({rep['rows']} crops)")
    print(
        "| class | crops | groups found | known sources | singletons | unassigned | group sizes (size:count) |"
    )
    print("|---|---|---|---|---|---|---|")
    for cls, r in rep["classes"].items():
        hist = " ".join(f"{k}:{v}" for k, v in r["group_size_histogram"].items())
        if len(hist) > 90:
            hist = hist[:87] + "..."
        print(
            f"| {cls} | {r['rows']} | {r['groups']} | {KNOWN_SOURCES.get(cls, '?')} | "
            f"{r['singletons']} | {r['unassigned']} | {hist} |"
        )


def draw_groups(
    g: grouping.Grouping, files: list[Path], out: Path, rows: int, per_row: int
) -> None:
    """A grid: each row shows copies of one recovered group (largest groups of each class)."""
    members = defaultdict(list)
    for i, s in enumerate(g.source_id):
        if s is not None:
            members[s].append(i)
    rng = random.Random(0)
    by_class = defaultdict(list)
    for s, idx in members.items():
        by_class[g.labels[idx[0]]].append(s)
    picks = []
    classes = sorted(by_class)
    while len(picks) < rows and any(by_class.values()):
        for cls in classes:
            if by_class[cls] and len(picks) < rows:
                cand = by_class[cls]
                s = rng.choice([c for c in cand if len(members[c]) >= 2] or cand)
                cand.remove(s)
                picks.append(s)
    tw, th = 104, 78
    img = Image.new("RGB", (tw * per_row + 150, th * len(picks)), "white")
    d = ImageDraw.Draw(img)
    for r, s in enumerate(picks):
        idx = members[s][:]
        rng.shuffle(idx)
        d.text((4, r * th + 30), f"{s}\n{len(members[s])} crops", fill=(0, 0, 0))
        for k, i in enumerate(idx[:per_row]):
            with Image.open(files[i]) as im:
                img.paste(im.convert("RGB").resize((tw, th)), (150 + k * tw, r * th))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # < 500 KB


def calibrate(copies: int = 6, seed: int = 0) -> int:
    """Verification scores on synthetic copies of the sample slides' cells.

    Within each class, as the methods compare: crop vs slide, each copy against its top
    polar candidates among the slides (true: its own slide; false: another slide, what a
    crop of a missing slide would score); crop vs crop, each copy against its top polar
    candidates among all copies (true: same cell, false: another cell).
    """
    import numpy as np

    from cellmodel.data.voc import parse_voc

    root = ROOT / "data" / "sample" / "slides"
    slides = {s.slide_id: s for s in grouping.load_slides(root)}
    rng = np.random.default_rng(seed)
    cells, truth, classes = [], [], []
    for sid in slides:
        _, boxes = parse_voc((root / "Annotations" / f"{sid}.xml").read_bytes())
        wbc = [b for b in boxes if b.name == "WBC" and b.xmax - b.xmin > 60]
        if len(wbc) != 1:
            continue
        img = Image.open(root / "JPEGImages" / f"{sid}.jpg").convert("RGB")
        for im in grouping.synthetic_copies(img, wbc[0].center, copies, rng):
            cells.append(grouping._cell(im))
            truth.append(sid)
            classes.append(slides[sid].classes[0])
    true_s, absent_s, same, other = [], [], [], []
    worst: list = []
    for cls in sorted(set(classes)):
        refs = grouping._Refs()
        for s in slides.values():
            if cls in s.classes:
                refs.add(s.cell, s.slide_id)
        rows = [i for i, c in enumerate(classes) if c == cls]
        crops = grouping._Refs()
        for i in rows:
            crops.add(cells[i], truth[i])
        for i in rows:
            for j, v in grouping._candidates(cells[i], refs, 4, 0.6):
                (true_s if refs.ids[j] == truth[i] else absent_s).append(v)
            for j, v in grouping._candidates(cells[i], crops, 7, 0.4):
                if rows[j] != i:
                    (same if crops.ids[j] == truth[i] else other).append(v)
                    if crops.ids[j] != truth[i]:
                        worst.append((v, truth[i], crops.ids[j]))

    def show(name: str, pos: list, neg: list) -> None:
        lo, hi = min(pos), max(neg)
        print(
            f"{name}: true min {lo:.3f} p5 {np.percentile(pos, 5):.3f} median "
            f"{np.median(pos):.3f} | false max {hi:.3f} p95 {np.percentile(neg, 95):.3f} "
            f"median {np.median(neg):.3f} | midpoint {(lo + hi) / 2:.3f}"
        )

    print(f"{len(cells)} synthetic copies of {len(set(truth))} cells")
    show("crop vs slide", true_s, absent_s)
    show("crop vs crop ", same, other)
    print("highest crop-vs-crop scores between different cells:", sorted(worst)[-3:])
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench grouping", description=__doc__)
    p.add_argument("--source", type=Path, default=DEFAULT_TRAIN, help="crop folder <CLASS>/*.jpeg")
    p.add_argument("--slides", type=Path, default=DEFAULT_SLIDES, help="VOC slide folder")
    p.add_argument("--no-slides", action="store_true", help="skip match_to_slides")
    p.add_argument("--no-groups", action="store_true", help="skip group_crops")
    p.add_argument("--per-class", type=int, default=None, help="use only N files per class")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "grouping-groups.png")
    p.add_argument("--png-rows", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="forked processes")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="only print verification scores on synthetic known-truth copies of the sample "
        "slides' cells (what the thresholds were chosen on)",
    )
    p.add_argument("--json", type=Path, default=None, help="write reports and timings here")
    args = p.parse_args(argv)
    if args.calibrate:
        return calibrate()
    if not args.source.is_dir():
        print(f"error: source {args.source} is not a folder; pass --source", flush=True)
        return 2
    files, labels = list_crops(args.source, args.per_class)
    print(
        f"{len(files)} crops in {len(set(labels))} classes from {args.source}; cores: {os.cpu_count()}"
    )
    out: dict = {"source": str(args.source), "crops": len(files)}
    results = {}
    methods = [
        m
        for m, skip in (("group_crops", args.no_groups), ("match_to_slides", args.no_slides))
        if not skip
    ]
    for m in methods:
        g, wall, cpu = run(m, files, labels, args.slides, args.workers)
        rep = g.report()
        print_report(m, rep, wall, cpu)
        results[m] = g
        out[m] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "report": rep}
        if args.json:
            out[m]["rows"] = [
                [str(f.relative_to(args.source)), s, sc, cf]
                for f, s, sc, cf in zip(files, g.source_id, g.score, g.confidence)
            ]
            args.json.write_text(json.dumps(out, indent=1))  # keep partial results
    if len(results) == 2:
        a = agreement(results["group_crops"].source_id, results["match_to_slides"].source_id)
        out["agreement"] = a
        print(f"\ngroup_crops against slide ids (crops with a slide): {a}")
    if "group_crops" in results and args.png:
        draw_groups(results["group_crops"], files, args.png, args.png_rows, 8)
        print(f"groups drawn: {args.png}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0
