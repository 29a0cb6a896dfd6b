"""Illumination of blood-smear images: the background level, measured from the images.

The plasma between the cells is the white reference of a field: what the lamp, the
camera's exposure and the data set's processing made of "no stain". Two data sets of the
same stain differ mostly by that level, and a classifier reads the difference as stain:
the BCCD slides' windows are about 11 levels darker than the blood-cells crops cut from
the same slides, and a darker neutrophil looks eosinophilic to a model trained on the
crops (BENCHMARKS.md, "Slide illumination").

How one image is measured (:func:`background_rgb`): the brightest tenth of its pixels in
the green channel (the channel the stain darkens most; near-black corners of rotated
crops left out), and the per-channel median of those pixels. In a smear field of red
cells that tenth is plasma, whatever the white cell. :func:`estimate_dataset_background`
takes the median over a seeded sample of images, the figure a manifest and a checkpoint
record (``background_rgb``) and the slide job matches.

    python -m cellmodel.data.light data/shards/train-grouped        # a shard dataset
    python -m cellmodel.data.light ../shared/data/bccd/JPEGImages   # a folder of images
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image

# Pixels darker than this (sum of R, G, B) are the black corners of rotated crops.
BLACK = 30


def background_rgb(img: Image.Image, work_width: int = 320) -> np.ndarray | None:
    """Per-channel background level (float32 R, G, B) of one image; None when it holds
    no usable pixels (all black)."""
    img = img.convert("RGB")
    w, h = img.size
    if w > work_width:
        img = img.resize((work_width, max(1, round(h * work_width / w))), Image.BOX)
    a = np.asarray(img)
    ok = a.astype(np.int32).sum(-1) > BLACK
    if ok.sum() < 20:
        return None
    g = a[..., 1]
    top = ok & (g >= np.percentile(g[ok], 90))
    return np.median(a[top], axis=0).astype(np.float32)


def estimate_dataset_background(images, n: int = 64, seed: int = 0, load=None) -> dict:
    """Median background level over a seeded sample of up to ``n`` ``images`` (paths, URIs
    or PIL images; ``load`` turns one item into a PIL image). Returns ``background_rgb``
    (three floats, or None when no image could be measured) and ``background_images``."""
    from cellmodel.data.scale import _load

    items = list(images)
    rng = np.random.default_rng(seed)
    if len(items) > n:
        items = [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]
    load = load or _load
    got = [v for v in (background_rgb(load(it)) for it in items) if v is not None]
    if not got:
        return {"background_rgb": None, "background_images": 0}
    med = np.median(np.stack(got), axis=0)
    return {"background_rgb": [round(float(v), 1) for v in med], "background_images": len(got)}


def has_colour(img: Image.Image | np.ndarray, min_spread: float = 4.0) -> bool:
    """Whether an image holds colour: the 95th percentile of each pixel's channel spread
    (max - min of R, G, B) is at least ``min_spread``. A PIL image is measured on a 4x
    reduced copy, an (H, W, 3) array as it is. A grey image saved as RGB (or as a colour
    JPEG) measures 0-2; BCCD's stained slides measure 28-60, the blood-cells crops more."""
    if isinstance(img, Image.Image):
        img = img.convert("RGB").reduce(4)
    a = np.asarray(img, dtype=np.int16)
    if a.ndim != 3 or a.shape[2] < 3:
        return False
    spread = a[..., :3].max(axis=2) - a[..., :3].min(axis=2)
    return float(np.percentile(spread, 95)) >= min_spread


def is_blank(img: Image.Image | np.ndarray, max_range: float = 10.0) -> bool:
    """Whether an image is one flat level (an empty scan, a black or white frame): its grey
    levels span at most ``max_range`` between the 1st and 99th percentiles (measured as
    :func:`has_colour` measures). A slide with cells on it spans well over 100."""
    if isinstance(img, Image.Image):
        img = img.convert("L").reduce(4)
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2)
    lo, hi = np.percentile(a, (1, 99))
    return float(hi - lo) <= max_range


def light_offset(train_rgb, slide_rgb) -> np.ndarray:
    """What to add to a slide's pixels (per channel) so that its background matches the
    training data's: ``train_rgb - slide_rgb``."""
    return np.asarray(train_rgb, np.float32) - np.asarray(slide_rgb, np.float32)


def relight(a: np.ndarray, offset) -> np.ndarray:
    """uint8 HxWx3 image ``a`` shifted by ``offset`` per channel, clipped to 0-255."""
    if offset is None:
        return a
    out = a.astype(np.float32) + np.asarray(offset, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dataset_images(uri: str, n: int, seed: int) -> list:
    """Up to ``n`` images (encoded bytes) of a shard dataset's training split, or the paths
    of a local folder's images."""
    import io
    import os

    from cellmodel import storage

    if storage.exists(storage.join(uri, "manifest.json")):
        from cellmodel.data.dataset import iter_rows

        rows = [r["image"] for r in iter_rows(uri, "train", columns=["image"])]
        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(len(rows), min(n, len(rows)), replace=False))
        return [Image.open(io.BytesIO(rows[i])) for i in idx]
    exts = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    names = sorted(p for p in os.listdir(uri) if p.lower().endswith(exts))
    if not names:
        raise ValueError("no manifest.json and no images (.jpg, .png, ...) there")
    return [os.path.join(uri, p) for p in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cellmodel.data.light",
        description="Background level (R, G, B) of a shard dataset's training split or of "
        "a folder of images: the figure a checkpoint records and the slide job matches.",
    )
    p.add_argument("data", help="shard dataset (its train split) or a local folder of images")
    p.add_argument("--n", type=int, default=64, help="images sampled (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        images = dataset_images(args.data, args.n, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: cannot read images from {args.data}: {e}", file=sys.stderr)
        return 2
    out = estimate_dataset_background(images, n=args.n, seed=args.seed)
    print(json.dumps(out))
    return 0 if out["background_rgb"] else 1


if __name__ == "__main__":
    sys.exit(main())
