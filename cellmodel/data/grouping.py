"""Recover the source cell of each crop in a folder of pre-augmented crops.

The public blood-cells TRAIN folder holds rotated, shifted, flipped, zoomed and re-encoded
copies of few source cells; a random split of it leaks. Two ways to name each crop's source:

- ``group_crops``: near-duplicate grouping within each class (no other data needed);
- ``match_to_slides``: match each crop to the white cell of the BCCD slide it was cut from.

Both rest on one comparison of a crop with a reference (another crop or a slide):

1. anchor: the stained nucleus (blue minus green) is blurred and its peak refined to a
   centroid; the anchor moves with the image under rotation, flip, shift and zoom;
2. polar signature: grey levels on rings around the anchor (black corners and pixels
   outside the image masked out); rotation is a circular shift along the angle, a flip
   reverses it, a zoom stretches the radius. A masked normalised cross-correlation over all
   shifts (FFT, both flips, a few zooms) gives the best angle, flip and zoom per reference;
3. verification: the reference is warped into the crop's frame with that angle, flip and
   zoom, and a masked normalised cross-correlation over all translations (FFT, quarter
   resolution) scores the overlapping picture outside the nucleus (the red cells around
   it). Same-source pairs score about 0.7-1.0, different cells about 0.2-0.7
   (docs/grouping.md).

Everything is numpy/scipy; a crop costs 10-30 ms of CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import fft as sfft
from scipy import ndimage as ndi

from cellmodel.data.transforms import nucleus_stain
from cellmodel.data.voc import parse_voc, read_labels_csv

# Polar signature (half-resolution pixels: a 320x240 crop is analysed at 160x120).
N_RINGS = 24
RING_STEP = 2.0  # rings reach 48 half-res px = 96 crop px around the nucleus
N_ANGLES = 64
N_FREQ = 32  # angular frequencies kept (low-pass, and a smaller matrix product)
# Zooms tried between a crop and a reference (geometric, about 6% apart; the angle step
# of 5.6 degrees is refined by a parabola through the correlation peak).
ZOOMS: tuple[float, ...] = tuple(float(x) for x in np.geomspace(0.88, 1.13, 5))
# References verified per crop (stage 2, on quarter-resolution pictures).
TOP_CANDIDATES = 2
# Verification ignores the nucleus (dilated by this many quarter-res px): one round blob
# looks like another; the red cells around it are what identify a slide.
EXCLUDE_NUCLEUS = 2
# Thresholds on the verification score, chosen on synthetic known-truth copies of the
# sample slides' cells (python -m jobs.bench grouping --calibrate; docs/grouping.md), each
# the midpoint between the lowest true score and the highest false one:
# crop vs slide: true >= 0.78, another slide <= 0.66 -> 0.72;
# crop vs crop: true >= 0.70, another cell <= 0.71 (they touch) -> 0.71.
MIN_SCORE = 0.72
MIN_MARGIN = 0.10  # best minus next other slide: below it two slides fit (duplicate shots)
GROUP_MIN_SCORE = 0.71
# Two groups merge at 0.80 (about the 5th percentile of true crop-vs-crop scores, above
# every false one): a wrong merge costs a whole group. Groups of <= SMALL_GROUP crops may
# join at GROUP_MIN_SCORE (a wrong join costs a few crops).
MERGE_SCORE = 0.80
SMALL_GROUP = 3
# match_to_slides raises when fewer than this share of (20 or more) crops match any slide:
# the slides are not the ones the crops were cut from. A partial slide set is fine.
MIN_ASSIGNED = 0.05


class GroupingError(ValueError):
    """Inputs that cannot be grouped or matched (the message says what to do)."""


class SlidesMismatchError(GroupingError):
    """The slides given do not fit the crops (no slide of a class, or almost no match)."""


@dataclass
class Grouping:
    """The source of each input row, in input order.

    ``source_id``: ``"CLASS/g<k>"`` (group_crops) or a slide id (match_to_slides), None when
    unassigned (keep such a row as its own source); ``confidence``: margin of the best match
    over the next other source, 0..1 (1.0 for a group's leader); ``score``: the best
    verification score; ``params``: thresholds used (and duplicate slides found).
    """

    source_id: list[str | None]
    confidence: list[float]
    labels: list[str]
    method: str
    score: list[float] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_id)

    def report(self) -> dict:
        """Per class: groups, group-size histogram, confidence summary, unassigned rows."""
        out: dict = {"method": self.method, "rows": len(self), "params": self.params, "classes": {}}
        for cls in sorted(set(self.labels)):
            idx = [i for i, c in enumerate(self.labels) if c == cls]
            ids = [self.source_id[i] for i in idx]
            sizes = Counter(s for s in ids if s is not None)
            conf = np.array([self.confidence[i] for i in idx if self.source_id[i] is not None])
            hist = Counter(sizes.values())
            out["classes"][cls] = {
                "rows": len(idx),
                "groups": len(sizes),
                "singletons": int(hist.get(1, 0)),
                "unassigned": sum(1 for s in ids if s is None),
                "group_size_histogram": {str(k): int(v) for k, v in sorted(hist.items())},
                "group_size": _summary(np.array(list(sizes.values()), dtype=float)),
                "confidence": _summary(conf),
            }
        return out


def _summary(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"n": 0}
    q = np.percentile(x, [0, 5, 50, 95, 100])
    return {
        "n": int(x.size),
        "min": round(float(q[0]), 4),
        "p5": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p95": round(float(q[3]), 4),
        "max": round(float(q[4]), 4),
    }


# ---------------------------------------------------------------------------------------
# One picture: half-resolution grey, validity mask, nucleus anchor.


@dataclass
class _Cell:
    gray: np.ndarray  # (h, w) float32 in [0, 1], half resolution
    valid: np.ndarray  # (h, w) bool: not a black corner, not off the image
    anchor: tuple[float, float]  # (y, x) in half-res pixels
    area: float  # nucleus area (half-res px)
    truncated: float  # share of the nucleus that touches the invalid border
    small: np.ndarray  # quarter-resolution grey
    small_valid: np.ndarray

    @property
    def quality(self) -> float:
        """Higher for a whole nucleus near the middle of a mostly valid picture."""
        h, w = self.gray.shape
        off = math.hypot(self.anchor[0] / h - 0.5, self.anchor[1] / w - 0.5)
        return float(self.valid.mean()) - self.truncated - off


def _half(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2, a.shape[1] // 2
    a = a[: 2 * h, : 2 * w]
    return a.reshape(h, 2, w, 2, *a.shape[2:]).mean((1, 3))


def _cell(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> _Cell:
    """Analyse one picture; ``box`` (half-res x0, y0, x1, y1) restricts the anchor search."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    if rgb.shape[0] < 32 or rgb.shape[1] < 32:
        raise GroupingError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px is too small (>= 32x32)")
    half = _half(rgb)
    # Black corners / fill: JPEG leaves them near 0 but not exactly; erode off the ringing.
    valid = ndi.binary_erosion(half.sum(-1) > 45, iterations=2, border_value=0)
    stain = nucleus_stain(half) * valid
    blur = ndi.gaussian_filter(stain, 6.0)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        sel = np.zeros_like(blur, dtype=bool)
        sel[max(y0, 0) : max(y1, 0) + 1, max(x0, 0) : max(x1, 0) + 1] = True
        if sel.any():
            blur = np.where(sel, blur, -1.0)
    y, x = np.unravel_index(int(np.argmax(blur)), blur.shape)
    h, w = stain.shape
    yy, xx = np.ogrid[:h, :w]
    near = (yy - y) ** 2 + (xx - x) ** 2 < 23**2
    wgt = stain * near
    tot = float(wgt.sum())
    if tot > 1.0:
        cy, cx = float((wgt * yy).sum() / tot), float((wgt * xx).sum() / tot)
    else:  # no stain at all: the picture centre (the crop is still compared, weakly)
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    nucleus = (stain > 0.5) & near
    border = nucleus & ~ndi.binary_erosion(valid, iterations=2, border_value=0)
    gray = half.mean(-1) / 255.0
    small_valid = _half(valid.astype(np.float32)) > 0.99
    if EXCLUDE_NUCLEUS:  # score the surroundings (red cells): the nucleus blob looks alike
        nuc_small = ndi.binary_dilation(_half(stain) > 0.3, iterations=EXCLUDE_NUCLEUS)
        small_valid &= ~nuc_small
    return _Cell(
        gray=gray.astype(np.float32),
        valid=valid,
        anchor=(cy, cx),
        area=tot,
        truncated=float(border.sum()) / max(float(nucleus.sum()), 1.0),
        small=_half(gray).astype(np.float32),
        small_valid=small_valid,
    )


_RADII = (np.arange(N_RINGS) + 0.5) * RING_STEP
_THETA = np.arange(N_ANGLES) * 2 * np.pi / N_ANGLES


def _polar(c: _Cell, zoom: float = 1.0) -> np.ndarray:
    """(3, rings, freqs) complex64: FFT along the angle of mask*grey, mask, mask*grey^2."""
    r = _RADII[:, None] * zoom
    ys = c.anchor[0] + r * np.sin(_THETA)[None]
    xs = c.anchor[1] + r * np.cos(_THETA)[None]
    g = ndi.map_coordinates(c.gray, [ys, xs], order=1, mode="constant", cval=0.0)
    m = ndi.map_coordinates(c.valid.astype(np.float32), [ys, xs], order=0, mode="constant")
    x = np.stack([m * g, m, m * g * g])
    return np.fft.rfft(x, axis=-1)[..., :N_FREQ].astype(np.complex64)


class _Refs:
    """References (slides' cells or group leaders) stacked for one matrix product."""

    def __init__(self) -> None:
        self.cells: list[_Cell] = []
        self.ids: list[str] = []
        self._f: list[np.ndarray] = []
        self._mat: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, cell: _Cell, rid: str) -> None:
        self.cells.append(cell)
        self.ids.append(rid)
        self._f.append(_polar(cell))
        self._mat = None

    def __len__(self) -> int:
        return len(self.cells)

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Real and imaginary parts, (freq, rings, 3 * N) with ref-term-major columns."""
        if self._mat is None:
            f = np.stack(self._f).transpose(3, 2, 1, 0).reshape(N_FREQ, N_RINGS, -1)
            self._mat = (np.ascontiguousarray(f.real), np.ascontiguousarray(f.imag))
        return self._mat


# (query term, ref term) pairs the masked NCC needs: counts, sums, cross and square sums.
_PAIRS = ((1, 1), (0, 1), (1, 0), (0, 0), (2, 1), (1, 2))


def _stage1(q: np.ndarray, refs: _Refs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best polar NCC of query zooms ``q`` (Z, 3, R, K) against every reference.

    Returns per reference: score, zoom index, flip (0/1), angle (radians). Real matrix
    products (complex ones are slow in numpy's BLAS path): with A = a + ib, B = c + id,
    sum A conj(B) (no flip) and sum A B (a flip reverses the angle) share four products.
    """
    n = len(refs)
    z = q.shape[0]
    a = q.transpose(3, 0, 1, 2).reshape(N_FREQ, z * 3, N_RINGS)
    ar, ai = np.ascontiguousarray(a.real), np.ascontiguousarray(a.imag)
    br, bi = refs.matrix()
    p1, p2, p3, p4 = ar @ br, ai @ bi, ar @ bi, ai @ br
    spec = np.empty((2, N_FREQ, z * 3, 3 * n), dtype=np.complex64)
    spec[0].real, spec[0].imag = p1 + p2, p4 - p3
    spec[1].real, spec[1].imag = p1 - p2, p3 + p4
    spec = spec.reshape(2, N_FREQ, z, 3, 3, n)
    sel = np.stack([spec[:, :, :, i, j, :] for i, j in _PAIRS])  # (6, 2, K, Z, N)
    corr = sfft.irfft(sel, n=N_ANGLES, axis=2)  # (6, 2, T, Z, N)
    cnt = np.maximum(corr[0], 1.0)
    sa, sb, sab, saa, sbb = corr[1], corr[2], corr[3], corr[4], corr[5]
    va = saa - sa * sa / cnt
    vb = sbb - sb * sb / cnt
    ncc = (sab - sa * sb / cnt) / np.sqrt(np.maximum(va * vb, 1e-9))  # (2, T, Z, N)
    ncc = ncc.transpose(0, 2, 1, 3).reshape(2 * z, N_ANGLES, n)  # (flip*zoom, T, N)
    per = ncc.max(1)  # (2Z, N)
    k = per.argmax(0)
    fl, zi = np.divmod(k, z)
    cols = np.arange(n)
    score = per[k, cols]
    curve = ncc[k, :, cols]  # (N, T): the chosen flip and zoom of each reference
    t = curve.argmax(-1)
    y0 = curve[cols, t]
    ym = curve[cols, (t - 1) % N_ANGLES]
    yp = curve[cols, (t + 1) % N_ANGLES]
    den = ym - 2 * y0 + yp
    frac = np.where(den < -1e-9, 0.5 * (ym - yp) / np.where(den < -1e-9, den, -1.0), 0.0)
    angle = (t + np.clip(frac, -0.5, 0.5)) * 2 * np.pi / N_ANGLES  # parabolic peak
    return score, zi, fl, angle


def _masked_ncc(
    t: np.ndarray, mt: np.ndarray, im: np.ndarray, mi: np.ndarray, pad: int, min_frac: float
) -> float:
    """Best masked NCC of template ``t`` against ``im`` (``t``'s frame grown by ``pad`` on
    each side) over the translations that keep ``t`` inside ``im`` (circular FFT: no wrap)."""
    shape = (sfft.next_fast_len(im.shape[0]), sfft.next_fast_len(im.shape[1]))
    mt = mt.astype(np.float32)
    mi = mi.astype(np.float32)
    t = t * mt
    im = im * mi
    ft = [np.conj(sfft.rfft2(x, shape)) for x in (t, mt, t * t)]
    fi = [sfft.rfft2(x, shape) for x in (im, mi, im * im)]
    k = 2 * pad + 1

    def c(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return sfft.irfft2(x * y, shape)[:k, :k]

    n = np.maximum(c(ft[1], fi[1]), 1e-6)
    st, si = c(ft[0], fi[1]), c(ft[1], fi[0])
    v = (c(ft[2], fi[1]) - st * st / n) * (c(ft[1], fi[2]) - si * si / n)
    ncc = (c(ft[0], fi[0]) - st * si / n) / np.sqrt(np.maximum(v, 1e-12))
    ok = (n > min_frac * float(mt.sum())) & (v > 1e-10)
    if not ok.any():
        return -1.0
    return float(ncc[ok].max())


def _verify(a: _Cell, b: _Cell, flip: int, angle: float, zoom: float, min_frac: float) -> float:
    """Warp ``b`` into ``a``'s frame (angle, flip, zoom about the anchors); best NCC over shifts."""
    pad = 24
    sh, sw = a.small.shape
    yy, xx = np.mgrid[-pad : sh + pad, -pad : sw + pad].astype(np.float64)
    ay, ax = (a.anchor[0] - 0.5) / 2, (a.anchor[1] - 0.5) / 2
    by, bx = (b.anchor[0] - 0.5) / 2, (b.anchor[1] - 0.5) / 2
    dy, dx = (yy - ay) / zoom, (xx - ax) / zoom
    cs, sn = math.cos(-angle), math.sin(-angle)
    ry, rx = sn * dx + cs * dy, cs * dx - sn * dy
    if flip:
        ry = -ry
    coords = [by + ry, bx + rx]
    warped = ndi.map_coordinates(b.small, coords, order=1, mode="constant", cval=0.0)
    wmask = ndi.map_coordinates(b.small_valid.astype(np.float32), coords, order=0) > 0.5
    return _masked_ncc(a.small, a.small_valid, warped, wmask, pad, min_frac)


def _candidates(cell: _Cell, refs: _Refs, top: int, min_frac: float) -> list[tuple[int, float]]:
    """The ``top`` references by polar score, each with its verification score, best first."""
    if not len(refs):
        return []
    q = np.stack([_polar(cell, z) for z in ZOOMS])
    score, zi, fl, ang = _stage1(q, refs)
    order = np.argsort(-score)[:top]
    out = [
        (int(j), _verify(cell, refs.cells[j], int(fl[j]), float(ang[j]), ZOOMS[zi[j]], min_frac))
        for j in order
    ]
    return sorted(out, key=lambda t: -t[1])


# ---------------------------------------------------------------------------------------
# Public API

ImageSource = Sequence[Image.Image] | Iterable[Image.Image] | Callable[[int], Image.Image]


def _iter_images(images: ImageSource, n: int) -> Iterable[Image.Image]:
    if callable(images):
        return (images(i) for i in range(n))
    return iter(images)


def _checked(img: object, i: int) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise GroupingError(f"image {i} is a {type(img).__name__}, not a PIL image")
    return img


# State shared with forked workers (set just before a pool starts, read by the workers).
_FORK: dict = {}


def _indexable(images: ImageSource) -> bool:
    return callable(images) or isinstance(images, Sequence)


def _get(images: ImageSource, i: int) -> Image.Image:
    return _checked(images(i) if callable(images) else images[i], i)  # type: ignore[index]


def _pool_map(fn: Callable, jobs: list, workers: int) -> list:
    """``[fn(j) for j in jobs]``, in ``workers`` forked processes when asked and possible."""
    if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        return [fn(j) for j in jobs]
    with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


def _prep_chunk(idx: list[int]) -> list[_Cell]:
    return [_cell(_get(_FORK["images"], i)) for i in idx]


def _chunks(n: int, k: int) -> list[list[int]]:
    k = max(1, min(k, n))
    return [list(range(j, n, k)) for j in range(k)]


def _prepare(images: ImageSource, labels: Sequence[str], workers: int = 1) -> list[_Cell]:
    n = len(labels)
    if workers > 1 and _indexable(images):
        if isinstance(images, Sequence) and len(images) != n:
            raise GroupingError(f"{len(images)} images but {n} labels; pass one label per image")
        _FORK["images"] = images
        try:
            parts = _pool_map(_prep_chunk, _chunks(n, workers * 4), workers)
        finally:
            _FORK.clear()
        cells: list[_Cell | None] = [None] * n
        for idx, part in zip(_chunks(n, workers * 4), parts):
            for i, c in zip(idx, part):
                cells[i] = c
        return cells  # type: ignore[return-value]
    out: list[_Cell] = []
    for i, img in enumerate(_iter_images(images, n)):
        if i >= n:
            raise GroupingError(f"more images than labels ({n}); pass one label per image")
        out.append(_cell(_checked(img, i)))
    if len(out) != n:
        raise GroupingError(f"{len(out)} images but {n} labels; pass one label per image")
    return out


def _group_class(cls: str) -> dict[int, tuple[str, float, float]]:
    """Leader clustering of one class (rows of ``_FORK['cells']``): row -> (id, conf, score)."""
    cells, labels = _FORK["cells"], _FORK["labels"]
    min_score, merge_score, top = _FORK["params"]
    idx = [i for i, c in enumerate(labels) if c == cls]
    idx.sort(key=lambda i: -cells[i].quality)
    refs = _Refs()
    leader_of: list[int] = []  # leader (ref index) -> row
    parent: list[int] = []  # union-find over leaders
    group: dict[int, int] = {}
    conf: dict[int, float] = {}
    score: dict[int, float] = {}

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for i in idx:
        cand = _candidates(cells[i], refs, top, 0.4)
        if cand and cand[0][1] >= min_score:
            j, v = cand[0]
            group[i] = j
            rest = [w for k, w in cand[1:] if find(k) != find(j)]
            score[i], conf[i] = v, min(max(v - max(max(rest, default=0.0), 0.0), 0.0), 1.0)
            for k, w in cand[1:]:  # verifies with two leaders: one group split in two
                if w >= merge_score:
                    parent[find(k)] = find(j)
        else:
            group[i] = len(refs)
            leader_of.append(i)
            parent.append(len(parent))
            refs.add(cells[i], str(i))
            score[i], conf[i] = 1.0, 1.0
    # leaders that verify against each other: a group split in two
    pairs = []
    for j in range(len(refs)):
        for k, v in _candidates(refs.cells[j], refs, top + 1, 0.4):
            if k != j:
                pairs.append((v, j, k))
                if v >= merge_score:
                    parent[find(k)] = find(j)
    # a small group (<= SMALL_GROUP crops) whose leader verifies with another group at the
    # join threshold joins it: a wrong join then costs a few crops, like a wrong single join
    size = Counter(find(group[i]) for i in idx)
    for v, j, k in sorted(pairs, reverse=True):
        a, b = find(j), find(k)
        if v < min_score or a == b or min(size[a], size[b]) > SMALL_GROUP:
            continue
        small, big = (a, b) if size[a] <= size[b] else (b, a)
        parent[small] = big
        size[big] += size.pop(small)
    roots = sorted({find(j) for j in range(len(refs))}, key=lambda r: leader_of[r])
    name = {r: f"{cls}/g{n}" for n, r in enumerate(roots)}
    return {i: (name[find(group[i])], round(conf[i], 4), round(score[i], 4)) for i in idx}


def group_crops(
    images: ImageSource,
    labels: Sequence[str],
    *,
    min_score: float = GROUP_MIN_SCORE,
    merge_score: float = MERGE_SCORE,
    top: int = TOP_CANDIDATES,
    workers: int = 1,
) -> Grouping:
    """Group near-duplicate crops (same source cell) within each class.

    ``images``: PIL images, an iterable of them, or ``f(i) -> image`` (loaded one at a time;
    only a half-resolution copy of each is kept). Crops are taken best-first (whole nucleus,
    central, few black corners); each joins the group whose leader verifies best at or
    above ``min_score``, or leads a new group; a crop that verifies with two groups at
    ``merge_score`` joins them, and so do leaders that verify with each other. Every crop
    gets a source id (``CLASS/g<k>``); a crop that fits no group is a group of one
    (``singletons`` in the report). ``workers`` > 1 forks processes (indexable ``images``
    only for the loading; classes run in parallel).
    """
    labels = [str(c) for c in labels]
    cells = _prepare(images, labels, workers)
    classes = sorted(set(labels), key=lambda c: -labels.count(c))
    _FORK.update(cells=cells, labels=labels, params=(min_score, merge_score, top))
    try:
        parts = _pool_map(_group_class, classes, workers)
    finally:
        _FORK.clear()
    rows = {i: r for part in parts for i, r in part.items()}
    return Grouping(
        source_id=[rows[i][0] for i in range(len(labels))],
        confidence=[rows[i][1] for i in range(len(labels))],
        labels=labels,
        method="group_crops",
        score=[rows[i][2] for i in range(len(labels))],
        params={"min_score": min_score, "merge_score": merge_score, "top": top},
    )


@dataclass
class Slide:
    """One white cell of a slide: the slide id, its classes and the analysed picture."""

    slide_id: str
    classes: list[str]
    cell: _Cell


def load_slides(slides_dir: str | Path, scale: float = 0.5) -> list[Slide]:
    """The labelled white cells of a VOC slide folder (JPEGImages, Annotations, labels.csv).

    Each slide is resized by ``scale`` (0.5: the blood-cells crops are 320x240 views of
    640x480 slides) and anchored on the nucleus inside each ``WBC`` box (the stain peak of
    the whole slide when it has none).
    """
    root = Path(slides_dir)
    lab_path = root / "labels.csv"
    if not (root / "JPEGImages").is_dir() or not lab_path.is_file():
        raise SlidesMismatchError(
            f"{root} is not a VOC slide folder: it needs JPEGImages/ and labels.csv "
            "(and Annotations/ for the WBC boxes); pass the BCCD folder"
        )
    labels = read_labels_csv(lab_path.read_bytes())
    out: list[Slide] = []
    for jpg in sorted((root / "JPEGImages").glob("*.jp*g")):
        digits = "".join(ch for ch in jpg.stem if ch.isdigit())
        classes = labels.get(int(digits), []) if digits else []
        if not classes:
            continue
        img = Image.open(jpg).convert("RGB")
        w, h = img.size
        img = img.resize((max(round(w * scale), 1), max(round(h * scale), 1)), Image.BILINEAR)
        boxes = []
        xml = root / "Annotations" / f"{jpg.stem}.xml"
        if xml.is_file():
            _, bs = parse_voc(xml.read_bytes())
            boxes = [b for b in bs if b.name.upper() == "WBC"]
        f = scale / 2  # slide px -> half-res analysis px
        for b in boxes or [None]:
            box = None if b is None else (b.xmin * f, b.ymin * f, b.xmax * f, b.ymax * f)
            out.append(Slide(jpg.stem, classes, _cell(img, box)))
    return out


def _merge_duplicate_slides(refs: _Refs, min_score: float) -> list[str]:
    """Source ids of ``refs``: slides that verify with each other (two shots of one cell,
    as BCCD has) share one id, ``"A+B"``, so their crops are one source, not a tie."""
    parent = list(range(len(refs)))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for j in range(len(refs)):
        for k, v in _candidates(refs.cells[j], refs, TOP_CANDIDATES + 1, 0.3):
            if refs.ids[k] != refs.ids[j] and v >= min_score:
                parent[find(k)] = find(j)
    members: dict[int, set[str]] = {}
    for j in range(len(refs)):
        members.setdefault(find(j), set()).add(refs.ids[j])
    return ["+".join(sorted(members[find(j)])) for j in range(len(refs))]


def _match_one(cell: _Cell, refs: _Refs, min_score: float, min_margin: float, top: int):
    cand = _candidates(cell, refs, top, 0.6)
    best_j, best = cand[0]
    others = [v for j, v in cand[1:] if refs.ids[j] != refs.ids[best_j]]
    margin = min(max(best - max(max(others, default=0.0), 0.0), 0.0), 1.0)
    ok = best >= min_score and margin >= min_margin
    return (refs.ids[best_j] if ok else None), round(margin, 4), round(best, 4)


def _match_chunk(idx: list[int]) -> list[tuple]:
    refs_by_class, labels, params = _FORK["refs"], _FORK["labels"], _FORK["params"]
    return [
        _match_one(_cell(_get(_FORK["images"], i)), refs_by_class[labels[i]], *params) for i in idx
    ]


def match_to_slides(
    images: ImageSource,
    labels: Sequence[str],
    slides_dir: str | Path | Sequence[Slide],
    *,
    min_score: float = MIN_SCORE,
    min_margin: float = MIN_MARGIN,
    top: int = TOP_CANDIDATES,
    workers: int = 1,
) -> Grouping:
    """Name the slide each crop was cut from (source id = slide id, e.g. BloodImage_00012).

    Only slides whose ``labels.csv`` class includes the crop's class are candidates. Slides
    that show the same cell (they verify with each other at ``min_score``) share one source
    id, ``"BloodImage_00037+BloodImage_00038"`` (listed in ``params["duplicate_slides"]``).
    ``score`` is the best verification score, ``confidence`` its margin over the next other
    slide; a crop with score < ``min_score`` or margin < ``min_margin`` stays unassigned
    (None). Raises ``SlidesMismatchError`` when a class has no slide, or when almost no
    crop matches any slide (the wrong slide folder). ``workers`` > 1 forks processes
    (indexable ``images`` only).
    """
    labels = [str(c) for c in labels]
    slides = load_slides(slides_dir) if isinstance(slides_dir, (str, Path)) else list(slides_dir)
    if not slides:
        raise SlidesMismatchError(f"no labelled slide in {slides_dir}; pass the BCCD folder")
    missing = sorted(set(labels) - {c for s in slides for c in s.classes})
    if missing:
        raise SlidesMismatchError(
            f"no slide is labelled {', '.join(missing)}; these crops cannot be matched. Pass "
            "slides covering every class, or use group_crops for them"
        )
    refs_by_class: dict[str, _Refs] = {}
    duplicates: set[str] = set()
    for cls in sorted(set(labels)):
        refs = _Refs()
        for s in slides:
            if cls in s.classes:
                refs.add(s.cell, s.slide_id)
        refs.ids = _merge_duplicate_slides(refs, min_score)
        duplicates |= {i for i in refs.ids if "+" in i}
        refs.matrix()
        refs_by_class[cls] = refs
    n = len(labels)
    params = (min_score, min_margin, top)
    rows: list[tuple] = []
    if workers > 1 and _indexable(images):
        if isinstance(images, Sequence) and len(images) != n:
            raise GroupingError(f"{len(images)} images but {n} labels; pass one label per image")
        jobs = [list(range(j, min(j + 64, n))) for j in range(0, n, 64)]
        _FORK.update(images=images, refs=refs_by_class, labels=labels, params=params)
        try:
            rows = [r for part in _pool_map(_match_chunk, jobs, workers) for r in part]
        finally:
            _FORK.clear()
    else:
        for i, img in enumerate(_iter_images(images, n)):
            if i >= n:
                raise GroupingError(f"more images than labels ({n}); pass one label per image")
            rows.append(_match_one(_cell(_checked(img, i)), refs_by_class[labels[i]], *params))
        if len(rows) != n:
            raise GroupingError(f"{len(rows)} images but {n} labels; pass one label per image")
    source = [r[0] for r in rows]
    g = Grouping(
        source_id=source,
        confidence=[r[1] for r in rows],
        labels=labels,
        method="match_to_slides",
        score=[r[2] for r in rows],
        params={
            "min_score": min_score,
            "min_margin": min_margin,
            "top": top,
            "duplicate_slides": sorted(duplicates),
        },
    )
    assigned = sum(s is not None for s in source)
    if n >= 20 and assigned < MIN_ASSIGNED * n:
        raise SlidesMismatchError(
            f"only {assigned} of {n} crops match a slide: these slides are not the ones the "
            "crops were cut from (or the crops are not 320x240 views at half the slide scale). "
            "Pass the right slide folder, or use group_crops"
        )
    return g


# ---------------------------------------------------------------------------------------
# Known-truth data: augmented views of real cells (tests, calibration, benchmark).


def slide_view(
    slide: Image.Image,
    center: tuple[float, float],
    *,
    angle: float = 0.0,
    flip: bool = False,
    shift: tuple[float, float] = (0.0, 0.0),
    zoom: float | tuple[float, float] = 1.0,
    scale: float = 0.5,
    size: tuple[int, int] = (320, 240),
) -> Image.Image:
    """A ``size`` view of ``slide`` at ``scale``, the cell at ``center`` (slide px) moved to
    the view's centre plus ``shift``, mirrored (``flip``), rotated by ``angle`` degrees and
    magnified by ``zoom`` (one factor, or (x, y) factors: anisotropic); what falls off the
    slide is black, as in the blood-cells crops."""
    w, h = size
    zx, zy = (zoom, zoom) if isinstance(zoom, (int, float)) else zoom
    t = math.radians(angle)
    cs, sn = math.cos(t), math.sin(t)
    fx = -1.0 if flip else 1.0
    # slide = center + R(t) * F * Z^-1 * (view - view_centre - shift) / scale
    kx, ky = fx / (scale * zx), 1.0 / (scale * zy)
    a, b = cs * kx, -sn * ky
    d, e = sn * kx, cs * ky
    ox, oy = w / 2 + shift[0], h / 2 + shift[1]
    c0 = center[0] - a * ox - b * oy
    f0 = center[1] - d * ox - e * oy
    return slide.transform(size, Image.AFFINE, (a, b, c0, d, e, f0), Image.BILINEAR, fillcolor=0)


def synthetic_copies(
    slide: Image.Image,
    center: tuple[float, float],
    n: int,
    rng: np.random.Generator,
    *,
    max_shift: float = 40.0,
    zoom_range: tuple[float, float] = (0.92, 1.08),
    anisotropy: float = 0.04,
    jpeg_quality: tuple[int, int] = (60, 95),
    max_blur: float = 1.2,
) -> list[Image.Image]:
    """``n`` augmented copies of the cell at ``center``: every other one black-cornered
    (any angle, flip, shift, zoom), the rest the project's own reflection-filled
    ``augment.apply`` of a shifted, zoomed view; all mildly blurred and JPEG re-encoded."""
    import io

    from cellmodel.data.augment import Aug, apply

    out = []
    for i in range(n):
        angle = float(rng.uniform(0, 360))
        flip = bool(rng.integers(2))
        shift = (
            float(rng.uniform(-max_shift, max_shift)),
            float(rng.uniform(-max_shift, max_shift)) * 0.75,
        )
        z = float(np.exp(rng.uniform(np.log(zoom_range[0]), np.log(zoom_range[1]))))
        stretch = float(np.exp(rng.uniform(-anisotropy, anisotropy)))
        zoom = (z * stretch, z / stretch)
        if i % 2 == 0:
            img = slide_view(slide, center, angle=angle, flip=flip, shift=shift, zoom=zoom)
        else:
            img = apply(slide_view(slide, center, shift=shift, zoom=zoom), Aug(angle, flip))
        blur = float(rng.uniform(0, max_blur))
        if blur > 0.05:  # resampling softness of a real pipeline
            img = img.filter(ImageFilter.GaussianBlur(blur))
        buf = io.BytesIO()
        img.save(
            buf, format="JPEG", quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
        )
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
