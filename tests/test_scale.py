"""Pixel scale from red cells (cellmodel.data.scale): synthetic discs and real images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cellmodel.data.scale import crop_window, estimate_dataset_scale, estimate_rbc_diameter


def discs(diameter: float, size=(640, 480), seed: int = 0) -> Image.Image:
    """Pink discs of one diameter (some touching) on a pale background, like red cells."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (225, 222, 215))
    d = ImageDraw.Draw(img)
    r = diameter / 2
    placed: list[tuple[float, float]] = []
    for _ in range(400):
        x, y = rng.uniform(r, size[0] - r), rng.uniform(r, size[1] - r)
        # Allow light contact (up to 10 % overlap), as in a smear.
        if all((x - px) ** 2 + (y - py) ** 2 >= (0.9 * diameter) ** 2 for px, py in placed):
            placed.append((x, y))
            d.ellipse((x - r, y - r, x + r, y + r), fill=(200, 120, 125))
            d.ellipse((x - r / 3, y - r / 3, x + r / 3, y + r / 3), fill=(212, 150, 150))
    return img


@pytest.mark.parametrize("diameter", [40, 80])
def test_diameter_of_synthetic_discs(diameter):
    est = estimate_rbc_diameter(discs(diameter))
    assert est == pytest.approx(diameter, rel=0.12)


def test_scale_ratio_survives_resizing():
    big = discs(80)
    small = big.resize((320, 240), Image.BILINEAR)
    ratio = estimate_rbc_diameter(big) / estimate_rbc_diameter(small)
    assert ratio == pytest.approx(2.0, rel=0.12)


def test_blank_and_tiny_images_give_none():
    assert estimate_rbc_diameter(Image.new("RGB", (640, 480), (225, 222, 215))) is None
    assert estimate_rbc_diameter(Image.new("RGB", (8, 8), (0, 0, 0))) is None


def test_real_slides_show_cells_larger_than_the_training_crops(sample_dir):
    """BCCD slides vs blood-cells crops: the crops are about half the slides' scale."""
    slides = sorted((sample_dir / "slides" / "JPEGImages").glob("*.jpg"))
    crops = sorted((sample_dir / "crops").glob("*/*.jpeg"))
    s = estimate_dataset_scale(slides, n=12, seed=0)
    c = estimate_dataset_scale(crops, n=24, seed=0)
    assert s["measured"] >= 10 and c["measured"] >= 20
    assert 60 < s["rbc_diameter_px"] < 100  # BCCD: 640x480 fields
    assert s["p25"] <= s["rbc_diameter_px"] <= s["p75"]
    assert 1.6 < s["rbc_diameter_px"] / c["rbc_diameter_px"] < 2.4


def test_crop_window():
    assert crop_window((320, 240), 76.0, 38.0) == (640, 480)
    assert crop_window((320, 240), 38.0, 38.0) == (320, 240)
    assert crop_window((320, 240), None, 38.0) == (320, 240)
    assert crop_window((320, 240), 76.0, None) == (320, 240)
