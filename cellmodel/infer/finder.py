"""Find white cells on a stained blood-smear slide, without annotations.

White-cell nuclei take the stain dark purple: much more blue than green. Red cells are
pink (blue close to green) and the background is pale. So the finder:

1. works on a downsampled copy (nuclei are large; speed matters on big archives);
2. scores each pixel by ``blue - green`` and thresholds it per slide, relative to the
   slide's own stain: Otsu on the stained tail, clamped between a fraction of the slide's
   strongest stain (``rel_floor`` x its 99.5th percentile, so a pale slide gets a low
   threshold and a dark one a high one) and ``max_threshold``, never below the absolute
   ``min_threshold`` (so a slide without stain stays empty);
3. opens the mask (drops specks and platelet fragments) and dilates it by ``merge_size``
   so that the lobes of one multi-lobed neutrophil nucleus join into one blob;
4. splits blobs that hold several cells: the distance transform of a blob has one peak
   per cell; two peaks are two cells when the valley between them is at least
   ``split_depth`` deep (a watershed with h-maxima markers) and they are at least
   ``split_min_dist`` apart; each pixel then goes to its nearest peak. A blob with one
   peak is cut at its narrowest cross-section when it is elongated, but only when each
   side then holds a whole cell's nucleus (``split_part_area``), not one neutrophil lobe.
   Optionally (``split_neck``, off by default), a split that leaves a part with less than
   a whole cell's nucleus must also cut the pale cell body at a waist;
5. keeps cells whose nucleus area is large enough (platelets are small) and whose
   nucleus is not larger than one cell can be;
6. fits a box to the cell's own extent: the nucleus box grown by a margin that depends on
   how much of its box the nucleus fills (a round lymphocyte nucleus fills its box and
   has a thin rim of cytoplasm; a lobed neutrophil nucleus leaves gaps and has a wide
   one), clipped to the slide;
7. scores each box from the nucleus area and stain strength, in [0, 1].

Steps 1-5 give :class:`Nucleus` candidates (:func:`find_nuclei`), step 6-7 turn them
into :class:`Detection` boxes (:func:`boxes_from_nuclei`), so that cross-validation can
tune the box settings without redoing the pixel work (``cellmodel.infer.finder_eval``).

Only numpy and PIL are used: no scipy, no OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field, model_validator

from cellmodel.config import Section

# Settings that change the pixel stage (find_nuclei); the others only change boxes/scores.
PIXEL_SETTINGS = (
    "downsample",
    "min_threshold",
    "rel_floor",
    "max_threshold",
    "open_size",
    "merge_size",
    "cell_level",
    "split_depth",
    "split_min_dist",
    "split_min_area",
    "split_elongation",
    "split_length",
    "split_part_area",
    "split_oversize",
    "split_neck",
    "split_neck_where",
    "split_neck_area",
    "cyto_level",
)


class FinderConfig(Section):
    """Tuning of the white-cell finder; defaults chosen by cross-validation on BCCD.

    The ``[finder]`` section of the slide job's settings (``SlidesConfig.finder``).
    Lengths are in full-resolution slide pixels unless said otherwise.
    """

    # "stain": the rules below (no weights needed); "learned": the centre-heat-map network of
    # cellmodel.infer.learned_finder, whose weights file (a path or s3:// URI written by
    # `python -m jobs.train_finder`) is `weights`; only min_score applies to it then.
    method: Literal["stain", "learned"] = "stain"
    weights: str | None = None
    downsample: int = Field(4, ge=1)  # work at 1/4 resolution: a nucleus stays 15-25 px across
    min_threshold: float = Field(20.0, ge=0)  # absolute blue-green floor: below it, no nucleus
    rel_floor: float = Field(0.5, ge=0, le=1)  # threshold >= this x the 99.5th stain percentile
    max_threshold: float = Field(80.0, ge=0)  # cap on the per-slide threshold (dark slides)
    open_size: int = Field(3, ge=0)  # opening kernel (pixels at working scale): removes specks
    merge_size: int = Field(7, ge=0)  # closing (working-scale px) joining one nucleus' lobes
    cell_level: float = Field(0.4, gt=0)  # cytoplasm: smoothed stain above this x the threshold
    split_depth: float = Field(1.5, ge=0)  # working-scale px: a valley this deep parts two cells
    split_min_dist: float = Field(90.0, ge=0)  # two cells' peaks are at least this far apart
    split_min_area: float = Field(2000.0, ge=0)  # each part of a split blob holds this nucleus
    # A blob with one peak (overlapping cells leave no valley) is still cut in two at its
    # narrowest cross-section when it is this elongated (major / minor axis) and this long,
    # and each part then holds at least split_part_area of nucleus: a whole cell's nucleus,
    # not one lobe of a neutrophil (see _split_elongated).
    split_elongation: float = Field(1.5, ge=1)
    split_length: float = Field(200.0, ge=0)
    split_part_area: float = Field(3500.0, ge=0)
    # Optional, off by default (0): a split that leaves a part with less than a whole cell's
    # nucleus (split_neck_area: the smallest single-cell nucleus on BCCD holds about
    # 4,500 px) must also cut the cell body at a waist: on the pale body mask (smoothed
    # stain above cyto_level x the threshold), the body's half-width at the cut is at most
    # (1 - split_neck) x the smaller part's largest half-width. Two cells narrow where they
    # meet; a cut between two lobes of one nucleus runs through the middle of its cell (see
    # _neck). split_neck_where = "border" checks only blobs touching the slide border. It
    # mends lobe splits but also merges small lymphocytes beside big cells, and did not
    # lift every CV fold (BENCHMARKS.md, issue 13), so it is off.
    split_neck: float = Field(0.0, ge=0, lt=1)
    split_neck_where: Literal["border", "everywhere"] = "everywhere"
    split_neck_area: float = Field(4500.0, ge=0)
    cyto_level: float = Field(0.25, gt=0)
    # A nucleus part wider or higher than this is two cells side by side: it is cut across
    # its major axis where the nucleus is narrowest instead of being dropped whole by
    # max_cell_size (see _split_oversize); 0 = off.
    split_oversize: float = Field(260.0, ge=0)
    min_area: float = Field(2000.0, ge=0)  # nucleus area (px); platelets are smaller
    max_cell_size: float = Field(260.0, gt=0)  # a nucleus wider or higher is not one cell
    # Box side, per axis: cell_grow x whole-cell side + grow x nucleus side + margin
    # + margin_gap x (1 - fill), centred on the whole cell; fitted by least squares.
    cell_grow: float = 0.8186
    grow: float = 0.2732
    margin: float = 18.05  # px
    margin_gap: float = 9.22  # px per unit of its box the nucleus leaves empty (lobed nuclei)
    min_cell_size: float = Field(60.0, ge=0)  # the box is at least this wide/high
    min_score: float = Field(0.0, ge=0, le=1)  # boxes below this score are dropped
    # The red-cell diameter (px) of the slides the finder was made for: BCCD's median, 76.6
    # (the learned finder's training slides, the stain rules' tuning slides; a learned weights
    # file that records its own training slides' diameter overrides it). In the slide job, a
    # slide whose red cells measure more than `scale_tolerance` (a share) away from it is
    # resized to it before finding and the boxes are mapped back: a slide from a camera with
    # twice the pixels shows the finder cells of the size it knows. None (in Python; in a
    # TOML file, a high scale_tolerance): every slide found as it is.
    rbc_diameter_px: float | None = Field(76.6, gt=0)
    scale_tolerance: float = Field(0.2, ge=0)

    @model_validator(mode="after")
    def _weights_for_learned(self) -> FinderConfig:
        if self.method == "learned" and not self.weights:
            raise ValueError(
                "finder.method = 'learned' needs finder.weights: the path or s3:// URI of a "
                "file written by `python -m jobs.train_finder` (or use method = 'stain')"
            )
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


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


@dataclass(frozen=True)
class Nucleus:
    """One cell's nucleus (possibly several lobes), in full-resolution slide pixels."""

    x0: float
    y0: float
    x1: float
    y1: float
    area: float  # stained pixels
    fill: float  # area / box area, in (0, 1]
    stain: float  # mean blue - green over its pixels
    threshold: float  # the slide's threshold
    cell: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # whole-cell mask box


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


def slide_threshold(s: np.ndarray, cfg: FinderConfig) -> float:
    """The per-slide nucleus threshold on the stain map ``s`` (see the module docstring)."""
    top = float(np.percentile(s, 99.5))
    lo = max(cfg.min_threshold, cfg.rel_floor * top)
    hi = max(lo, cfg.max_threshold)
    # Otsu on the stained tail only: the whole image is dominated by pale background and
    # red cells, whose split would land far below the nuclei.
    tail = s[s > lo * 0.5]
    thr = otsu_threshold(tail) if tail.size > 50 else lo
    return float(np.clip(thr, lo, hi))


def _morph(mask: np.ndarray, size: int, op: str) -> np.ndarray:
    """Binary dilation or erosion by a ``size`` x ``size`` square (separable, numpy only).

    Pixels beyond the border count as background for a dilation and as foreground for an
    erosion (so an erosion does not eat cells at the border).
    """
    if size <= 1:
        return mask
    r0, r1 = (size - 1) // 2, size // 2
    dilate = op == "dilate"
    out = mask
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r0, r1)
        p = np.pad(out, pad, constant_values=not dilate)
        acc = p.take(range(0, n), axis=axis)
        for i in range(1, size):
            sl = p.take(range(i, i + n), axis=axis)
            acc = (acc | sl) if dilate else (acc & sl)
        out = acc
    return out


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Distance (in pixels, float32) of each mask pixel to the nearest pixel outside it.

    Repeated erosion, alternating the 4- and 8-neighbourhood, which approximates the
    Euclidean distance by an octagonal one (within about 8 %); 0 outside the mask.
    """
    m = np.pad(mask, 1)
    dist = np.zeros(m.shape, np.float32)
    step = 0
    while m.any():
        dist += m
        e = m.copy()
        e[1:, :] &= m[:-1, :]
        e[:-1, :] &= m[1:, :]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        if step % 2:
            e[1:, 1:] &= m[:-1, :-1]
            e[1:, :-1] &= m[:-1, 1:]
            e[:-1, 1:] &= m[1:, :-1]
            e[:-1, :-1] &= m[1:, 1:]
        m = e
        step += 1
    return dist[1:-1, 1:-1]


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
        # Pointer jumping: the pixel whose index equals my label knows a larger label;
        # follow those pointers until they stop changing (cheap gathers, few passes).
        for _ in range(32):
            jumped = np.maximum(flat, np.where(flat > 0, flat[np.maximum(flat - 1, 0)], 0))
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        lab = flat.reshape(h, w)
        if np.array_equal(lab, prev):
            break
    out = np.zeros((h, w), np.int64)
    if not mask.any():
        return out, 0
    uniq, inv = np.unique(lab[mask], return_inverse=True)
    out[mask] = inv + 1
    return out, len(uniq)


def _split_peaks(dist: np.ndarray, comp: np.ndarray, depth: float, min_dist: float) -> list:
    """The cell centres (y, x) of one blob: distance peaks separated by a deep valley.

    ``comp`` is the blob's mask and ``dist`` its distance map (working scale), both cut to
    the blob's bounding box. A watershed with h-maxima markers, in its simplest form:
    the highest peak is a cell; each next peak is another cell if it lies ``min_dist``
    from every cell so far and, at the level ``peak - depth``, is not connected to any of
    them (the valley between them is at least ``depth`` deep).
    """
    d = np.where(comp, dist, 0)
    mx = np.asarray(Image.fromarray(d).filter(ImageFilter.MaxFilter(5)))
    cand = (d >= mx) & (d >= depth + 1)
    ys, xs = np.nonzero(cand)
    if len(ys) == 0:
        yy, xx = np.unravel_index(int(np.argmax(d)), d.shape)
        return [(int(yy), int(xx))]
    order = np.argsort(-d[ys, xs], kind="stable")
    peaks: list[tuple[int, int]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        if any((y - py) ** 2 + (x - px) ** 2 < min_dist**2 for py, px in peaks):
            continue
        if peaks:
            level = d[y, x] - depth
            lab, _ = label_components(d > level)
            mine = lab[y, x]
            if any(lab[py, px] == mine for py, px in peaks):
                continue  # joined to a cell above the valley floor: a lobe, not a cell
        peaks.append((y, x))
    return peaks


def _box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1) x (2r+1) window (edges replicated), by cumulative sums."""
    if r <= 0:
        return a
    k = 2 * r + 1
    p = np.pad(a, r, mode="edge").astype(np.float64)
    c = np.cumsum(np.pad(p, ((1, 0), (0, 0))), axis=0)
    p = c[k:] - c[:-k]
    c = np.cumsum(np.pad(p, ((0, 0), (1, 0))), axis=1)
    return ((c[:, k:] - c[:, :-k]) / (k * k)).astype(np.float32)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the border filled.

    The background reachable from the border grows from the border pixels, one
    4-neighbour step at a time inside the background, until it stops growing.
    """
    bg = ~mask
    reach = np.zeros_like(bg)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = bg[0], bg[-1], bg[:, 0], bg[:, -1]
    n = int(reach.sum())
    while True:
        for _ in range(8):  # a few steps between the (costlier) convergence checks
            grown = reach.copy()
            grown[1:] |= reach[:-1]
            grown[:-1] |= reach[1:]
            grown[:, 1:] |= reach[:, :-1]
            grown[:, :-1] |= reach[:, 1:]
            reach = grown & bg
        m = int(reach.sum())
        if m == n:
            return ~reach
        n = m


def cell_masks(img: Image.Image, cfg: FinderConfig) -> tuple[np.ndarray, ...]:
    """Working-scale ``(stain, threshold, nucleus mask, whole-cell mask)`` of one slide.

    The whole-cell mask is the nucleus plus the weakly stained cytoplasm around it (smoothed
    stain above ``cell_level`` x the nucleus threshold), closed by ``merge_size`` (joins the
    lobes of one nucleus and its cytoplasm) and with holes filled; only its parts that hold
    a nucleus are kept.
    """
    ds = max(1, int(cfg.downsample))
    s = stain_map(img, ds)
    thr = slide_threshold(s, cfg)
    nucleus = s > thr
    nucleus = _morph(_morph(nucleus, cfg.open_size, "erode"), cfg.open_size, "dilate")
    if not nucleus.any():
        return s, thr, nucleus, nucleus
    cell = (_box_mean(s, 1) > cfg.cell_level * thr) | nucleus
    cell = _morph(_morph(cell, cfg.open_size, "erode"), cfg.open_size, "dilate") | nucleus
    cell = _morph(_morph(cell, cfg.merge_size, "dilate"), cfg.merge_size, "erode")
    cell = fill_holes(cell)
    return s, thr, nucleus, cell


def find_nuclei(img: Image.Image, cfg: FinderConfig | None = None) -> list[Nucleus]:
    """Steps 1-5: one :class:`Nucleus` per white cell candidate (no size filter yet)."""
    cfg = cfg or FinderConfig()
    ds = max(1, int(cfg.downsample))
    s, thr, nucleus, cell = cell_masks(img, cfg)
    if not nucleus.any():
        return []
    labels, n = label_components(cell)
    dist = distance_transform(cell)
    min_dist = cfg.split_min_dist / ds
    body = None  # distance map of the pale cell body, computed on the first split
    out = []
    for k, sl in enumerate(_bounding_slices(labels, n), start=1):
        comp = labels[sl] == k
        nuc = nucleus[sl] & comp
        if not nuc.any():
            continue
        peaks = _split_peaks(dist[sl], comp, cfg.split_depth, min_dist)
        owner = _assign(peaks, dist[sl], nuc, cfg.split_min_area / (ds * ds))
        if len(peaks) == 1:
            owner = _split_elongated(comp, nuc, cfg, ds)
        if cfg.split_neck > 0 and owner.max() > 0:
            small = cfg.split_neck_area / (ds * ds)
            h, w = labels.shape
            at_border = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w
            if (at_border or cfg.split_neck_where == "everywhere") and np.bincount(
                owner[nuc], minlength=int(owner.max()) + 1
            ).min() < small:
                if body is None:
                    body = cell_body(s, thr, cell, cfg)
                owner = _join_without_neck(owner, comp, nuc, body[sl], cfg.split_neck, small)
        if cfg.split_oversize > 0:
            owner = _split_oversize(owner, comp, nuc, cfg, ds)
        sv = s[sl]
        oy, ox = sl[0].start, sl[1].start
        for j in range(int(owner.max()) + 1):
            part = comp & (owner == j)
            m = nuc & part
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                continue
            cys, cxs = np.nonzero(part)
            area = float(len(ys)) * ds * ds
            x0, x1 = (xs.min() + ox) * ds, (xs.max() + 1 + ox) * ds
            y0, y1 = (ys.min() + oy) * ds, (ys.max() + 1 + oy) * ds
            out.append(
                Nucleus(
                    float(x0),
                    float(y0),
                    float(x1),
                    float(y1),
                    area=area,
                    fill=area / float((x1 - x0) * (y1 - y0)),
                    stain=float(sv[m].mean()),
                    threshold=thr,
                    cell=(
                        float((cxs.min() + ox) * ds),
                        float((cys.min() + oy) * ds),
                        float((cxs.max() + 1 + ox) * ds),
                        float((cys.max() + 1 + oy) * ds),
                    ),
                )
            )
    return out


def _assign(peaks: list, dist: np.ndarray, nuc: np.ndarray, min_px: float) -> np.ndarray:
    """Which peak each pixel belongs to (index into ``peaks``).

    Each pixel goes to its nearest peak, taller peaks reaching further (a power diagram:
    squared distance minus squared peak height). A part with less than ``min_px`` nucleus
    pixels is not a cell of its own (a lobe): its peak is dropped and the pixels reassigned.
    """
    peaks = list(peaks)
    yy, xx = np.mgrid[: dist.shape[0], : dist.shape[1]]
    while True:
        if len(peaks) == 1:
            return np.zeros(dist.shape, np.int32)
        cost = np.stack([(yy - py) ** 2 + (xx - px) ** 2 - dist[py, px] ** 2 for py, px in peaks])
        owner = np.argmin(cost, axis=0)
        sizes = np.bincount(owner[nuc], minlength=len(peaks))
        small = int(np.argmin(sizes))
        if sizes[small] >= min_px:
            return owner
        del peaks[small]


def _split_elongated(comp: np.ndarray, nuc: np.ndarray, cfg: FinderConfig, ds: int) -> np.ndarray:
    """0/1 per pixel: ``comp`` cut at its narrowest cross-section if it is two cells.

    Two overlapping cells make one blob with no valley between their distance peaks, but
    an elongated one (about 1.9 x as long as wide for discs overlapping by a fifth); a
    single cell is close to round. The cut is perpendicular to the major axis, where the
    blob is narrowest within its middle 60 %. Elongation alone is weak evidence: a lobed
    neutrophil, or a cell with a bulge of cytoplasm, is elongated too, and cutting it
    leaves one lobe on one side (2,200-2,600 px of nucleus on BCCD) where two cells leave
    a whole nucleus on each side (the smallest single-cell nucleus of the 278 BCCD slides
    holds about 4,500 px). So both parts must hold ``split_part_area`` of nucleus (and at
    least ``split_min_area``). All zeros when the blob is one cell.
    """
    zero = np.zeros(comp.shape, np.int32)
    ys, xs = np.nonzero(comp)
    if len(ys) < 20:
        return zero
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([ys - cy, xs - cx]))
    evals, evecs = np.linalg.eigh(cov)
    minor, major = max(evals[0], 1e-6), evals[1]
    if np.sqrt(major / minor) < cfg.split_elongation or 4 * np.sqrt(major) * ds < cfg.split_length:
        return zero
    owner = _narrowest_cut(comp, evecs[:, 1], cy, cx)
    if owner is None or not _whole_parts(owner, nuc, cfg, ds):
        return zero
    return owner


def _narrowest_cut(mask: np.ndarray, axis: np.ndarray, cy: float, cx: float) -> np.ndarray | None:
    """0/1 per pixel: ``mask`` cut perpendicular to ``axis`` (through ``cy, cx``) where it is
    narrowest within the middle 60 % of its length; None when it is too short to cut."""
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    t = (yy - cy) * axis[0] + (xx - cx) * axis[1]
    tb = np.round(t[mask]).astype(np.int64)
    lo, hi = tb.min(), tb.max()
    width = np.bincount(tb - lo, minlength=hi - lo + 1)
    a, b = int(0.2 * (hi - lo)), int(0.8 * (hi - lo))
    if b <= a:
        return None
    cut = lo + a + int(np.argmin(width[a : b + 1]))
    return (t > cut).astype(np.int32)


def _whole_parts(owner: np.ndarray, nuc: np.ndarray, cfg: FinderConfig, ds: int) -> bool:
    """Whether both sides of a 0/1 cut hold a whole cell's nucleus (``split_part_area``)."""
    min_px = max(cfg.split_min_area, cfg.split_part_area) / (ds * ds)
    return (nuc & (owner == 0)).sum() >= min_px and (nuc & (owner == 1)).sum() >= min_px


def _split_oversize(
    owner: np.ndarray, comp: np.ndarray, nuc: np.ndarray, cfg: FinderConfig, ds: int
) -> np.ndarray:
    """``owner`` with every part whose nucleus is wider or higher than ``split_oversize``
    cut in two across its nucleus' major axis, where the nucleus is narrowest.

    Two cells side by side whose nuclei touch make one part too big for one cell, which the
    size filter (``max_cell_size``) would drop whole, losing both cells. A side with less
    than a cell's nucleus (a pale cell's faint nucleus) is then dropped by ``min_area`` and
    the other side kept. At most two cuts per part the blob came in with.
    """
    limit = cfg.split_oversize / ds
    owner = owner.copy()
    todo = list(range(int(owner.max()) + 1))
    cuts, most = 0, 2 * len(todo)
    while todo and cuts < most:
        j = todo.pop()
        m = nuc & comp & (owner == j)
        ys, xs = np.nonzero(m)
        if len(ys) < 20 or max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) <= limit:
            continue
        cy, cx = ys.mean(), xs.mean()
        _, evecs = np.linalg.eigh(np.cov(np.stack([ys - cy, xs - cx])))
        part = comp & (owner == j)
        half = _narrowest_cut(m, evecs[:, 1], cy, cx)
        if half is None:
            continue
        new = int(owner.max()) + 1
        owner[part & (half == 1)] = new
        cuts += 1
        todo += [j, new]
    return owner


def cell_body(s: np.ndarray, thr: float, cell: np.ndarray, cfg: FinderConfig) -> np.ndarray:
    """Distance map of the pale cell body: the whole-cell mask plus the faint cytoplasm.

    The whole-cell mask (``cell_level``) misses a cytoplasm paler than that; the body is
    the smoothed stain above ``cyto_level`` x the threshold (red cells and background stay
    under it on BCCD), joined with the whole-cell mask, holes filled.
    """
    body = fill_holes((_box_mean(s, 1) > cfg.cyto_level * thr) | cell)
    return distance_transform(body)


def _neck(owner: np.ndarray, comp: np.ndarray, body: np.ndarray, i: int, j: int) -> float | None:
    """How much the cell body narrows where parts ``i`` and ``j`` meet (None: they do not).

    1 - (largest body half-width on the cut) / (the smaller of the two parts' largest
    half-widths): about 0.4 for two discs overlapping by a fifth, near 0 (or below) for a
    cut through the middle of one cell.
    """
    a = comp & (owner == i)
    b = comp & (owner == j)
    cut = np.zeros_like(comp)
    cut[1:] |= a[1:] & b[:-1]
    cut[:-1] |= a[:-1] & b[1:]
    cut[:, 1:] |= a[:, 1:] & b[:, :-1]
    cut[:, :-1] |= a[:, :-1] & b[:, 1:]
    if not cut.any():
        return None
    wide = min(float(body[a].max()), float(body[b].max()))
    return 1.0 - float(body[cut].max()) / max(wide, 1.0)


def _join_without_neck(
    owner: np.ndarray,
    comp: np.ndarray,
    nuc: np.ndarray,
    body: np.ndarray,
    neck: float,
    small_px: float,
) -> np.ndarray:
    """``owner`` with two touching parts joined where one is small and no neck parts them.

    A part holding under ``small_px`` nucleus pixels may be one lobe of its neighbour's
    nucleus; if the cut between them also runs where the cell body is wide (``_neck``
    under ``neck``), the two are one cell's lobes, and they are one cell again.
    """
    n = int(owner.max()) + 1
    nuc_px = np.bincount(owner[nuc & comp], minlength=n)
    root = list(range(n))

    def find(x: int) -> int:
        while root[x] != x:
            x = root[x]
        return x

    for i in range(n):
        for j in range(i + 1, n):
            if min(nuc_px[i], nuc_px[j]) >= small_px:
                continue  # two whole nuclei: two cells, whatever the body's shape
            v = _neck(owner, comp, body, i, j)
            if v is not None and v < neck:
                root[find(j)] = find(i)
    if all(root[i] == i for i in range(n)):
        return owner
    _, new = np.unique([find(i) for i in range(n)], return_inverse=True)
    return new.astype(np.int32)[owner]


def _bounding_slices(labels: np.ndarray, n: int) -> list[tuple[slice, slice]]:
    """The bounding box of each label 1..n as a pair of slices."""
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    y0 = np.full(n + 1, labels.shape[0])
    x0 = np.full(n + 1, labels.shape[1])
    y1 = np.zeros(n + 1, np.int64)
    x1 = np.zeros(n + 1, np.int64)
    np.minimum.at(y0, lab, ys)
    np.minimum.at(x0, lab, xs)
    np.maximum.at(y1, lab, ys)
    np.maximum.at(x1, lab, xs)
    return [(slice(y0[k], y1[k] + 1), slice(x0[k], x1[k] + 1)) for k in range(1, n + 1)]


def boxes_from_nuclei(
    nuclei: list[Nucleus], size: tuple[int, int], cfg: FinderConfig | None = None
) -> list[Detection]:
    """Steps 5-7: filter nuclei by size and grow each to its cell's box; best score first."""
    cfg = cfg or FinderConfig()
    iw, ih = size
    dets = []
    for n in nuclei:
        nw, nh = n.x1 - n.x0, n.y1 - n.y0
        if n.area < cfg.min_area or max(nw, nh) > cfg.max_cell_size:
            continue
        c = n.cell if n.cell[2] > n.cell[0] else (n.x0, n.y0, n.x1, n.y1)
        cx, cy = (c[0] + c[2]) / 2, (c[1] + c[3]) / 2
        margin = cfg.margin + cfg.margin_gap * (1.0 - min(1.0, n.fill))
        bw = max(cfg.min_cell_size, cfg.cell_grow * (c[2] - c[0]) + cfg.grow * nw + margin)
        bh = max(cfg.min_cell_size, cfg.cell_grow * (c[3] - c[1]) + cfg.grow * nh + margin)
        box = (
            max(0.0, cx - bw / 2),
            max(0.0, cy - bh / 2),
            min(float(iw), cx + bw / 2),
            min(float(ih), cy + bh / 2),
        )
        # Large, strongly stained nuclei are surely white cells; small faint ones are doubtful.
        size_term = min(1.0, n.area / (3 * cfg.min_area))
        stain_term = min(1.0, max(0.0, (n.stain - n.threshold) / 40.0 + 0.5))
        score = round(float(0.5 * size_term + 0.5 * stain_term), 4)
        if score >= cfg.min_score:
            dets.append(Detection(*box, score=score, nucleus_area=n.area))
    dets.sort(key=lambda d: -d.score)
    return dets


def find_cells(img: Image.Image, cfg: FinderConfig | None = None) -> list[Detection]:
    """White cells on one RGB slide image, best score first."""
    cfg = cfg or FinderConfig()
    if cfg.method == "learned":
        from cellmodel.infer.learned_finder import detect, load_cached

        model, lcfg = load_cached(str(cfg.weights))
        return [d for d in detect(model, [img], lcfg)[0] if d.score >= cfg.min_score]
    return boxes_from_nuclei(find_nuclei(img, cfg), img.size, cfg)


def find_cells_at_scale(
    img: Image.Image,
    cfg: FinderConfig,
    slide_rbc_px: float | None,
    finder_rbc_px: float | None,
) -> tuple[list[Detection], float]:
    """:func:`find_cells` on ``img`` resized so that its red cells (``slide_rbc_px``
    across) look as on the slides the finder was made for (``finder_rbc_px``), boxes mapped
    back to ``img``'s pixels; ``img`` as is when either is unknown or they differ by no more
    than ``cfg.scale_tolerance``. Returns the detections and the factor used (1.0: as is)."""
    if not slide_rbc_px or not finder_rbc_px:
        return find_cells(img, cfg), 1.0
    f = finder_rbc_px / slide_rbc_px
    if abs(f - 1.0) <= cfg.scale_tolerance:
        return find_cells(img, cfg), 1.0
    w, h = img.size
    small = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    fx, fy = small.size[0] / w, small.size[1] / h
    dets = [
        Detection(
            d.xmin / fx,
            d.ymin / fy,
            min(float(w), d.xmax / fx),
            min(float(h), d.ymax / fy),
            d.score,
            d.nucleus_area / (fx * fy),
        )
        for d in find_cells(small, cfg)
    ]
    return dets, f


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


# A white cell is about round: of BCCD's single-cell slides, 99 % of the boxes clear of the
# frame have their short side at 0.68 or more of their long side. A box on the frame that is
# narrower than this holds the part of a cell the frame left.
CUT_ASPECT = 2 / 3


def cut_by_frame(
    box: tuple[float, float, float, float], size: tuple[int, int], margin: float = 2.0
) -> bool:
    """Whether ``box`` (in a ``size`` = (width, height) slide) is a cell the frame cut: it
    touches an edge and its short side is under :data:`CUT_ASPECT` of its long side."""
    x0, y0, x1, y1 = box
    w, h = size
    on_frame = x0 <= margin or y0 <= margin or x1 >= w - margin or y1 >= h - margin
    bw, bh = x1 - x0, y1 - y0
    return on_frame and min(bw, bh) < CUT_ASPECT * max(bw, bh)
