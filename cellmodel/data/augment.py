"""Offline augmentation as in the paper: rotations (and optional flips) only, plus balancing.

No scale or colour change: nucleus size and stain intensity are what tell the classes apart.
Rotating a rectangular crop uncovers its corners; they are filled by mirroring the crop
outwards, so they show plausible smear background instead of black wedges that a model
could learn as a feature.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(0, 360, 15))
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Aug:
    """One augmentation: mirror left-right first (if ``flip``), then rotate by ``angle``
    degrees counter-clockwise about the centre."""

    angle: float = 0.0
    flip: bool = False

    @property
    def identity(self) -> bool:
        return self.angle % 360 == 0 and not self.flip

    def to_dict(self) -> dict:
        return {"angle": float(self.angle), "flip": bool(self.flip)}


IDENTITY = Aug()


def apply(img: Image.Image, aug: Aug) -> Image.Image:
    """``img`` flipped and rotated per ``aug``, same size, corners filled by reflection."""
    if aug.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    angle = aug.angle % 360
    if angle == 0:
        return img
    w, h = img.size
    # Pad so that the rotated window's corners (within the circumscribed circle) land on
    # mirrored real pixels; "symmetric" repeats the edge row, so no seam shows.
    r = math.ceil(math.hypot(w, h) / 2) + 2
    px, py = max(r - w // 2, 0), max(r - h // 2, 0)
    a = np.asarray(img)
    while px or py:  # np.pad's symmetric mode needs pad <= size; repeat for larger pads
        sx, sy = min(px, a.shape[1]), min(py, a.shape[0])
        a = np.pad(a, ((sy, sy), (sx, sx), (0, 0)), mode="symmetric")
        px, py = px - sx, py - sy
    big = Image.fromarray(a)
    # Sample the output window straight from the padded image (one affine map from each
    # output pixel to its source) instead of rotating all of it and cropping: 3x faster.
    t = math.radians(angle)
    c, s = math.cos(t), math.sin(t)
    bx, by = big.size[0] / 2, big.size[1] / 2
    cx, cy = w / 2, h / 2
    coeffs = (c, -s, bx - c * cx + s * cy, s, c, by - s * cx - c * cy)
    return big.transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR)


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def variants(angles: Sequence[float] = DEFAULT_ANGLES, flips: bool = True) -> list[Aug]:
    """All non-identity augmentations from ``angles`` (and mirrored, with ``flips``)."""
    out = [Aug(float(a) % 360, f) for f in ((False, True) if flips else (False,)) for a in angles]
    seen: set[Aug] = set()
    uniq = []
    for v in out:
        if not v.identity and v not in seen:
            seen.add(v)
            uniq.append(v)
    return uniq


def plan_copies(
    n_items: int, target: int, choices: Sequence[Aug], rng: np.random.Generator
) -> list[list[Aug]]:
    """Augmentations for each of ``n_items`` originals so that a class has ``target`` rows.

    Every original is kept once as itself (never dropped, even above ``target``); the
    missing ``target - n_items`` copies are spread as evenly as possible over the
    originals, each drawing distinct augmentations from a seeded shuffle of ``choices``
    until they run out (then they repeat).
    """
    plans = [[IDENTITY] for _ in range(n_items)]
    extra = max(target - n_items, 0)
    if not n_items or not extra:
        return plans
    if not choices:
        raise ValueError(
            f"{extra} augmented copies are needed to reach {target} per class, but no "
            "augmentation is allowed (angles and flips give nothing but the identity)"
        )
    # Which originals get one copy more than the others is random but seeded.
    order = rng.permutation(n_items)
    base, rem = divmod(extra, n_items)
    for rank, i in enumerate(order):
        k = base + (1 if rank < rem else 0)
        perm = rng.permutation(len(choices))
        plans[i] += [choices[perm[j % len(choices)]] for j in range(k)]
    return plans
