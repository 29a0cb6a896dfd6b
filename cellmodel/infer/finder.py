"""Find white cells on a stained blood-smear slide, without annotations.

White-cell nuclei take the stain dark purple: much more blue than green. Red cells are
pink (blue close to green) and the background is pale. So the finder:

1. works on a downsampled copy (nuclei are large; speed matters on big archives);
2. scores each pixel by ``blue - green`` and thresholds it per slide (Otsu on the
   stained tail, never below a fixed floor so a slide without white cells stays empty);
3. opens the mask (drops specks and platelet fragments), dilates it so the lobes of one
   multi-lobed neutrophil nucleus join, and labels connected components;
4. keeps components whose nucleus area is large enough (platelets are small);
5. grows each nucleus box to the whole-cell extent (annotated boxes cover the cytoplasm,
   about 1.5-2.5x the nucleus), clipped to the slide;
6. scores each box from the nucleus area and stain strength, in [0, 1].

Only numpy and PIL are used: no scipy, no OpenCV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(kw_only=True)
class FinderConfig:
    """Tuning of the white-cell finder; defaults were chosen on BCCD (640x480 slides)."""

    downsample: int = 4  # work at 1/4 resolution: a nucleus stays 15-25 px across
    min_threshold: float = 55.0  # blue-green floor: below it nothing is a nucleus
    max_threshold: float = 80.0  # cap on the per-slide threshold, for heavily stained slides
    open_size: int = 3  # opening kernel (pixels at working scale): removes specks
    merge_size: int = 9  # dilation kernel joining the lobes of one nucleus
    min_area: float = 2000.0  # nucleus area at full resolution (px); platelets are smaller
    min_cell_size: float = 150.0  # the grown box is at least this wide/high (full res px)
    grow: float = 1.4  # box side = max(min_cell_size, grow * nucleus side)
    max_cell_size: float = 260.0  # nothing larger is one white cell
    min_score: float = 0.0  # boxes below this score are dropped

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> FinderConfig:
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown finder settings {sorted(unknown)}; known settings: {sorted(known)}"
            )
        return cls(**d)


@dataclass(frozen=True)
class Detection:
    """One white cell: a box in slide pixels (xmin, ymin, xmax, ymax) and a score in [0, 1]."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    score: float
    nucleus_area: float

    @property
    def center(self) -> tuple[float, float]:
        return (self.xmin + self.xmax) / 2, (self.ymin + self.ymax) / 2

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.xmin, self.ymin, self.xmax, self.ymax)


def stain_map(img: Image.Image, downsample: int = 1) -> np.ndarray:
    """``blue - green`` per pixel (float32, H/downsample x W/downsample): high on nuclei."""
    if downsample > 1:
        w, h = img.size
        img = img.resize((max(1, w // downsample), max(1, h // downsample)), Image.BOX)
    a = np.asarray(img, dtype=np.int16)
    return (a[..., 2] - a[..., 1]).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """The threshold that best splits ``values`` into two classes (Otsu's method)."""
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / hist.sum()
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    mt = m0[-1]
    w1 = 1 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(edges[int(np.argmax(between)) + 1])


def _morph(mask: np.ndarray, size: int, op: str) -> np.ndarray:
    if size <= 1:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    f = ImageFilter.MaxFilter(size) if op == "dilate" else ImageFilter.MinFilter(size)
    return np.asarray(im.filter(f)) > 127


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background, 1..n) of a boolean mask.

    Label propagation with pointer jumping: each pass spreads the largest index through
    neighbours, then jumps every pixel to the label its label points to, so it converges
    in about log(diameter) passes instead of diameter passes.
    """
    h, w = mask.shape
    idx = np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, idx, 0)
    while True:
        prev = lab
        nb = lab.copy()
        nb[1:, :] = np.maximum(nb[1:, :], lab[:-1, :])
        nb[:-1, :] = np.maximum(nb[:-1, :], lab[1:, :])
        nb[:, 1:] = np.maximum(nb[:, 1:], lab[:, :-1])
        nb[:, :-1] = np.maximum(nb[:, :-1], lab[:, 1:])
        nb = np.where(mask, nb, 0)
        flat = nb.ravel()
        # Pointer jumping: the pixel whose index equals my label knows a larger label.
        jumped = np.where(flat > 0, flat[np.maximum(flat - 1, 0)], 0)
        lab = np.maximum(flat, jumped).reshape(h, w)
        if np.array_equal(lab, prev):
            break
    uniq, inv = np.unique(lab, return_inverse=True)
    out = inv.reshape(h, w)
    n = len(uniq) - 1 if uniq[0] == 0 else len(uniq)
    if uniq[0] != 0:
        out = out + 1
    return out, n


def find_cells(img: Image.Image, cfg: FinderConfig | None = None) -> list[Detection]:
    """White cells on one RGB slide image, best score first."""
    cfg = cfg or FinderConfig()
    ds = max(1, int(cfg.downsample))
    iw, ih = img.size
    s = stain_map(img, ds)
    # Otsu on the stained tail only: the whole image is dominated by pale background and
    # red cells, whose split would land far below the nuclei.
    tail = s[s > cfg.min_threshold * 0.5]
    thr = otsu_threshold(tail) if tail.size > 50 else cfg.min_threshold
    thr = float(np.clip(thr, cfg.min_threshold, cfg.max_threshold))
    nucleus = s > thr
    nucleus = _morph(_morph(nucleus, cfg.open_size, "erode"), cfg.open_size, "dilate")
    merged = _morph(nucleus, cfg.merge_size, "dilate")
    labels, n = label_components(merged)
    if n == 0:
        return []
    # Measure nucleus pixels only (not the dilation) per merged component.
    lab_n = np.where(nucleus, labels, 0).ravel()
    area = np.bincount(lab_n, minlength=n + 1).astype(np.float64) * ds * ds
    strength = np.bincount(lab_n, weights=s.ravel(), minlength=n + 1)
    ys, xs = np.nonzero(nucleus)
    ls = labels[ys, xs]
    dets = []
    for k in range(1, n + 1):
        if area[k] < cfg.min_area:
            continue
        sel = ls == k
        x0, x1 = xs[sel].min() * ds, (xs[sel].max() + 1) * ds
        y0, y1 = ys[sel].min() * ds, (ys[sel].max() + 1) * ds
        if max(x1 - x0, y1 - y0) > cfg.max_cell_size:
            continue  # a clump or a stain artefact, not one cell
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = max(cfg.min_cell_size, cfg.grow * max(x1 - x0, y1 - y0))
        side = min(side, cfg.max_cell_size)
        box = (
            max(0.0, cx - side / 2),
            max(0.0, cy - side / 2),
            min(float(iw), cx + side / 2),
            min(float(ih), cy + side / 2),
        )
        mean_stain = strength[k] / (area[k] / (ds * ds))
        # Large, strongly stained nuclei are surely white cells; small faint ones are doubtful.
        size_term = min(1.0, area[k] / (3 * cfg.min_area))
        stain_term = min(1.0, max(0.0, (mean_stain - thr) / 40.0 + 0.5))
        score = round(float(0.5 * size_term + 0.5 * stain_term), 4)
        if score >= cfg.min_score:
            dets.append(Detection(*box, score=score, nucleus_area=float(area[k])))
    dets.sort(key=lambda d: -d.score)
    return dets


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(preds: list[tuple[float, ...]], truths: list[tuple[float, ...]], thr: float = 0.5) -> int:
    """Greedy one-to-one matching at IoU >= ``thr``; the number of true positives.

    ``preds`` should be sorted by score, best first.
    """
    used: set[int] = set()
    tp = 0
    for p in preds:
        best, best_j = thr, -1
        for j, t in enumerate(truths):
            if j not in used:
                v = iou(p, t)
                if v >= best:
                    best, best_j = v, j
        if best_j >= 0:
            used.add(best_j)
            tp += 1
    return tp
