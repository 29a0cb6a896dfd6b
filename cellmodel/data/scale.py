"""Pixel scale of blood-smear images, measured from the images themselves.

Red cells are the ruler: in normal blood they are discs of about 7-8 micrometres,
nearly all alike, and every field has dozens of them. So the median red-cell diameter
in pixels tells how many pixels a micrometre covers in a data set (microscope, camera,
resizing), and the ratio of two data sets' diameters is the factor by which one must be
resized to look like the other.

How one image is measured (:func:`estimate_rbc_diameter`), numpy + PIL only:

1. the image is reduced to about ``work_width`` pixels wide (speed; the result is given
   in the input's pixels);
2. cells are darker than the background in the green channel: Otsu's threshold on the
   green channel (black corners of rotated crops left out) gives the cell mask;
3. white cells (blue much above green, see ``cellmodel.infer.finder``) are removed, the
   mask is opened to cut thin contacts, and holes (the pale centres of red cells) are
   filled;
4. the distance transform of the mask peaks at the centre of each disc with the disc's
   radius, also where discs touch each other. Clumps, overlaps and pale centres open to
   the outside give smaller peaks; whole, well-formed discs give the largest ones. So the
   90th percentile of the peak heights, doubled, is the diameter (on BCCD slides and on
   the blood-cells crops its spread between images is the smallest of the statistics
   tried: median, 75th and 90th percentiles).

:func:`estimate_dataset_scale` does this over a sample of images and reports the median
and spread.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from cellmodel.infer.finder import (
    _morph,
    distance_transform,
    fill_holes,
    label_components,
    otsu_threshold,
)


def rbc_mask(img: Image.Image, work_width: int = 320) -> tuple[np.ndarray, float]:
    """``(mask of red cells at working scale, scale factor input px / working px)``."""
    img = img.convert("RGB")
    w, h = img.size
    f = max(1.0, w / work_width)
    if f > 1.0:
        img = img.resize((max(1, round(w / f)), max(1, round(h / f))), Image.BOX)
    a = np.asarray(img, dtype=np.float32)
    g = a[..., 1]
    valid = a.sum(-1) > 60  # black corners of rotated training crops are not background
    if valid.sum() < 100:
        return np.zeros(g.shape, bool), f
    thr = otsu_threshold(g[valid])
    cells = (g < thr) & valid
    stain = a[..., 2] - a[..., 1]
    top = float(np.percentile(stain[valid], 99.5))
    wbc = stain > max(20.0, 0.5 * top)
    wbc = _morph(wbc, 5, "dilate")
    mask = cells & ~wbc
    mask = _morph(_morph(mask, 3, "erode"), 3, "dilate")
    return fill_holes(mask), f


def rbc_radii(img: Image.Image, work_width: int = 320, min_radius: float = 3.0) -> np.ndarray:
    """The radius (input pixels) of each red cell found: one per distance-transform peak."""
    mask, f = rbc_mask(img, work_width)
    if not mask.any():
        return np.zeros(0)
    dist = distance_transform(mask)
    mx = np.asarray(Image.fromarray(dist).filter(ImageFilter.MaxFilter(5)))
    peaks = (dist >= mx) & (dist >= min_radius)
    if not peaks.any():
        return np.zeros(0)
    # A plateau of equal maxima is one peak: one pixel per connected group of peak pixels.
    labels, n = label_components(peaks)
    ys, xs = np.nonzero(peaks)
    first = np.full(n + 1, -1)
    first[labels[ys, xs][::-1]] = np.arange(len(ys))[::-1]
    sel = first[1:][first[1:] >= 0]
    py, px = ys[sel].astype(np.float64), xs[sel].astype(np.float64)
    # The erosion-based distance is octagonal (up to ~10 % short on a disc): measure each
    # peak's exact Euclidean distance to the nearest background pixel instead.
    padded = np.pad(mask, 1)
    edge = ~padded & _morph(padded, 3, "dilate")
    by, bx = np.nonzero(edge)
    by, bx = by.astype(np.float64) - 1, bx.astype(np.float64) - 1
    radii = np.empty(len(py))
    for i0 in range(0, len(py), 64):
        dy = py[i0 : i0 + 64, None] - by[None, :]
        dx = px[i0 : i0 + 64, None] - bx[None, :]
        radii[i0 : i0 + 64] = np.sqrt((dy * dy + dx * dx).min(axis=1))
    return radii * f


def estimate_rbc_diameter(
    img: Image.Image, work_width: int = 320, min_cells: int = 5, quantile: float = 0.9
) -> float | None:
    """Red-cell diameter of one image, in its own pixels; None with too few red cells.

    ``2 x`` the ``quantile`` of the distance-peak heights (see the module docstring). The
    distance transform counts a disc's centre pixel as ``radius`` steps from outside, so
    the diameter is ``2 * radius - 1`` pixels at working scale.
    """
    r = rbc_radii(img, work_width)
    if len(r) < min_cells:
        return None
    f = max(1.0, img.size[0] / work_width)
    return float(2 * np.quantile(r, quantile) - f)


def estimate_dataset_scale(
    images, n: int = 200, seed: int = 0, work_width: int = 320, load=None
) -> dict:
    """Red-cell diameter over a random sample of ``n`` images of a data set.

    ``images``: a list of paths, URIs or PIL images; ``load`` turns one item into a PIL
    image (default: PIL images as they are, anything else opened as a local path or URI).
    Returns the median of the per-image medians (``rbc_diameter_px``) with its spread
    (10th/25th/75th/90th percentiles) and how many images gave an estimate.
    """
    items = list(images)
    rng = np.random.default_rng(seed)
    if len(items) > n:
        items = [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]
    load = load or _load
    values = []
    for it in items:
        d = estimate_rbc_diameter(load(it), work_width)
        if d is not None:
            values.append(d)
    v = np.asarray(values)
    out = {"images": len(items), "measured": len(v)}
    if len(v):
        p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
        out |= {
            "rbc_diameter_px": round(float(p50), 2),
            "p10": round(float(p10), 2),
            "p25": round(float(p25), 2),
            "p75": round(float(p75), 2),
            "p90": round(float(p90), 2),
        }
    else:
        out["rbc_diameter_px"] = None
    return out


def _load(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    from cellmodel import storage
    from cellmodel.data.transforms import decode_image

    return decode_image(storage.read_bytes(str(item)))


def crop_window(
    crop_size: tuple[int, int], slide_rbc_px: float | None, train_rbc_px: float | None
) -> tuple[int, int]:
    """The slide window that shows what a training crop of ``crop_size`` shows.

    ``crop_size x slide_rbc_px / train_rbc_px``, rounded; ``crop_size`` itself when either
    diameter is unknown.
    """
    if not slide_rbc_px or not train_rbc_px or slide_rbc_px <= 0 or train_rbc_px <= 0:
        return tuple(crop_size)
    k = slide_rbc_px / train_rbc_px
    return max(1, round(crop_size[0] * k)), max(1, round(crop_size[1] * k))


def main(argv: list[str] | None = None) -> int:
    """``python -m cellmodel.data.scale FOLDER [FOLDER ...] [--n N]``: red-cell diameters."""
    import argparse
    import json

    from cellmodel import storage

    ap = argparse.ArgumentParser(prog="python -m cellmodel.data.scale", description=main.__doc__)
    ap.add_argument("folders", nargs="+", help="folders or URIs of images (searched recursively)")
    ap.add_argument("--n", type=int, default=200, help="images sampled per folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = {}
    for folder in args.folders:
        fs, root = storage.get_fs(folder)
        proto = folder.split("://", 1)[0] + "://" if storage.is_remote(folder) else ""
        files = sorted(
            proto + p for p in fs.find(root) if p.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        out[folder] = estimate_dataset_scale(files, n=args.n, seed=args.seed)
    names = list(out)
    if len(names) == 2 and all(out[k].get("rbc_diameter_px") for k in names):
        out["ratio"] = round(out[names[1]]["rbc_diameter_px"] / out[names[0]]["rbc_diameter_px"], 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
