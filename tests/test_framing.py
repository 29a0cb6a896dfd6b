"""Framing on the white cell: a model with ``frame`` set reads the window around the cell's
nucleus, in every path that feeds it (training decode, prediction, checkpoints)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cellmodel.data.transforms import cell_centre, frame_cell, stack_bytes, to_array, to_uint8
from cellmodel.infer.ensemble import member_differences
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, load_checkpoint, save_checkpoint
from cellmodel.models.registry import model_config


def _smear(nucleus=(250, 60), platelet=(50, 200), black_corner=True) -> Image.Image:
    """A drawn field: pink plasma, red cells, one purple nucleus (two lobes), a platelet,
    and the black corner of a rotated copy."""
    img = Image.new("RGB", (320, 240), (226, 200, 205))
    d = ImageDraw.Draw(img)
    for x, y in ((40, 40), (120, 90), (200, 180), (280, 200), (150, 30)):
        d.ellipse((x - 22, y - 22, x + 22, y + 22), fill=(205, 120, 130))
    nx, ny = nucleus
    d.ellipse((nx - 30, ny - 30, nx + 30, ny + 30), fill=(200, 170, 210))  # cytoplasm
    d.ellipse((nx - 20, ny - 14, nx + 2, ny + 10), fill=(100, 60, 170))  # lobes
    d.ellipse((nx - 2, ny - 10, nx + 20, ny + 14), fill=(100, 60, 170))
    px, py = platelet
    d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(110, 70, 180))
    if black_corner:
        d.polygon([(0, 240), (0, 170), (90, 240)], fill=(0, 0, 0))
    return img


def test_the_centre_is_the_nucleus_not_a_platelet_or_the_black_fill():
    cx, cy = cell_centre(_smear())
    assert abs(cx - 250) <= 4 and abs(cy - 60) <= 4
    cx, cy = cell_centre(_smear(nucleus=(70, 150), platelet=(280, 30)))
    assert abs(cx - 70) <= 4 and abs(cy - 150) <= 4
    assert cell_centre(Image.new("RGB", (320, 240), (226, 200, 205))) is None
    assert cell_centre(Image.new("RGB", (320, 240), (0, 0, 0))) is None


def test_the_centre_follows_the_cell_on_real_crops(sample_dir):
    """A real crop flipped: its centre flips with it (the same nucleus is found)."""
    paths = sorted((sample_dir / "crops").glob("*/*.jpeg"))[::6][:8]
    assert len(paths) == 8
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, _ = img.size
        (x, y), (fx, fy) = cell_centre(img), cell_centre(img.transpose(Image.FLIP_LEFT_RIGHT))
        assert abs((w - fx) - x) <= 3 and abs(fy - y) <= 3, p.name


def test_the_window_holds_the_cell_at_the_input_aspect_and_stays_in_the_picture():
    img = _smear(nucleus=(275, 40))  # near the top right corner
    win = frame_cell(img, 0.5, 240 / 320)
    assert win.size == (160, 120)
    a = np.asarray(win, dtype=np.int16)
    blue = (a[..., 2] - a[..., 1]) > 60
    assert blue.sum() > 500  # the nucleus is in the window
    assert np.array_equal(np.asarray(win), np.asarray(img.crop((160, 0, 320, 120))))  # moved in
    assert frame_cell(img, 0.0, 0.75) is img
    square = frame_cell(img, 0.4, 1.0)
    assert square.size == (128, 128)
    assert frame_cell(img, 1.0, 1.0).size == (240, 240)  # as tall as the picture, no taller
    blank = Image.new("RGB", (320, 240), (226, 200, 205))
    assert np.array_equal(
        np.asarray(frame_cell(blank, 0.5, 0.75)), np.asarray(blank.crop((80, 60, 240, 180)))
    )


def test_a_framed_model_reads_the_window_in_every_decode_path():
    img = _smear()
    buf = io.BytesIO()
    img.save(buf, "PNG")
    whole = model_config("tiny_bilstm")
    framed = model_config("tiny_bilstm", frame=0.5)
    assert framed.preprocessing()["frame"] == 0.5 and whole.preprocessing()["frame"] == 0.0
    win = frame_cell(img, 0.5, 120 / 160)
    np.testing.assert_array_equal(to_array(img, framed), to_array(win, whole))
    np.testing.assert_array_equal(to_uint8(img, framed), to_uint8(win, whole))
    np.testing.assert_array_equal(stack_bytes([buf.getvalue()], framed)[0], to_array(win, whole))
    assert not np.array_equal(to_array(img, framed), to_array(img, whole))
    for size in ((1, 1), (3, 2), (1, 60), (600, 2)):  # odd uploads still give an input
        assert to_array(Image.new("RGB", size, (120, 80, 200)), framed).shape == (3, 120, 160)
    with pytest.raises(ValueError, match="frame must lie in"):
        model_config("tiny_bilstm", frame=1.5)
    # members of one ensemble share one input batch, so they must frame alike
    classes = whole.classes
    problems = member_differences(classes, whole.preprocessing(), classes, framed.preprocessing())
    assert problems and "'frame': 0.5" in problems[0]
    older = {k: v for k, v in whole.preprocessing().items() if k != "frame"}
    assert member_differences(classes, older, classes, whole.preprocessing()) == []


def test_frame_travels_in_the_checkpoint_and_the_predictor_applies_it(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny_bilstm", frame=0.5).eval()
    save_checkpoint(model, str(tmp_path / "ck"))
    loaded, _ = load_checkpoint(str(tmp_path / "ck"))
    assert loaded.cfg.frame == 0.5
    img = _smear()
    buf = io.BytesIO()
    img.save(buf, "PNG")
    got = Predictor(str(tmp_path / "ck"), device="cpu").predict_bytes([buf.getvalue()])[0]
    x = torch.from_numpy(to_array(frame_cell(img, 0.5, 0.75), model_config("tiny_bilstm")))
    with torch.no_grad():
        want = torch.softmax(model(x[None]), -1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_caller_that_knows_where_its_cell_is_gets_that_cell_framed():
    """The slide job's crop may hold another cell, stained more strongly (or smeared where a
    window larger than the slide repeats its edge): given where its cell is, the window is
    framed on that cell."""
    img = _smear(nucleus=(90, 150), platelet=(300, 230), black_corner=False)
    d = ImageDraw.Draw(img)
    d.ellipse((240, 10, 310, 70), fill=(60, 30, 190))  # a bigger, bluer blob elsewhere
    x, y = cell_centre(img)
    assert x > 200  # alone, the stronger blob wins
    x, y = cell_centre(img, near=(95, 145, 40))
    assert abs(x - 90) <= 4 and abs(y - 150) <= 4
    assert cell_centre(Image.new("RGB", (320, 240), (226, 200, 205)), (50, 60, 20)) == (50, 60)
    win = np.asarray(frame_cell(img, 0.5, 0.75, near=(95, 145, 40)), dtype=np.int16)
    assert ((win[..., 2] - win[..., 1]) > 60).sum() > 500  # the nucleus, not the blob
    framed = model_config("tiny_bilstm", frame=0.5)
    np.testing.assert_array_equal(
        to_array(img, framed, (95, 145, 40)),
        to_array(frame_cell(img, 0.5, 0.75, (95, 145, 40)), model_config("tiny_bilstm")),
    )


def test_the_slide_job_knows_where_each_cell_lies_in_its_crop(sample_dir):
    """``window_origin`` is where ``cut_cell`` cuts: the slide's pixel at a cell's centre is
    the crop's pixel at the point the slide job hands the framing, also where the window is
    moved inside the slide."""
    from cellmodel.infer.slides import cut_cell, window_origin

    img = Image.open(sorted((sample_dir / "slides" / "JPEGImages").glob("*.jpg"))[0])
    img = img.convert("RGB")
    a = np.asarray(img)
    for centre in ((320.0, 240.0), (40.0, 30.0), (610.0, 460.0)):
        for framing in ("inside", "centre"):
            crop = cut_cell(img, centre, (320, 240), (320, 240), framing)
            left, top = window_origin(centre, (320, 240), img.size, framing)
            cx, cy = int(centre[0] - left), int(centre[1] - top)
            np.testing.assert_array_equal(crop[cy, cx], a[int(centre[1]), int(centre[0])])
