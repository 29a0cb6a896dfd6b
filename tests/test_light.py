"""Background level of smear images (cellmodel.data.light) on the committed sample slides."""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cellmodel.data.light import (
    background_rgb,
    estimate_dataset_background,
    light_offset,
    main,
    relight,
)

SLIDES = Path(__file__).resolve().parents[1] / "data" / "sample" / "slides" / "JPEGImages"


def _field(bg=(205, 210, 195), black_corners=False) -> Image.Image:
    """A plain field of the given background with darker red-cell discs (a third of it)."""
    img = Image.new("RGB", (320, 240), bg)
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 1, (40, 2)) * (320, 240):
        d.ellipse((x - 14, y - 14, x + 14, y + 14), fill=(190, 120, 130))
    if black_corners:
        d.polygon([(0, 0), (120, 0), (0, 90)], fill=(0, 0, 0))
        d.polygon([(320, 240), (200, 240), (320, 150)], fill=(0, 0, 0))
    return img


def test_background_is_the_plasma_not_the_cells_nor_black_corners():
    assert background_rgb(_field()).tolist() == [205, 210, 195]
    assert background_rgb(_field(black_corners=True)).tolist() == [205, 210, 195]
    assert background_rgb(Image.new("RGB", (64, 48))) is None  # all black: nothing to measure


def test_a_darker_copy_of_a_real_slide_measures_darker_by_as_much():
    img = Image.open(sorted(SLIDES.glob("*.jpg"))[0]).convert("RGB")
    a = np.asarray(img)
    darker = Image.fromarray(relight(a, (-12, -12, -12)))
    b0, b1 = background_rgb(img), background_rgb(darker)
    assert 170 < b0[1] < 250  # a stained smear's plasma is bright, not white
    np.testing.assert_allclose(b0 - b1, 12, atol=1.0)
    # Shifting the copy by the difference of the levels gives the slide back (up to clipping).
    back = relight(np.asarray(darker), light_offset(b0, b1))
    assert np.abs(back.astype(int) - a).mean() < 0.5


def test_relight_clips_and_none_leaves_the_image():
    a = np.array([[[250, 5, 100]]], np.uint8)
    assert relight(a, (10, -10, 0.4)).tolist() == [[[255, 0, 100]]]
    assert relight(a, None) is a


def test_dataset_level_is_the_median_over_a_seeded_sample():
    imgs = [_field(bg=(200 + i, 210, 190)) for i in range(9)]
    out = estimate_dataset_background(imgs, n=64)
    assert out == {"background_rgb": [204.0, 210.0, 190.0], "background_images": 9}
    a = estimate_dataset_background(imgs, n=5, seed=1)
    assert a == estimate_dataset_background(imgs, n=5, seed=1) and a["background_images"] == 5
    blank = [Image.new("RGB", (32, 32))]
    assert estimate_dataset_background(blank) == {"background_rgb": None, "background_images": 0}


def test_command_on_a_folder_and_on_a_bad_path(capsys, tmp_path):
    assert main([str(SLIDES), "--n", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["background_images"] == 8 and all(150 < v < 255 for v in out["background_rgb"])
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read images from") and "no manifest.json" in err
    missing = str(tmp_path / "missing")
    assert main([missing]) == 2
    assert missing in capsys.readouterr().err
