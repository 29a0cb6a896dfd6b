"""The white-cell finder on the committed sample slides (no Ray, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cellmodel.config import ConfigError, validate_settings
from cellmodel.data.voc import parse_voc
from cellmodel.infer.finder import (
    FinderConfig,
    _join_without_neck,
    cut_by_frame,
    distance_transform,
    fill_holes,
    find_cells,
    find_cells_at_scale,
    iou,
    label_components,
    match,
    otsu_threshold,
)
from cellmodel.infer.finder_eval import Slide, compose_pair, load_slides

# BCCD labels a few platelets as WBC (e.g. a 31x27 box on slide 113); a white cell is
# never that small, so boxes under this side are not counted as cells to find.
MIN_WBC_SIDE = 60


def wbc_boxes(xml_path) -> tuple[list[tuple], list[tuple]]:
    """(plausible WBC boxes, implausibly small ones) of one annotation file."""
    _, boxes = parse_voc(xml_path.read_bytes())
    wbc = [b for b in boxes if b.name == "WBC"]
    big = [b.as_tuple() for b in wbc if min(b.xmax - b.xmin, b.ymax - b.ymin) >= MIN_WBC_SIDE]
    small = [b.as_tuple() for b in wbc if min(b.xmax - b.xmin, b.ymax - b.ymin) < MIN_WBC_SIDE]
    return big, small


def test_every_annotated_white_cell_is_found(sample_dir):
    slides = sample_dir / "slides"
    excluded, found, total, extra = [], 0, 0, 0
    for xml in sorted((slides / "Annotations").glob("*.xml")):
        truth, small = wbc_boxes(xml)
        excluded += [(xml.stem, b) for b in small]
        img = Image.open(slides / "JPEGImages" / f"{xml.stem}.jpg").convert("RGB")
        dets = find_cells(img)
        assert all(0 <= d.score <= 1 for d in dets)
        assert all(0 <= d.xmin < d.xmax <= 640 and 0 <= d.ymin < d.ymax <= 480 for d in dets)
        tp = match([d.as_tuple() for d in dets], truth, 0.5)
        assert tp == len(truth), f"{xml.stem}: found {tp} of {len(truth)} white cells"
        found, total, extra = found + tp, total + len(truth), extra + len(dets) - tp
    # The only box left out is the platelet that BCCD calls a WBC on slide 113.
    assert [name for name, _ in excluded] == ["BloodImage_00113"]
    assert found == total == 23  # 24 slides, one (133) without a WBC box
    # Slide 133 has a real white cell at its top border that BCCD did not annotate.
    assert extra <= 1


def test_pale_slide_without_stain_has_no_cell():
    rng = np.random.default_rng(0)
    pale = np.clip(rng.normal((225, 200, 205), 6, (480, 640, 3)), 0, 255).astype(np.uint8)
    assert find_cells(Image.fromarray(pale)) == []


def test_synthetic_nucleus_is_found_with_a_cell_sized_box():
    a = np.full((480, 640, 3), (230, 200, 205), np.uint8)
    yy, xx = np.mgrid[:480, :640]
    a[(yy - 200) ** 2 + (xx - 300) ** 2 < 35**2] = (110, 60, 170)  # a purple disc
    a[(yy - 400) ** 2 + (xx - 100) ** 2 < 6**2] = (110, 60, 170)  # a platelet-sized dot
    dets = find_cells(Image.fromarray(a))
    assert len(dets) == 1
    cx, cy = dets[0].center
    assert abs(cx - 300) < 8 and abs(cy - 200) < 8
    # The box fits the cell (a 70 px disc), not a fixed 150 px minimum.
    assert 60 <= dets[0].xmax - dets[0].xmin <= 120


def _flood_count(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_components_matches_flood_fill(seed):
    mask = np.random.default_rng(seed).random((40, 50)) < 0.45
    labels, n = label_components(mask)
    assert n == _flood_count(mask)
    assert set(np.unique(labels[mask])) == set(range(1, n + 1))
    assert (labels[~mask] == 0).all()
    # 4-neighbours inside the mask always share a label.
    both = mask[:, 1:] & mask[:, :-1]
    assert (labels[:, 1:][both] == labels[:, :-1][both]).all()


def test_label_components_spiral_converges():
    # A long snake: naive propagation needs ~its length in passes; check the result only.
    mask = np.zeros((21, 21), bool)
    mask[::4, :] = True
    mask[1::8, -1] = mask[2::8, -1] = mask[3::8, -1] = True
    mask[5::8, 0] = mask[6::8, 0] = mask[7::8, 0] = True
    labels, n = label_components(mask)
    assert n == 1 and (labels[mask] == 1).all()


def test_otsu_splits_two_modes():
    v = np.concatenate([np.full(500, 10.0), np.full(100, 90.0)])
    assert 10 < otsu_threshold(v) <= 90


def test_iou_and_matching():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    # One truth cannot be matched twice.
    assert match([(0, 0, 10, 10), (0, 0, 10, 10)], [(0, 0, 10, 10)]) == 1


def test_bad_finder_settings_are_named_together():
    with pytest.raises(ConfigError) as e:
        validate_settings(FinderConfig, {"min_areaa": 3, "downsample": 0, "rel_floor": "x"})
    msg = str(e.value)
    assert "unknown key min_areaa" in msg and "min_area," in msg  # the known keys are listed
    assert "downsample" in msg and "rel_floor" in msg


def test_a_slide_of_another_pixel_scale_is_found_at_the_finders_own(sample_dir):
    """A slide photographed with twice the pixels (upscaled 2x here) is resized to the
    finder's scale by its measured red cells: the same boxes as on the original, in the big
    slide's pixels; found as is, the stain rules (sizes in pixels) box it otherwise."""
    from cellmodel.data.scale import estimate_rbc_diameter

    cfg = FinderConfig()
    as_is_differs = 0
    for stem in ("BloodImage_00008", "BloodImage_00117", "BloodImage_00032"):
        img = Image.open(sample_dir / "slides" / "JPEGImages" / f"{stem}.jpg").convert("RGB")
        big = img.resize((1280, 960), Image.BILINEAR)
        want = find_cells(img, cfg)
        rbc = estimate_rbc_diameter(big)
        assert rbc == pytest.approx(2 * estimate_rbc_diameter(img), rel=0.15)
        got, f = find_cells_at_scale(big, cfg, rbc, cfg.rbc_diameter_px)
        assert f == pytest.approx(cfg.rbc_diameter_px / rbc) and f < 0.6
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert iou(tuple(v / 2 for v in g.as_tuple()), w.as_tuple()) > 0.9
            assert g.nucleus_area == pytest.approx(4 * w.nucleus_area, rel=0.2)
        plain = find_cells(big, cfg)
        as_is_differs += len(plain) != len(want) or any(
            iou(tuple(v / 2 for v in p.as_tuple()), w.as_tuple()) < 0.8 for p, w in zip(plain, want)
        )
        # within the tolerance, or with a scale unknown, the slide is found as it is
        near = img.resize((704, 528), Image.BILINEAR)  # 1.1x
        assert find_cells_at_scale(near, cfg, 1.1 * rbc / 2, cfg.rbc_diameter_px)[1] == 1.0
        assert find_cells_at_scale(big, cfg, None, cfg.rbc_diameter_px)[1] == 1.0
        assert find_cells_at_scale(big, cfg, rbc, None)[1] == 1.0
    assert as_is_differs >= 2  # the rescale is what makes the boxes right


def test_finder_evaluation_of_an_archive_of_another_scale(sample_dir, tmp_path):
    """The sample slides and their boxes at twice the pixels score as the originals do:
    evaluation finds each slide at the finder's own scale, as the slide job does."""
    import re
    import shutil

    from cellmodel.infer.finder_eval import evaluate_finder

    src, dst = sample_dir / "slides", tmp_path / "x2"
    (dst / "JPEGImages").mkdir(parents=True)
    (dst / "Annotations").mkdir()
    for p in sorted((src / "JPEGImages").glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        img.resize((1280, 960), Image.BILINEAR).save(dst / "JPEGImages" / p.name, quality=95)
    double = lambda m: f"<{m[1]}>{2 * int(m[2])}</{m[1]}>"  # noqa: E731
    for p in sorted((src / "Annotations").glob("*.xml")):
        xml = re.sub(r"<(xmin|ymin|xmax|ymax|width|height)>(\d+)</\1>", double, p.read_text())
        (dst / "Annotations" / p.name).write_text(xml)
    shutil.copy(src / "labels.csv", dst / "labels.csv")
    stain = {"method": "stain"}
    one, two = evaluate_finder(str(src), stain), evaluate_finder(str(dst), stain)
    assert one["scale"]["slides_resized"] == 0 and two["scale"]["archive_size"] == [1280, 960]
    assert two["scale"]["slides_resized"] == two["slides"] == one["slides"]
    # the same cells (resampling may move one box across IoU 0.5), the same count
    assert two["true_positives"] >= one["true_positives"] - 1 >= one["wbc_boxes"] - 2
    assert abs(two["detections"] - one["detections"]) <= 1
    off = evaluate_finder(str(dst), stain | {"scale_tolerance": 100})  # found as they are
    assert off["scale"]["slides_resized"] == 0
    assert off["true_positives"] <= two["true_positives"] - 3  # 16 of 24 boxes, 45 detections


def test_evaluation_command_on_the_sample(sample_dir, tmp_path, capsys):
    from jobs.evaluate_finder import main

    out = tmp_path / "eval.json"
    stain = "finder.method=stain"  # the slide job ships the learned finder; this is the stain one
    assert main(["--slides", str(sample_dir / "slides"), "--json", str(out), stain]) == 0
    f = json.loads(out.read_text())["finder"]
    # 24 annotated boxes (one is slide 113's platelet), 24 detections (one unannotated cell).
    assert (f["wbc_boxes"], f["detections"], f["true_positives"]) == (24, 24, 23)
    assert f["slides_with_a_missed_cell"] == ["BloodImage_00113"]
    assert "recall 0.958, precision 0.958" in capsys.readouterr().out
    assert main(["--slides", str(tmp_path)]) == 2
    assert "no Annotations" in capsys.readouterr().err


# ---------------------------------------------------------------- the cases of issue 13
# Real BCCD slides of data/sample/slides/extra: 00020 and 00087 hold small white cells
# (boxes 123x83 and 104x106: a finder that holds boxes at 150 px misses them at IoU 0.5);
# 00164 is the palest stain of the 278 BCCD slides; 00210 and 00386 hold elongated
# neutrophils.


def extra_slides(sample_dir) -> dict[str, Slide]:
    return {s.name: s for s in load_slides(str(sample_dir / "slides" / "extra"))}


@pytest.mark.parametrize("stem", ["BloodImage_00020", "BloodImage_00087"])
def test_small_cell_gets_a_box_of_its_own_size(sample_dir, stem):
    s = extra_slides(sample_dir)[stem]
    dets = find_cells(s.image)
    assert match([d.as_tuple() for d in dets], s.truths) == len(s.truths) == 1
    best = max(dets, key=lambda d: iou(d.as_tuple(), s.truths[0]))
    assert max(best.xmax - best.xmin, best.ymax - best.ymin) < 150
    assert len(dets) == 1


@pytest.mark.parametrize("stem", ["BloodImage_00210", "BloodImage_00386"])
def test_elongated_neutrophil_stays_one_cell(sample_dir, stem):
    """An elongated lobed neutrophil is one cell: a cut on elongation leaves one lobe
    (2,300-2,700 px of nucleus) on one side, less than a whole cell's nucleus."""
    s = extra_slides(sample_dir)[stem]
    dets = find_cells(s.image)
    assert len(dets) == 1 and match([d.as_tuple() for d in dets], s.truths) == 1
    # Without the whole-nucleus rule the same settings cut it in two.
    cut = find_cells(s.image, FinderConfig(split_part_area=0.0))
    assert len(cut) == 2 and min(d.nucleus_area for d in cut) < FinderConfig().split_part_area
    # The optional neck rule alone keeps it whole too (the cut runs through the middle of
    # the cell body); restricted to the slide border, only where the cell lies there (210).
    neck = FinderConfig(split_part_area=0.0, split_neck=0.1)
    assert len(find_cells(s.image, neck)) == 1
    border = neck.model_copy(update={"split_neck_where": "border"})
    assert (len(find_cells(s.image, border)) == 1) == (stem == "BloodImage_00210")


def washed_out(img: Image.Image, keep: float) -> Image.Image:
    """The slide as a paler stain: every colour moved towards white (``keep`` of its depth)."""
    a = np.asarray(img, np.float32)
    return Image.fromarray(np.clip(255 - (255 - a) * keep, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("keep", [1.0, 0.6, 0.45])
def test_pale_stain_is_found(sample_dir, keep):
    """The palest BCCD slide, and copies washed out further: the threshold follows the stain.

    At keep=0.45 the nucleus' blue-green contrast is under the old fixed floor (55).
    """
    s = extra_slides(sample_dir)["BloodImage_00164"]
    img = washed_out(s.image, keep)
    dets = find_cells(img)
    assert match([d.as_tuple() for d in dets], s.truths) == 1
    assert len(dets) == 1


def test_dark_and_pale_copies_of_the_sample_are_found(sample_dir):
    slides = load_slides(str(sample_dir / "slides"))
    found = total = 0
    for s in slides[::4]:
        truth = [t for t in s.truths if t[2] - t[0] >= 60]
        for keep in (0.5, 1.0):
            dets = find_cells(washed_out(s.image, keep))
            found += match([d.as_tuple() for d in dets], truth)
            total += len(truth)
    assert found == total


def pairs(sample_dir, n: int = 6) -> list[Slide]:
    """Touching pairs composed from real sample cells (see finder_eval.compose_pair)."""
    slides = [s for s in load_slides(str(sample_dir / "slides")) if len(s.truths) == 1]
    rng = np.random.default_rng(3)
    out = []
    for a, b in zip(slides, slides[1:] + slides[:1], strict=True):
        p = compose_pair(a, b, rng)
        if p is not None:
            out.append(p)
    return out[:n]


def test_touching_cells_are_split(sample_dir):
    made = pairs(sample_dir, 8)
    assert len(made) == 8
    split = 0
    for p in made:
        dets = find_cells(p.image)
        m = match([d.as_tuple() for d in dets], p.truths)
        split += m == 2
        assert m >= 1, p.name  # never lose both cells of a pair
    assert split >= 7, f"{split} of 8 touching pairs found as two cells"


@pytest.mark.parametrize(
    ("base", "pasted"),
    [("BloodImage_00032", "BloodImage_00225"), ("BloodImage_00117", "BloodImage_00344"),
     ("BloodImage_00312", "BloodImage_00233")],
)  # fmt: skip
def test_side_by_side_cells_too_big_for_one_are_cut_not_dropped(sample_dir, base, pasted):
    """Two real cells pasted side by side whose nuclei touch: one nucleus blob wider than
    ``max_cell_size``. Without the oversize cut the size filter drops it and both cells
    are lost; with it (shipped) each cell is found with its own box."""
    slides = {s.name: s for s in load_slides(str(sample_dir / "slides"))}
    p = compose_pair(slides[base], slides[pasted], np.random.default_rng(0))
    assert find_cells(p.image, FinderConfig(split_oversize=0)) == []
    dets = find_cells(p.image)
    assert len(dets) == 2 and match([d.as_tuple() for d in dets], p.truths) == 2


def test_composed_pair_is_a_real_cell_beside_another(sample_dir):
    p = pairs(sample_dir, 1)[0]
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = p.truths
    # The boxes touch or overlap (by at most 20 % of a side) and both lie in the slide.
    gap_x = max(ax0, bx0) - min(ax1, bx1)
    gap_y = max(ay0, by0) - min(ay1, by1)
    assert min(gap_x, gap_y) <= 1 and max(gap_x, gap_y) <= 0
    assert p.image.size == (640, 480) and 0 <= bx0 and bx1 <= 640 and 0 <= by0 and by1 <= 480
    assert p.meta["base"] != p.meta["pasted"]


def test_composed_groups_of_cells_are_real_cells_apart_or_touching(sample_dir):
    """Slides of 3 and 4 cells from the sample: every box is a real cell pasted inside the
    slide, each new one touching a cell already there (touching) or clear of all (scattered),
    none covering another's centre; the slide's own cell stays where it was."""
    from cellmodel.infer.finder import iou
    from cellmodel.infer.finder_eval import composed_groups

    slides = load_slides(str(sample_dir / "slides"))
    for k in (3, 4):
        for touching in (True, False):
            made = composed_groups(slides, k, seed=1, touching=touching)
            assert len(made) >= 15, (k, touching, len(made))
            for m in made:
                assert len(m.truths) == k and m.composed and m.image.size == (640, 480)
                own = next(s for s in slides if s.name == m.name.split("+")[0])
                assert m.truths[0] == own.truths[0]
                for i, b in enumerate(m.truths):
                    assert 0 <= b[0] < b[2] <= 640 and 0 <= b[1] < b[3] <= 480
                    others = [o for j, o in enumerate(m.truths) if j != i]
                    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
                    assert not any(o[0] <= cx <= o[2] and o[1] <= cy <= o[3] for o in others)
                    if touching:  # beside its anchor as compose_pair places it; apart otherwise
                        assert all(iou(b, o) <= 0.25 for o in others)
                    else:
                        assert all(iou(b, o) == 0 for o in others)
                if touching:  # each pasted cell touches or overlaps one before it
                    for i in range(1, k):
                        b = m.truths[i]
                        assert any(
                            max(b[0], o[0]) - min(b[2], o[2]) <= 1
                            and max(b[1], o[1]) - min(b[3], o[3]) <= 1
                            for o in m.truths[:i]
                        ), (m.name, i)
            # the pasted pixels are the donor's: the slide changed inside the new boxes only
            m = made[0]
            own = next(s for s in slides if s.name == m.name.split("+")[0])
            a, b = np.asarray(own.image, dtype=int), np.asarray(m.image, dtype=int)
            outside = np.ones(a.shape[:2], bool)
            for x0, y0, x1, y1 in m.truths[1:]:
                outside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = False
            assert (a != b).any() and (a[outside] == b[outside]).all()


def test_a_cell_cut_by_the_frame_is_never_pasted(sample_dir):
    """Part of a cell (a narrow box on the slide's edge) is no donor: pasted mid-slide it is
    no cell a slide shows, and its box is not the cell's extent. Whole cells, on the frame
    or not, still are."""
    size = (640, 480)
    assert cut_by_frame((0, 100, 60, 250), size)  # half a cell on the left edge
    assert cut_by_frame((600, 380, 640, 480), size)  # a sliver in a corner
    assert not cut_by_frame((0, 100, 140, 250), size)  # round, touching the edge
    assert not cut_by_frame((100, 100, 160, 250), size)  # narrow, clear of the frame
    singles = [s for s in load_slides(str(sample_dir / "slides")) if len(s.truths) == 1]
    base, donor = singles[0], singles[1]
    (x0, y0, x1, y1) = donor.truths[0]
    cut = Slide("cut", donor.image, [(0.0, y0, (x1 - x0) / 2, y1)])  # its left half, on the frame
    assert cut_by_frame(cut.truths[0], cut.image.size)
    rngs = [np.random.default_rng(s) for s in range(20)]
    assert all(compose_pair(base, cut, r) is None for r in rngs)
    assert any(compose_pair(base, donor, np.random.default_rng(s)) for s in range(20))


def test_distance_transform_of_a_disc_and_a_square():
    yy, xx = np.mgrid[:61, :61]
    disc = (yy - 30) ** 2 + (xx - 30) ** 2 <= 20**2
    d = distance_transform(disc)
    assert 18 <= d[30, 30] <= 21 and d[~disc].max() == 0 and d[disc].min() == 1
    sq = np.zeros((20, 20), bool)
    sq[5:15, 5:15] = True
    assert distance_transform(sq)[9, 9] == 5


def test_fill_holes():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    m[8:12, 8:12] = False  # a hole
    m[0:3, 0:3] = True
    m[1, 1] = False  # touches nothing outside, still a hole
    filled = fill_holes(m)
    assert filled[8:12, 8:12].all() and filled[1, 1]
    assert not filled[16:, 16:].any()


def test_cross_validation_command_on_the_sample(sample_dir, tmp_path, capsys):
    from jobs.evaluate_finder import main

    out = tmp_path / "cv.json"
    assert main(["--slides", str(sample_dir / "slides"), "--cv", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3-fold cross-validation over 24 slides" in text
    assert "| **mean** |" in text and "| **worst** |" in text
    res = json.loads(out.read_text())["cross_validation"]
    assert [r["fold"] for r in res["folds"]] == [0, 1, 2]
    assert sum(r["real_slides"] for r in res["folds"]) == 24
    for r in res["folds"]:
        # Each fold is scored with settings chosen without it, and is scored on its own.
        assert r["real"]["wbc_boxes"] >= r["real_slides"] - 2
        assert r["all"]["recall"] >= 0.85
    assert res["summary"]["all"]["recall"]["worst"] <= res["summary"]["all"]["recall"]["mean"]


def test_pairs_command_counts_composed_pairs_on_the_sample(sample_dir, tmp_path, capsys):
    from jobs.evaluate_finder import main

    out = tmp_path / "pairs.json"
    args = ["--slides", str(sample_dir / "slides"), "--pairs", "0,1", "--json", str(out)]
    assert main(args) == 0
    f = json.loads(out.read_text())["pairs"]
    singles = [s for s in load_slides(str(sample_dir / "slides")) if len(s.truths) == 1]
    assert f["seeds"] == [0, 1] and 30 < f["pairs"] <= 2 * len(singles)  # one per slide, seed
    assert f["wbc_boxes"] == 2 * f["pairs"]
    assert f["counted_two"] <= f["both_found"] <= f["pairs"]
    assert f["counted_two"] <= f["two_boxes"] <= f["pairs"]
    assert f["two_boxes"] == f["pairs"] - sum(m["detections"] != 2 for m in f["miscounted"])
    assert len(f["miscounted"]) == f["pairs"] - f["counted_two"]
    assert f["recall"] >= 0.95 and f["precision"] >= 0.95
    assert f"counted as two cells: {f['counted_two']}" in capsys.readouterr().out
    assert main(["--slides", str(sample_dir / "slides"), "--pairs", "0,x"]) == 2
    assert "comma-separated integer seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one mode at a time
        main(["--slides", str(sample_dir / "slides"), "--pairs", "0", "--cv", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------- lobes vs cells (split_neck)


def _two_part_blob(gap: int):
    """Two discs side by side (radius 12, centres 2 x 12 - gap apart): parts 0 and 1."""
    yy, xx = np.mgrid[:40, :70]
    a = (yy - 20) ** 2 + (xx - 20) ** 2 <= 144
    b = (yy - 20) ** 2 + (xx - (44 - gap)) ** 2 <= 144
    comp = a | b
    owner = (xx >= (32 - gap // 2)).astype(np.int32)
    return comp, owner, yy, xx


def test_parts_without_a_neck_are_joined_only_when_one_is_a_lobe():
    comp, owner, yy, xx = _two_part_blob(4)
    nuc = comp.copy()
    one_body = distance_transform((yy - 20) ** 2 + (xx - 30) ** 2 <= 26**2)  # one round cell
    two_bodies = distance_transform(comp)  # two cells, narrow where they meet
    small = nuc.sum() / 2 + 1  # each part's nucleus is under a whole cell's
    # One round body around both parts: the cut runs through its middle, the parts are lobes.
    assert _join_without_neck(owner, comp, nuc, one_body, 0.1, small).max() == 0
    # Two bodies meeting at a waist: two cells, even with small nuclei.
    assert _join_without_neck(owner, comp, nuc, two_bodies, 0.1, small).max() == 1
    # Two whole nuclei are two cells whatever the body's shape.
    assert _join_without_neck(owner, comp, nuc, one_body, 0.1, small / 4).max() == 1


@pytest.mark.parametrize(("base", "seed"), [("BloodImage_00127", 1), ("BloodImage_00161", 2)])
def test_lobe_of_a_pasted_neutrophil_is_not_a_cell(sample_dir, base, seed):
    """The elongated neutrophil of slide 210 pasted beside a sample cell: the elongation
    rule cuts off one big lobe (4,000-4,300 px of nucleus, over split_part_area), through
    the middle of its cell body; the optional neck rule joins it back. Found by looking
    at the composed pair 00015+00210, one of the CV's false splits (BENCHMARKS)."""
    slides = {s.name: s for s in load_slides(str(sample_dir / "slides"))}
    p = compose_pair(
        slides[base], extra_slides(sample_dir)["BloodImage_00210"], np.random.default_rng(seed)
    )
    cut = find_cells(p.image)  # the shipped setting: the neck rule is off
    assert len(cut) == 3 and match([d.as_tuple() for d in cut], p.truths) == 2
    dets = find_cells(p.image, FinderConfig(split_neck=0.1))
    assert len(dets) == 2 and match([d.as_tuple() for d in dets], p.truths) == 2
    # Restricted to the slide border it does not look at this pair, which lies inside.
    border = FinderConfig(split_neck=0.1, split_neck_where="border")
    assert len(find_cells(p.image, border)) == 3
