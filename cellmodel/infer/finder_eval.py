"""Evaluate and cross-validate the white-cell finder on annotated slides (VOC layout).

- :func:`evaluate_finder`: recall and precision of one finder setting against the VOC
  ``WBC`` boxes at an IoU threshold (greedy one-to-one matching, best score first).
- :func:`cross_validate`: k folds over the slides. For each fold the settings are chosen
  on the other k-1 folds only (a grid over the pixel settings and the size filters, the
  box margins fitted by least squares), then scored on the held fold, which played no
  part in choosing them. Reported per fold, with the mean and the worst fold.
- :func:`compose_pair`: a slide with two touching white cells, made from two real slides
  (BCCD has about one white cell per slide, so splitting would never be exercised): the
  second slide's cell is cut out with a soft elliptic mask and pasted so that its box
  touches or overlaps the first cell's box. Cross-validation composes pairs within each
  fold, so a held fold's pairs are made of held-out cells only.
- :func:`evaluate_slide_class`: the slide job on ``JPEGImages`` against ``labels.csv``.
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cellmodel import storage
from cellmodel.config import validate_settings
from cellmodel.infer.finder import (
    PIXEL_SETTINGS,
    FinderConfig,
    Nucleus,
    boxes_from_nuclei,
    cut_by_frame,
    find_cells,
    find_cells_at_scale,
    find_nuclei,
    iou,
    match,
)

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

STAIN = {"method": "stain", "weights": None}  # the stain finder, whatever a config names

# The grid searched on the training folds (pixel settings; every combination).
PIXEL_GRID: dict[str, list] = {
    "cell_level": [0.4, 0.5],
    "split_depth": [1.5, 2.0],
    "split_min_dist": [70.0, 90.0],
    "split_elongation": [1.5, 1.7],
}
# Size filters, searched for each pixel setting (cheap: no pixel work).
BOX_GRID: dict[str, list] = {
    "min_area": [1500.0, 2000.0],
    "max_cell_size": [260.0, 300.0, 340.0],
}


@dataclass
class Slide:
    """One annotated slide held in memory."""

    name: str
    image: Image.Image
    truths: list[Box]
    composed: bool = False
    meta: dict = field(default_factory=dict)


def load_slides(
    slides: str,
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
) -> list[Slide]:
    """Every slide of a VOC-layout folder or URI with its ``WBC`` boxes, sorted by name.

    ``exclude``: slide names (file stems) left out; ``min_box``: ``WBC`` boxes with a side
    under this many pixels are dropped (BCCD labels a few platelets WBC).
    """
    from cellmodel.data.transforms import decode_image
    from cellmodel.data.voc import parse_voc

    fs, root = storage.get_fs(slides)
    xmls = sorted(p for p in fs.find(f"{root}/Annotations") if p.endswith(".xml"))
    if not xmls:
        raise FileNotFoundError(f"no Annotations/*.xml under {slides}; give a VOC-layout folder")
    out = []
    xmls = [x for x in xmls if x.rsplit("/", 1)[1][:-4] not in set(exclude)]
    for x in xmls[:limit]:
        stem = x.rsplit("/", 1)[1][:-4]
        _, boxes = parse_voc(fs.cat_file(x))
        truth = [
            b.as_tuple()
            for b in boxes
            if b.name == "WBC" and min(b.xmax - b.xmin, b.ymax - b.ymin) >= min_box
        ]
        img = decode_image(fs.cat_file(f"{root}/JPEGImages/{stem}.jpg"))
        out.append(Slide(stem, img, truth))
    return out


# ---------------------------------------------------------------- composed pairs


def compose_pair(a: Slide, b: Slide, rng: np.random.Generator) -> Slide | None:
    """``a`` with ``b``'s white cell pasted beside its own, touching or overlapping it.

    Needs one WBC box on each slide. The pasted box overlaps ``a``'s box by 0-20 % of its
    side along the axis of placement (touching to overlapping cells) and is shifted by up
    to 30 % across it; a direction where the pasted cell fits inside the slide is drawn at
    random. None when no direction fits, or when ``b``'s cell is cut by its slide's frame
    (:func:`cut_by_frame`): pasted mid-slide, part of a cell is no cell a slide shows.
    """
    if len(a.truths) != 1 or len(b.truths) != 1 or cut_by_frame(b.truths[0], b.image.size):
        return None
    ax0, ay0, ax1, ay1 = a.truths[0]
    bx0, by0, bx1, by1 = (int(round(v)) for v in b.truths[0])
    bw, bh = bx1 - bx0, by1 - by0
    if bw < 40 or bh < 40:
        return None
    iw, ih = a.image.size
    over = rng.uniform(0.0, 0.2)
    shift = rng.uniform(-0.3, 0.3)
    acx, acy = (ax0 + ax1) / 2, (ay0 + ay1) / 2
    places = {
        "left": (ax0 - bw + over * bw, acy - bh / 2 + shift * bh),
        "right": (ax1 - over * bw, acy - bh / 2 + shift * bh),
        "up": (acx - bw / 2 + shift * bw, ay0 - bh + over * bh),
        "down": (acx - bw / 2 + shift * bw, ay1 - over * bh),
    }
    fits = [
        (int(round(x)), int(round(y)))
        for x, y in places.values()
        if 0 <= x and 0 <= y and x + bw <= iw and y + bh <= ih
    ]
    if not fits:
        return None
    x, y = fits[int(rng.integers(len(fits)))]
    img, box = _paste_cell(a.image, b, x, y)
    meta = {"base": a.name, "pasted": b.name, "at": (x, y), "overlap": round(over, 3)}
    return Slide(f"{a.name}+{b.name}", img, [a.truths[0], box], composed=True, meta=meta)


def _paste_cell(image: Image.Image, donor: Slide, x: int, y: int) -> tuple[Image.Image, Box]:
    """A copy of ``image`` with ``donor``'s white cell pasted at (x, y) through a soft
    elliptical mask (the cell, not its box's corners), and the pasted cell's box."""
    bx0, by0, bx1, by1 = (int(round(v)) for v in donor.truths[0])
    bw, bh = bx1 - bx0, by1 - by0
    patch = donor.image.crop((bx0, by0, bx1, by1))
    mask = Image.new("L", (bw, bh), 0)
    ImageDraw.Draw(mask).ellipse((1, 1, bw - 2, bh - 2), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(2))
    img = image.copy()
    img.paste(patch, (x, y), mask)
    return img, (float(x), float(y), float(x + bw), float(y + bh))


def _apart(box: Box, others: list[Box]) -> bool:
    """``box`` makes no one cell with any of ``others``: IoU at most 0.1 and neither holds
    the other's centre (a pasted cell may touch or overlap a neighbour, not cover it)."""

    def holds(a: Box, b: Box) -> bool:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return a[0] <= cx <= a[2] and a[1] <= cy <= a[3]

    return all(iou(box, o) <= 0.1 and not holds(box, o) and not holds(o, box) for o in others)


def add_cell(s: Slide, donor: Slide, rng: np.random.Generator, touching: bool) -> Slide | None:
    """``s`` with ``donor``'s white cell pasted: ``touching`` beside one of ``s``'s cells as
    :func:`compose_pair` places it (apart from the others), else anywhere on the slide,
    overlapping no cell's box. None when no place was found in 20 draws or the donor's cell
    is cut by its frame."""
    if len(donor.truths) != 1 or cut_by_frame(donor.truths[0], donor.image.size):
        return None
    bx0, by0, bx1, by1 = (int(round(v)) for v in donor.truths[0])
    bw, bh = bx1 - bx0, by1 - by0
    iw, ih = s.image.size
    for _ in range(20):
        if touching:
            i = int(rng.integers(len(s.truths)))
            pair = compose_pair(Slide(s.name, s.image, [s.truths[i]]), donor, rng)
            if pair is None:
                continue
            box = pair.truths[1]
            if _apart(box, [t for j, t in enumerate(s.truths) if j != i]):
                return Slide(f"{s.name}+{donor.name}", pair.image, [*s.truths, box], True)
        elif iw > bw and ih > bh:
            x, y = int(rng.integers(0, iw - bw)), int(rng.integers(0, ih - bh))
            if all(iou((x, y, x + bw, y + bh), t) == 0 for t in s.truths):
                img, box = _paste_cell(s.image, donor, x, y)
                return Slide(f"{s.name}+{donor.name}", img, [*s.truths, box], True)
    return None


def composed_groups(
    slides: list[Slide], k: int, seed: int = 0, touching: bool = True
) -> list[Slide]:
    """Slides of ``k`` white cells: each single-cell slide of ``slides`` (not cut by its
    frame) with ``k`` - 1 cells of the others pasted, one by one, by :func:`add_cell`
    (``touching``: a chain or clump of touching cells; else scattered over the slide)."""
    rng = np.random.default_rng(seed)
    single = [s for s in slides if len(s.truths) == 1 and not s.composed
              and not cut_by_frame(s.truths[0], s.image.size)]  # fmt: skip
    out = []
    for s in single:
        cur: Slide | None = s
        for _ in range(k - 1):
            nxt = None
            for _ in range(5):  # a few donors, until one finds a place
                donor = single[int(rng.integers(len(single)))]
                if donor is not s:
                    nxt = add_cell(cur, donor, rng, touching)
                    if nxt is not None:
                        break
            cur = nxt
            if cur is None:
                break
        if cur is not None:
            out.append(cur)
    return out


def composed_pairs(slides: list[Slide], seed: int = 0) -> list[Slide]:
    """One composed pair per slide of ``slides`` (with a random partner among them)."""
    rng = np.random.default_rng(seed)
    single = [s for s in slides if len(s.truths) == 1 and not s.composed]
    out = []
    for s in single:
        for _ in range(5):  # a few partners, until one fits beside this slide's cell
            other = single[int(rng.integers(len(single)))]
            if other is s:
                continue
            pair = compose_pair(s, other, rng)
            if pair is not None:
                out.append(pair)
                break
    return out


# ---------------------------------------------------------------- scoring


def score(dets: list[list[Box]], truths: list[list[Box]], iou: float = 0.5) -> dict:
    """Totals over slides: true positives, detections, truths, recall and precision."""
    tp = n_pred = n_true = 0
    for d, t in zip(dets, truths, strict=True):
        tp += match(d, t, iou)
        n_pred += len(d)
        n_true += len(t)
    return {
        "true_positives": tp,
        "detections": n_pred,
        "wbc_boxes": n_true,
        "recall": tp / n_true if n_true else None,
        "precision": tp / n_pred if n_pred else None,
    }


def pair_counts(
    dets: list[list[Box]], made: list[Slide], iou_threshold: float = 0.5
) -> tuple[dict, list[int]]:
    """:func:`score` over composed pairs, with how many were counted as exactly two cells
    (both found, no third box), got exactly two boxes (the count right, whatever their fit),
    had both found, and lost both; and each pair's matches."""
    hits = [match(d, p.truths, iou_threshold) for d, p in zip(dets, made, strict=True)]
    out = {"pairs": len(made)} | score(dets, [p.truths for p in made], iou_threshold)
    out |= {
        "counted_two": sum(len(d) == 2 and h == 2 for d, h in zip(dets, hits, strict=True)),
        "two_boxes": sum(len(d) == 2 for d in dets),
        "both_found": sum(h == 2 for h in hits),
        "both_lost": sum(h == 0 for h in hits),
    }
    return out, hits


def group_counts(dets: list[list[Box]], made: list[Slide], iou_threshold: float = 0.5) -> dict:
    """Composed slides of several cells: how many were counted right (as many boxes as
    cells, each cell found) and how many got the right number of boxes, with :func:`score`."""
    hits = [match(d, s.truths, iou_threshold) for d, s in zip(dets, made, strict=True)]
    right = [len(d) == len(s.truths) for d, s in zip(dets, made, strict=True)]
    return (
        {"slides": len(made)}
        | score(dets, [s.truths for s in made], iou_threshold)
        | {
            "counted": sum(r and h == len(s.truths) for r, h, s in zip(right, hits, made)),
            "right_count": sum(right),
        }
    )


def _f1(s: dict) -> float:
    r, p = s["recall"] or 0.0, s["precision"] or 0.0
    return 2 * r * p / (r + p) if r + p else 0.0


def finder_settings(finder: FinderConfig | dict | None) -> FinderConfig:
    """``finder`` as validated settings (a dict is checked like the ``[finder]`` section)."""
    if isinstance(finder, FinderConfig):
        return finder
    return validate_settings(FinderConfig, dict(finder or {}))


def seen_in_training(cfg: FinderConfig, names: list[str]) -> int | None:
    """How many of the slides ``names`` the learned finder's weights were trained on (None
    for the stain finder). Scores on such slides are not held-out figures."""
    if cfg.method != "learned":
        return None
    from cellmodel.infer.learned_finder import read_meta

    seen = set(read_meta(str(cfg.weights)).get("trained_on") or [])
    return sum(n in seen for n in names)


def evaluate_finder(
    slides: str,
    finder: FinderConfig | dict | None = None,
    iou_threshold: float = 0.5,
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
) -> dict:
    """Finder recall/precision against the WBC boxes of every annotated slide.

    Each slide is found at the finder's own pixel scale, as in the slide job: the red-cell
    diameter of the slides of the commonest size is their median over up to 64 of them, a
    slide of another size is measured alone (see ``find_cells_at_scale``)."""
    from cellmodel.data.scale import estimate_dataset_scale, estimate_rbc_diameter
    from cellmodel.infer.slides import commonest_size, finder_scale

    cfg = finder_settings(finder)
    data = load_slides(slides, limit, exclude, min_box)
    finder_rbc = finder_scale(cfg)
    size, archive_rbc = None, None
    if finder_rbc and data:
        size, same = commonest_size([s.image for s in data])
        archive_rbc = estimate_dataset_scale(same, n=64)["rbc_diameter_px"]
    dets, missed, t_find, resized = [], [], 0.0, 0
    for s in data:
        rbc = archive_rbc if size and sorted(s.image.size) == sorted(size) else None
        if finder_rbc and rbc is None:
            rbc = estimate_rbc_diameter(s.image)
        t0 = time.perf_counter()
        found, f = find_cells_at_scale(s.image, cfg, rbc, finder_rbc)
        t_find += time.perf_counter() - t0
        resized += f != 1.0
        boxes = [d.as_tuple() for d in found]
        dets.append(boxes)
        if match(boxes, s.truths, iou_threshold) < len(s.truths):
            missed.append(s.name)
    out = {"slides": len(data), "iou_threshold": iou_threshold}
    out["scale"] = {"finder_rbc_diameter_px": finder_rbc, "archive_size": list(size or []) or None,
                    "archive_rbc_diameter_px": archive_rbc, "slides_resized": resized}  # fmt: skip
    out["seen_in_training"] = seen_in_training(cfg, [s.name for s in data])
    out |= score(dets, [s.truths for s in data], iou_threshold)
    out |= {
        "finder_ms_per_slide": round(1000 * t_find / len(data), 2),
        "slides_with_a_missed_cell": missed,
    }
    return out


def evaluate_pairs(
    slides: str,
    finder: FinderConfig | dict | None = None,
    seeds: tuple[int, ...] | list[int] = (0,),
    iou_threshold: float = 0.5,
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
) -> dict:
    """The finder on touching pairs composed from every single-cell slide, one per slide
    and seed (:func:`composed_pairs`): recall and precision, and per pair whether both
    cells were found as exactly two detections (the count a differential needs)."""
    cfg = finder_settings(finder)
    data = load_slides(slides, limit, exclude, min_box)
    made, dets, seed_of = [], [], []
    for seed in seeds:
        for p in composed_pairs(data, seed):
            made.append(p)
            seed_of.append(seed)
            dets.append([d.as_tuple() for d in find_cells(p.image, cfg)])
    if not made:
        raise ValueError(f"no touching pair could be composed from {slides}")
    counts, hits = pair_counts(dets, made, iou_threshold)
    out = {"seeds": list(seeds), "iou_threshold": iou_threshold}
    names = {n for p in made for n in (p.meta["base"], p.meta["pasted"])}
    out["seen_in_training"] = seen_in_training(cfg, sorted(names))
    out |= counts
    out["miscounted"] = [
        {"pair": p.name, "seed": sd, "detections": len(d), "found": h}
        for p, sd, d, h in zip(made, seed_of, dets, hits, strict=True)
        if len(d) != 2 or h != 2
    ]
    return out


# ---------------------------------------------------------------- cross-validation


def fit_box_margins(nuclei: list[list[Nucleus]], truths: list[list[Box]]) -> dict:
    """``grow``, ``margin`` and ``margin_gap`` by least squares on matched cells.

    A truth box is matched to the one nucleus whose centre lies inside it (skipped when
    none or several, and for boxes cut by the slide border, whose side is not the cell's).
    Model, per axis: ``truth side = cell_grow * cell side + grow * nucleus side + margin
    + margin_gap * (1 - fill)``.
    """
    rows, target = [], []
    for nucs, ts in zip(nuclei, truths, strict=True):
        for t in ts:
            if t[0] <= 1 or t[1] <= 1 or t[2] >= 639 or t[3] >= 479:
                continue
            inside = [
                n
                for n in nucs
                if n.area >= 1000
                and t[0] <= (n.x0 + n.x1) / 2 <= t[2]
                and t[1] <= (n.y0 + n.y1) / 2 <= t[3]
            ]
            if len(inside) != 1:
                continue
            n, c = inside[0], inside[0].cell
            g = 1.0 - n.fill
            rows += [[c[2] - c[0], n.x1 - n.x0, 1.0, g], [c[3] - c[1], n.y1 - n.y0, 1.0, g]]
            target += [t[2] - t[0], t[3] - t[1]]
    if len(rows) < 6:
        return {}
    coef, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(target), rcond=None)
    return {
        "cell_grow": round(float(coef[0]), 4),
        "grow": round(float(coef[1]), 4),
        "margin": round(float(coef[2]), 2),
        "margin_gap": round(float(coef[3]), 2),
    }


def _grid(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


def _pixel_key(cfg: FinderConfig) -> tuple:
    return tuple(getattr(cfg, k) for k in PIXEL_SETTINGS)


def assign_folds(n: int, k: int, seed: int = 0) -> np.ndarray:
    """The fold of each of ``n`` slides: a seeded permutation cut into ``k`` parts."""
    if n < k:
        raise ValueError(f"{n} slides cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, np.int64)
    for f, idx in enumerate(np.array_split(order, k)):
        fold_of[idx] = f
    return fold_of


def cross_validate(
    slides: str,
    k: int = 5,
    *,
    base: FinderConfig | dict | None = None,
    pixel_grid: dict[str, list] | None = None,
    box_grid: dict[str, list] | None = None,
    iou_threshold: float = 0.5,
    compose: bool = True,
    seed: int = 0,
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
    progress: bool = False,
) -> dict:
    """k-fold cross-validation of the finder's settings over slides (see the module doc).

    Folds are a seeded permutation of the real slides; composed pairs are made inside each
    fold. Settings are chosen on the training folds by F1 over real and composed slides
    together (ties: the earlier grid point). Returns the per-fold rows, the mean and worst
    fold, and the setting chosen on all slides (what to ship).
    """
    pixel_grid = PIXEL_GRID if pixel_grid is None else pixel_grid
    box_grid = BOX_GRID if box_grid is None else box_grid
    real = load_slides(slides, limit, exclude, min_box)
    fold_of = assign_folds(len(real), k, seed)
    data: list[Slide] = list(real)
    folds = list(fold_of)
    if compose:
        for f in range(k):
            pairs = composed_pairs([real[i] for i in np.nonzero(fold_of == f)[0]], seed + f)
            data += pairs
            folds += [f] * len(pairs)
    folds_arr = np.asarray(folds)
    truths = [s.truths for s in data]
    is_composed = np.asarray([s.composed for s in data])

    # The pixel stage once per pixel setting, for every slide. This searches the stain
    # finder's settings, whatever method ``base`` names (see cross_validate_learned).
    base_cfg = finder_settings(finder_settings(base).to_dict() | STAIN)
    cache: dict[tuple, list[list[Nucleus]]] = {}
    pixel_cfgs = [finder_settings(base_cfg.to_dict() | g) for g in _grid(pixel_grid)]
    t0 = time.perf_counter()
    for i, cfg in enumerate(pixel_cfgs):
        key = _pixel_key(cfg)
        if key not in cache:
            cache[key] = [find_nuclei(s.image, cfg) for s in data]
        if progress:
            print(f"  pixel setting {i + 1}/{len(pixel_cfgs)} ({time.perf_counter() - t0:.0f} s)")

    def choose(train: np.ndarray) -> tuple[FinderConfig, dict]:
        best, best_f1 = None, -1.0
        for cfg in pixel_cfgs:
            nuc = cache[_pixel_key(cfg)]
            tr_nuc = [nuc[i] for i in train]
            tr_truth = [truths[i] for i in train]
            margins = fit_box_margins(tr_nuc, tr_truth)
            for g in _grid(box_grid):
                c = finder_settings(cfg.to_dict() | margins | g)
                dets = [
                    [d.as_tuple() for d in boxes_from_nuclei(n, data[i].image.size, c)]
                    for n, i in zip(tr_nuc, train, strict=True)
                ]
                s = score(dets, tr_truth, iou_threshold)
                if _f1(s) > best_f1:
                    best, best_f1 = c, _f1(s)
        return best, {"train_f1": round(best_f1, 4)}

    def held_scores(cfg: FinderConfig, idx: np.ndarray) -> dict:
        nuc = cache[_pixel_key(cfg)]
        dets = [
            [d.as_tuple() for d in boxes_from_nuclei(nuc[i], data[i].image.size, cfg)] for i in idx
        ]
        tr = [truths[i] for i in idx]
        comp = is_composed[idx]
        out = {"all": score(dets, tr, iou_threshold)}
        for name, sel in (("real", ~comp), ("composed", comp)):
            out[name] = score(
                [d for d, c in zip(dets, sel, strict=True) if c],
                [t for t, c in zip(tr, sel, strict=True) if c],
                iou_threshold,
            )
        return out

    rows = []
    for f in range(k):
        train = np.nonzero(folds_arr != f)[0]
        held = np.nonzero(folds_arr == f)[0]
        cfg, info = choose(train)
        sc = held_scores(cfg, held)
        chosen = {
            n: getattr(cfg, n)
            for n in [*pixel_grid, *box_grid, "cell_grow", "grow", "margin", "margin_gap"]
        }
        rows.append(
            {
                "fold": f,
                "real_slides": int((~is_composed[held]).sum()),
                "composed_slides": int(is_composed[held].sum()),
                **info,
                "chosen": chosen,
                **sc,
            }
        )
        if progress:
            print(format_fold(rows[-1]))
    final, _ = choose(np.arange(len(data)))
    # Speed of the chosen setting, one process, real slides only (decode not counted).
    t0 = time.perf_counter()
    for s in real:
        find_cells(s.image, final)
    ms = 1000 * (time.perf_counter() - t0) / len(real)

    def summary(part: str, metric: str) -> dict:
        vals = [r[part][metric] for r in rows if r[part][metric] is not None]
        return {"mean": float(np.mean(vals)), "worst": float(np.min(vals))} if vals else {}

    return {
        "slides": slides,
        "k": k,
        "seed": seed,
        "iou_threshold": iou_threshold,
        "real_slides": len(real),
        "excluded": list(exclude),
        "min_box": min_box,
        "composed_slides": int(is_composed.sum()),
        "folds": rows,
        "summary": {
            part: {m: summary(part, m) for m in ("recall", "precision")}
            for part in ("real", "composed", "all")
        },
        "final": final.to_dict(),
        "finder_ms_per_slide": round(ms, 2),
    }


def _fmt(s: dict, m: str) -> str:
    return "n/a" if s.get(m) is None else f"{s[m]:.3f}"


def format_fold(r: dict) -> str:
    return (
        f"fold {r['fold']}: real {_fmt(r['real'], 'recall')}/{_fmt(r['real'], 'precision')}, "
        f"composed {_fmt(r['composed'], 'recall')}/{_fmt(r['composed'], 'precision')}, "
        f"all {_fmt(r['all'], 'recall')}/{_fmt(r['all'], 'precision')} (recall/precision)"
    )


def format_cv_table(res: dict) -> str:
    """The per-fold table (Markdown) with the mean and the worst fold."""
    head = (
        "| fold | real slides | composed pairs | real recall | real precision | "
        "pairs recall | pairs precision | all recall | all precision | chosen on the other folds |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in res["folds"]:
        c = r["chosen"]
        chosen = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
        )
        lines.append(
            f"| {r['fold']} | {r['real_slides']} | {r['composed_slides']} | "
            f"{_fmt(r['real'], 'recall')} | {_fmt(r['real'], 'precision')} | "
            f"{_fmt(r['composed'], 'recall')} | {_fmt(r['composed'], 'precision')} | "
            f"{_fmt(r['all'], 'recall')} | {_fmt(r['all'], 'precision')} | {chosen} |"
        )
    s = res["summary"]
    for what in ("mean", "worst"):
        cells = [
            f"{s[p][m][what]:.3f}" if s[p][m] else "n/a"
            for p in ("real", "composed", "all")
            for m in ("recall", "precision")
        ]
        lines.append(f"| **{what}** | | | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


# ---------------------------------------------------------------- learned finder


def cross_validate_learned(
    slides: str,
    k: int = 5,
    *,
    learned=None,
    stain: FinderConfig | dict | None = None,
    iou_threshold: float = 0.5,
    seed: int = 0,
    pair_seeds: tuple[int, ...] | list[int] = (20, 21, 22, 23),
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
    skip_empty: bool = False,
    suppress: list[float] | tuple[float, ...] | None = None,
    flips: list[bool] | tuple[bool, ...] | None = None,
    min_score: list[float] | tuple[float, ...] | None = None,
    groups: Sequence[int] = (),
    networks_out: str | None = None,
    progress: bool = False,
) -> dict:
    """k-fold cross-validation of the learned centre finder, beside the stain finder.

    The folds are those of :func:`cross_validate` (same ``seed``). For each fold a network
    is trained from random weights on the real slides of the other folds only (settings:
    ``learned``, a :class:`~cellmodel.infer.learned_finder.LearnedFinderConfig`; nothing is
    chosen on the held fold) and scored on the held fold's real slides, its composed pairs
    (the same pairs as :func:`cross_validate`'s) and fresh pairs composed inside the held
    fold with ``pair_seeds``. The stain finder with the settings ``stain`` is scored on the
    same slides; those settings were chosen once on all slides (``cross_validate``'s
    ``final``), which favours the stain finder here. ``skip_empty``: the training folds'
    slides without a ``WBC`` box are left out of training (not of scoring), for datasets
    where such a slide means an unannotated cell, not an empty field.

    ``suppress``: candidate values of the learned finder's ``suppress`` setting. Each fold's
    network is scored with every candidate; the value reported for a fold is the one that
    scores best on the *other* folds (mean F1 over real slides, composed and fresh pairs,
    ties to the smaller value), so the held fold plays no part in choosing it; ``final`` is
    the value chosen on all folds, the one to train the shipped weights with. ``flips``:
    candidates of the ``flips`` setting (heat map averaged over the slide's flips), chosen
    with ``suppress`` the same way (each pair of values a candidate; ties go to no flips).
    ``min_score``: candidates of the detection threshold on the heat map, chosen with the
    others the same way (every combination a candidate; ties to the smaller threshold).
    ``groups``: also score composed slides of that many cells (e.g. 3, 4), from the held
    fold's slides only (:func:`composed_groups`, touching chains and scattered cells, seed
    ``seed`` + 40 + fold), at each fold's chosen settings; they play no part in choosing.
    ``networks_out``: a folder to save each fold's network in (``fold-N.pt``); a network
    found there that was trained on the same slides with the same settings is reused, so the
    same command run again (another ``suppress`` grid, say) trains nothing.
    """
    import dataclasses

    from cellmodel.infer import learned_finder as lf

    lcfg = learned or lf.LearnedFinderConfig()
    scfg = finder_settings(finder_settings(stain).to_dict() | STAIN)
    real = load_slides(slides, limit, exclude, min_box)
    fold_of = assign_folds(len(real), k, seed)
    grid = sorted({float(v) for v in suppress}) if suppress else None
    flip_grid = sorted({bool(v) for v in flips}) if flips else None
    score_grid = sorted({float(v) for v in min_score}) if min_score else None
    if (flip_grid or score_grid) and not grid:
        grid = [lcfg.suppress]
    if grid and not flip_grid:
        flip_grid = [lcfg.flips]
    keyed = score_grid is not None  # the threshold named in the grid's keys
    if grid and not score_grid:
        score_grid = [lcfg.min_score]
    group_sets = [(n, t, _group_name(n, t)) for n in groups for t in (True, False)]
    rows = []
    t_train, reused = 0.0, 0
    for f in range(k):
        held = [real[i] for i in np.nonzero(fold_of == f)[0]]
        train = [real[i] for i in np.nonzero(fold_of != f)[0]]
        if skip_empty:
            train = [s for s in train if s.truths]
        sets = {
            "real": held,
            "composed": composed_pairs(held, seed + f),
            "fresh": [p for sd in pair_seeds for p in composed_pairs(held, sd)],
        }
        for n, touching, name in group_sets:
            sets[name] = composed_groups(held, n, seed + 40 + f, touching)
        t0 = time.perf_counter()
        saved = storage.join(networks_out, f"fold-{f}.pt") if networks_out else None
        meta = {"trained_on": [s.name for s in train], "fold": f, "k": k, "seed": seed,
                "settings": lcfg.to_dict() | {"suppress": 0.0, "flips": False}}  # fmt: skip
        if saved and storage.exists(saved) and _same_training(lf.read_meta(saved), meta):
            model = lf.load(saved)[0]  # this fold's network from an earlier run: reused
            reused += 1
        else:
            model = lf.train_finder([s.image for s in train], [s.truths for s in train], lcfg)
            t_train += time.perf_counter() - t0
            if saved:
                lf.save(model, lcfg, saved, meta)
        row: dict = {"fold": f, "real_slides": len(held), "train_slides": len(train)}

        def scored(name: str, ss: list[Slide], found) -> dict:
            dets = [[d.as_tuple() for d in dd] for dd in found]
            if name == "real":
                return score(dets, [s.truths for s in ss], iou_threshold)
            if name.startswith("cells"):
                return group_counts(dets, ss, iou_threshold)
            return pair_counts(dets, ss, iou_threshold)[0]

        if grid:  # the network runs once per set and flip setting; the others filter its peaks
            row["grid"] = {}
            for fl in flip_grid:
                low = dataclasses.replace(lcfg, suppress=0.0, flips=fl, min_score=score_grid[0])
                raw = {name: lf.detect(model, [s.image for s in ss], low)
                       for name, ss in sets.items()}  # fmt: skip
                for c in score_grid:  # as decode: the threshold first, then suppression
                    above = {n: [[d for d in dd if d.score >= c] for dd in found]
                             for n, found in raw.items()}  # fmt: skip
                    row["grid"] |= {
                        _grid_key(v, fl, c if keyed else None): {
                            name: scored(name, ss, [lf.suppress_inner(d, v) if v > 0 else d
                                                    for d in above[name]])
                            for name, ss in sets.items()
                        }
                        for v in grid
                    }  # fmt: skip
        for name, ss in sets.items():
            if not grid:
                row[f"learned_{name}"] = scored(
                    name, ss, lf.detect(model, [s.image for s in ss], lcfg)
                )
            row[f"stain_{name}"] = scored(name, ss, [find_cells(s.image, scfg) for s in ss])
        rows.append(row)
        if progress:
            print(
                f"fold {f}: " + ", ".join(
                    f"{m} {n} {_fmt(row[f'{m}_{n}'], 'recall')}/"
                    f"{_fmt(row[f'{m}_{n}'], 'precision')}"
                    for n in sets for m in ("learned", "stain") if f"{m}_{n}" in row
                ),
                flush=True,
            )  # fmt: skip
    final = final_flips = final_score = None
    if grid:
        scores = score_grid if keyed else None
        for r in rows:  # each fold's values chosen on the other folds
            others = [o for o in rows if o is not r] or [r]
            r["suppress"], r["flips"], c = _choose_suppress(others, grid, flip_grid, scores)
            r["min_score"] = lcfg.min_score if c is None else c
            for name, got in r["grid"][_grid_key(r["suppress"], r["flips"], c)].items():
                r[f"learned_{name}"] = got
        final, final_flips, c = _choose_suppress(rows, grid, flip_grid, scores)
        final_score = lcfg.min_score if c is None else c

    def summary(key: str) -> dict:
        out = {}
        for m in ("recall", "precision"):
            vals = [r[key][m] for r in rows if r[key][m] is not None]
            out[m] = {"mean": float(np.mean(vals)), "worst": float(np.min(vals))} if vals else {}
        for count in ("counted_two", "two_boxes", "pairs", "counted", "right_count", "slides"):
            if count in rows[0][key]:
                out[count] = sum(r[key][count] for r in rows)
        return out

    names = ["real", "composed", "fresh"] + [name for *_, name in group_sets]
    keys = [f"{m}_{n}" for n in names for m in ("learned", "stain")]
    return {
        "slides": slides,
        "k": k,
        "seed": seed,
        "pair_seeds": list(pair_seeds),
        "groups": names[3:],
        "skip_empty": skip_empty,
        "iou_threshold": iou_threshold,
        "real_slides": len(real),
        "learned": lcfg.to_dict(),
        "stain": scfg.to_dict(),
        "folds": rows,
        "summary": {key: summary(key) for key in keys},
        "train_s_per_fold": round(t_train / (k - reused), 1) if reused < k else None,
        "networks_reused": reused,
        "suppress_grid": grid,
        "suppress_final": final,
        "flips_grid": flip_grid,
        "flips_final": final_flips,
        "min_score_grid": score_grid if keyed else None,
        "min_score_final": final_score,
    }


# Settings that act on the trained network's output only: a saved fold network trained with
# other values of these is the same network.
_DETECTION_ONLY = ("suppress", "flips", "min_score")


def _same_training(saved: dict, meta: dict) -> bool:
    """Whether a saved fold network was trained as ``meta`` asks. A setting the saved one
    does not record (it predates the setting) reads as ``learned_finder.load`` reads it, so adding a
    training setting does not make every saved network look different."""
    from cellmodel.infer.learned_finder import recorded_settings

    def strip(m: dict) -> dict:
        settings = recorded_settings(m.get("settings") or {})
        return m | {"settings": {k: v for k, v in settings.items() if k not in _DETECTION_ONLY}}

    return strip(saved) == strip(meta)


def _group_name(n: int, touching: bool) -> str:
    return f"cells{n} {'touching' if touching else 'scattered'}"


def _grid_key(v: float, flips: bool = False, min_score: float | None = None) -> str:
    score = f" score {min_score:g}" if min_score is not None else ""
    return f"{v:g}" + score + (" flips" if flips else "")


def _choose_suppress(
    rows: list[dict],
    grid: list[float],
    flips: list[bool] | None = None,
    min_score: list[float] | None = None,
) -> tuple[float, bool, float | None]:
    """The (suppress, flips, min_score) candidate with the best mean F1 over real slides,
    composed and fresh pairs, each pooled over ``rows``; ties go to no flips (a quarter of
    the compute), then to the smaller ``suppress`` (less suppression), then to the smaller
    threshold. ``min_score`` None: the grid's keys name no threshold (one was used)."""
    cands = [(v, fl, c) for fl in sorted(flips or [False]) for v in grid
             for c in (sorted(min_score) if min_score else [None])]  # fmt: skip
    best, best_f1 = cands[0], -1.0
    for v, fl, c in cands:
        f1s = []
        for name in ("real", "composed", "fresh"):
            scores = [r["grid"][_grid_key(v, fl, c)][name] for r in rows]
            tp, n_pred, n_true = (sum(sc[k] for sc in scores)
                                  for k in ("true_positives", "detections", "wbc_boxes"))  # fmt: skip
            f1s.append(_f1({"recall": tp / n_true if n_true else None,
                            "precision": tp / n_pred if n_pred else None}))  # fmt: skip
        f1 = float(np.mean(f1s))
        if f1 > best_f1 + 1e-12:
            best, best_f1 = (v, fl, c), f1
    return best


def format_learned_cv_table(res: dict) -> str:
    """Per fold, learned against stain: recall/precision on real slides and composed pairs,
    and fresh pairs counted as exactly two cells (Markdown)."""
    head = (
        "| fold | finder | real recall | real precision | pairs recall | pairs precision | "
        "fresh pairs recall | fresh pairs precision | fresh pairs counted two |"
    )
    lines = [head, "|" + "---|" * 9]

    for r in res["folds"]:
        for m in ("learned", "stain"):
            vals = [
                _fmt(r[f"{m}_{n}"], met)
                for n in ("real", "composed", "fresh")
                for met in ("recall", "precision")
            ]
            two = f"{r[f'{m}_fresh']['counted_two']} of {r[f'{m}_fresh']['pairs']}"
            lines.append(f"| {r['fold']} | {m} | " + " | ".join(vals) + f" | {two} |")
    s = res["summary"]
    for what in ("mean", "worst"):
        for m in ("learned", "stain"):
            vals = [
                f"{s[f'{m}_{n}'][met][what]:.3f}" if s[f"{m}_{n}"][met] else "n/a"
                for n in ("real", "composed", "fresh")
                for met in ("recall", "precision")
            ]
            two = ""
            if what == "mean":
                two = f"{s[f'{m}_fresh']['counted_two']} of {s[f'{m}_fresh']['pairs']}"
            lines.append(f"| **{what}** | {m} | " + " | ".join(vals) + f" | {two} |")
    for name in res.get("groups") or []:
        n, how = name.removeprefix("cells").split(" ")
        got = {m: s[f"{m}_{name}"] for m in ("learned", "stain")}
        lines.append(
            f"\ncomposed slides of {n} cells ({how}): counted right (one box on each cell, no "
            "other) " + ", ".join(
                f"{m} {g['counted']} of {g['slides']} (right count {g['right_count']})"
                for m, g in got.items()
            )
        )  # fmt: skip
    if res.get("suppress_grid"):
        flips = len(res.get("flips_grid") or []) > 1
        scores = res.get("min_score_grid")

        def pick(r: dict, prefix: str = "") -> str:
            v, fl, c = (r[f"{prefix}{k}"] for k in ("suppress", "flips", "min_score"))
            return (f"{v:g}" + (f" at min_score {c:g}" if scores else "")
                    + ((" with flips" if fl else " without") if flips else ""))  # fmt: skip

        chosen = ", ".join(f"fold {r['fold']} {pick(r)}" for r in res["folds"])
        final = {k: res[f"{k}_final"] for k in ("suppress", "flips", "min_score")}
        lines.append(
            f"\nlearned `suppress` among {[float(v) for v in res['suppress_grid']]}"
            + (f", `min_score` among {[float(v) for v in scores]}" if scores else "")
            + (", `flips` off and on" if flips else "")
            + f", each fold's chosen on the other folds: {chosen}; chosen on all folds: "
            + pick(final)
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- slide-level class


def evaluate_slide_class(
    slides: str, checkpoint: str | Sequence[str], output: str, cfg=None
) -> dict:
    """Run the slide job over ``<slides>/JPEGImages``; compare ``top_class`` with labels.csv.
    ``checkpoint``: one, or several (an ensemble)."""
    from cellmodel.data.voc import read_labels_csv
    from cellmodel.evaluate.metrics import wilson_interval
    from cellmodel.infer.slides import read_results, run_slides

    labels = read_labels_csv(storage.read_bytes(storage.join(slides, "labels.csv")))
    run_slides(storage.join(slides, "JPEGImages"), checkpoint, output, cfg, progress=True)
    _, table = read_results(output)
    classes = [c for c in table.columns if c.startswith("count_")]
    names = {c.removeprefix("count_").upper() for c in classes}
    right = total = 0
    confusion: dict[str, dict[str, int]] = {}
    for row in table.itertuples():
        num = _slide_number(row.slide_id)
        truth = labels.get(num) if num is not None else None
        if not truth or len(truth) != 1 or truth[0] not in names or row.status != "ok":
            continue  # unlabelled, multi-label, BASOPHIL or unreadable: no single answer
        pred = row.top_class or "none"
        confusion.setdefault(truth[0], {}).setdefault(pred, 0)
        confusion[truth[0]][pred] += 1
        right, total = right + (pred == truth[0]), total + 1
    return {
        "single_label_slides": total,
        "slide_accuracy": right / total if total else None,
        # Each slide is one independent answer: a 95 % Wilson interval over them.
        "slide_accuracy_interval": wilson_interval(right, total) if total else None,
        "confusion": confusion,
    }


def _slide_number(name: str) -> int | None:
    num = "".join(ch for ch in name.rsplit("/", 1)[-1] if ch.isdigit())
    return int(num) if num else None


def evaluate_pair_differentials(
    slides: str,
    checkpoint: str | Sequence[str],
    output: str,
    cfg=None,
    seeds: tuple[int, ...] | list[int] = (0,),
    iou_threshold: float = 0.5,
    limit: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    min_box: float = 0.0,
) -> dict:
    """The slide job on two-cell slides composed from single-label slides (one per slide
    and seed, :func:`composed_pairs`): how many it counts as two cells, how many of the two
    cells it boxes (IoU) and classifies right (the base slide's own cell and the pasted
    one apart), and how many differentials come out exact (the predicted classes of all
    the slide's cells are the two labels). The composed slides are written as PNGs under
    ``<output>/composed`` and the job's results under ``<output>/job``."""
    from cellmodel.data.voc import read_labels_csv
    from cellmodel.infer.slides import read_results, run_slides
    from cellmodel.models.checkpoint import expand_checkpoints, read_checkpoint_meta

    labels = read_labels_csv(storage.read_bytes(storage.join(slides, "labels.csv")))
    data = load_slides(slides, limit, exclude, min_box)
    first = expand_checkpoints(checkpoint)[0]  # an ensemble folder: its first member
    known = set(read_checkpoint_meta(first)["classes"])  # the job checks the others agree

    def label(name: str) -> str | None:
        got = labels.get(_slide_number(name)) or []  # slide 0 is a slide too
        return got[0] if len(got) == 1 and got[0] in known else None

    single = [s for s in data if label(s.name)]
    made, truth = {}, {}
    for seed in seeds:
        for p in composed_pairs(single, seed):
            name = f"s{seed}-{p.name}.png"
            made[name] = p
            truth[name] = [label(p.meta["base"]), label(p.meta["pasted"])]
    if not made:
        raise ValueError(
            f"no two-cell slide could be composed from the labelled slides of {slides}"
        )
    inp = storage.join(output, "composed")
    for name, p in made.items():
        buf = io.BytesIO()
        p.image.save(buf, "PNG")
        storage.write_bytes(storage.join(inp, name), buf.getvalue())
    job = storage.join(output, "job")
    run_slides(inp, checkpoint, job, cfg, progress=True)
    cells, table = read_results(job)
    n_cells = dict(zip(table.slide_id, table.n_cells, strict=True))
    counted = exact = 0
    right = {"base": [0, 0], "pasted": [0, 0]}  # [boxed and right, boxed]
    for name, p in made.items():
        mine = cells[cells.slide_id == name]
        boxes = mine[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist()
        preds = mine.pred_class.tolist()
        counted += int(n_cells.get(name, 0) == 2)
        exact += int(sorted(preds) == sorted(truth[name]))
        used: set[int] = set()
        for which, t, want in zip(("base", "pasted"), p.truths, truth[name], strict=True):
            ious = [(iou(b, t), i) for i, b in enumerate(boxes) if i not in used]
            best = max(ious, default=(0.0, -1))
            if best[0] >= iou_threshold:
                used.add(best[1])
                right[which][1] += 1
                right[which][0] += int(preds[best[1]] == want)
    n = len(made)
    return {
        "pairs": n,
        "seeds": list(seeds),
        "counted_two": counted,
        "differential_exact": exact,
        "cells_boxed": right["base"][1] + right["pasted"][1],
        "own_cell_right": right["base"][0] / right["base"][1] if right["base"][1] else None,
        "pasted_cell_right": right["pasted"][0] / right["pasted"][1]
        if right["pasted"][1]
        else None,
        "output": output,
    }
