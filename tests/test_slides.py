"""The slide job end to end: sample slides on a real S3 server, real local Ray, real model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from cellmodel import CLASSES, storage
from cellmodel.config import ConfigError
from cellmodel.data.voc import parse_voc
from cellmodel.infer.finder import FinderConfig, match
from cellmodel.infer.slides import (
    SlidesConfig,
    SlidesError,
    committed_parts,
    load_config,
    read_results,
    run_slides,
)
from cellmodel.models import build_model, save_checkpoint
from jobs import classify_slides

IN = "{bucket}/in/JPEGImages"
CFG = dict(batch_size=8, concurrency=1, find_batch_size=4, slides_per_part=5)
N_SAMPLE = 24
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def bucket(s3_server, sample_dir) -> str:
    """One bucket for the module: sample slides, a corrupt and a blank slide, a checkpoint."""
    import torch

    SAMPLE = sample_dir
    name = f"slides-{os.getpid()}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    fs.mkdir(name)
    for p in sorted((SAMPLE / "slides" / "JPEGImages").glob("*.jpg")):
        fs.pipe(f"{name}/in/JPEGImages/{p.name}", p.read_bytes())
    fs.pipe(f"{name}/in/labels.csv", (SAMPLE / "slides" / "labels.csv").read_bytes())
    good = (SAMPLE / "slides" / "JPEGImages" / "BloodImage_00021.jpg").read_bytes()
    fs.pipe(f"{name}/in/JPEGImages/broken/corrupt.jpg", good[: len(good) // 3])  # a cut-off upload
    pale = Image.new("RGB", (640, 480), (228, 205, 210))  # a smear field with no white cell
    buf = io.BytesIO()
    pale.save(buf, "PNG")
    fs.pipe(f"{name}/in/JPEGImages/blank.png", buf.getvalue())
    fs.pipe(f"{name}/in/JPEGImages/notes.txt", b"not a slide")  # ignored: not an image extension
    torch.manual_seed(0)
    save_checkpoint(build_model("tiny_bilstm"), f"s3://{name}/ckpt")
    return f"s3://{name}"


def wbc_truth(stem: str) -> list[tuple]:
    _, boxes = parse_voc((SAMPLE / "slides" / "Annotations" / f"{stem}.xml").read_bytes())
    return [b.as_tuple() for b in boxes if b.name == "WBC" and b.xmax - b.xmin >= 60]


def check_results(cells, slides) -> None:
    """Row structure and consistency of one complete output."""
    assert len(slides) == N_SAMPLE + 2
    assert slides.slide_id.is_unique
    assert not cells.duplicated(["slide_id", "cell_index"]).any()
    by_slide = slides.set_index("slide_id")
    # Every annotated white cell of the sample is among the cell rows (IoU >= 0.5).
    for sid, row in by_slide.iterrows():
        if sid.startswith("BloodImage_"):
            mine = cells[cells.slide_id == sid].sort_values("det_score", ascending=False)
            boxes = mine[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist()
            truth = wbc_truth(sid.removesuffix(".jpg"))
            assert match(boxes, truth) == len(truth), sid
            assert row.status == "ok" and row.width == 640 and row.height == 480
    # Per-cell rows: probabilities sum to one and agree with the predicted class.
    probs = cells[[f"prob_{c.lower()}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert (cells.pred_class.to_numpy() == np.array(CLASSES)[probs.argmax(1)]).all()
    np.testing.assert_allclose(cells.confidence, probs.max(1), atol=1e-6)
    assert cells.det_score.between(0, 1).all()
    # Per-slide rows: counts add up to the cell rows, fractions to one.
    n = cells.groupby("slide_id").size()
    for sid, row in by_slide.iterrows():
        assert row.n_cells == n.get(sid, 0)
        counts = [row[f"count_{c.lower()}"] for c in CLASSES]
        assert sum(counts) == row.n_cells
        mine = cells[cells.slide_id == sid].pred_class.value_counts()
        assert counts == [mine.get(c, 0) for c in CLASSES]
        if row.n_cells:
            assert sum(row[f"frac_{c.lower()}"] for c in CLASSES) == pytest.approx(1)
            assert row.top_class in CLASSES
    # The corrupt slide is listed with its reason; the blank one is flagged.
    bad = by_slide.loc["broken/corrupt.jpg"]
    assert bad.status == "error" and bad.reason == "truncated" and "unreadable" in bad["flags"]
    assert by_slide.loc["blank.png"].n_cells == 0
    assert list(by_slide.loc["blank.png"]["flags"]) == ["no_white_cell"]
    assert "notes.txt" not in by_slide.index


def kill_midway(bucket: str, out: str, gcs_address: str) -> None:
    """Run the command in a subprocess on the session's Ray; SIGKILL it between the cells
    file and the marker of its second part (held there by the hidden fault flags)."""
    env = dict(os.environ, RAY_ADDRESS=gcs_address)
    cmd = [sys.executable, "-m", "jobs.classify_slides", "--input", IN.format(bucket=bucket),
           "--checkpoint", f"{bucket}/ckpt", "--output", out, "--quiet", "--concurrency", "1",
           "--batch-size", "8", "--slides-per-part", "5",
           "--fault-after-parts", "1", "--fault-mode", "hang"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    fs, path = storage.get_fs(out)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if len(fs.glob(f"{path}/cells/*.parquet")) == 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert len(fs.glob(f"{path}/cells/*.parquet")) == 2, "the run never reached part 2"
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        proc.stderr.close()


def cli_config() -> SlidesConfig:
    """The settings the command line runs with (slides.toml), with the module's CFG."""
    return load_config(classify_slides.DEFAULT_CONFIG, dict(CFG))


def test_killed_run_resumes_without_duplicates(ray_session, bucket):
    out = f"{bucket}/out-resume"
    cfg = cli_config()  # the killed command's own settings: a resume must not change them
    kill_midway(bucket, out, ray_session.get_runtime_context().gcs_address)
    assert len(committed_parts(out)) == 1
    fs, path = storage.get_fs(out)
    assert len(fs.ls(f"{path}/cells", refresh=True)) == 2  # one committed, one orphan
    cells, slides = read_results(out)
    assert len(slides) == 5  # readers see the committed part only

    # Resume: the committed slides are skipped, the orphan is replaced, nothing twice.
    s = run_slides(IN.format(bucket=bucket), f"{bucket}/ckpt", out, cfg, progress=False)
    assert (s["n_new"], s["n_skipped"], s["n_slides"]) == (N_SAMPLE + 2 - 5, 5, N_SAMPLE + 2)
    cells, slides = read_results(out)
    check_results(cells, slides)
    assert s["n_cells"] == len(cells)
    assert s["errors"] == {"broken/corrupt.jpg": "truncated"}
    assert sum(s["counts"].values()) == len(cells)
    names = {p["part"] for p in committed_parts(out)}
    for sub in ("cells", "slides"):
        on_disk = {p.rsplit("/", 1)[1].removesuffix(".parquet") for p in fs.ls(f"{path}/{sub}")}
        assert on_disk == names  # the orphan is gone
    # Any Parquet reader of the folders sees the same rows (one schema across parts).
    for sub, df in (("cells", cells), ("slides", slides)):
        pafs, papath = storage.pyarrow_fs(f"{out}/{sub}")
        assert pq.read_table(papath, filesystem=pafs).num_rows == len(df)
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["n_slides"] == N_SAMPLE + 2
    # The report on the bucket: no overlays were asked for, so slide names link to nothing;
    # the unreadable slide has no top class ("-", not a missing value printed as nan).
    report = storage.read_bytes(f"{out}/report.md").decode()
    assert "](overlays/" not in report and "## Overlays" not in report
    assert "| broken/corrupt.jpg | 0 | 0 | 0 | 0 | 0 | - | - | unreadable |" in report
    assert "nan" not in report

    # A third run has nothing to do and changes nothing.
    s3 = run_slides(IN.format(bucket=bucket), f"{bucket}/ckpt", out, cfg, progress=False)
    assert (s3["n_new"], s3["n_slides"], s3["n_cells"]) == (0, N_SAMPLE + 2, len(cells))


def test_other_checkpoint_cannot_write_into_an_output(bucket, tmp_path):
    out = f"{bucket}/out-mixed"
    storage.write_bytes(
        f"{out}/_job.json", json.dumps({"checkpoint": "s3://x/other", "classes": []}).encode()
    )
    with pytest.raises(SlidesError, match="new output"):
        run_slides(IN.format(bucket=bucket), f"{bucket}/ckpt", out, progress=False)


def test_command_line_default_checkpoint(tmp_path, capsys, monkeypatch):
    """Without --checkpoint the job takes $CELLMODEL_CHECKPOINT, else the bundled model."""
    args = ["--input", str(tmp_path), "--output", str(tmp_path / "o")]
    monkeypatch.setenv("CELLMODEL_CHECKPOINT", "s3://models/mine")
    assert classify_slides.parse_args(args).checkpoint == ["s3://models/mine"]
    monkeypatch.delenv("CELLMODEL_CHECKPOINT")
    monkeypatch.chdir(tmp_path)
    bundled = Path(classify_slides.__file__).resolve().parents[1] / "models" / "bundled"
    assert classify_slides.parse_args(args).checkpoint == [str(bundled)]
    assert "(none given)" in capsys.readouterr().err
    assert classify_slides.parse_args([*args, "--checkpoint", "a"]).checkpoint == ["a"]


def test_command_line_errors_are_one_line(bucket, tmp_path, capsys):
    def run(*args) -> tuple[int, str]:
        rc = classify_slides.main(list(args))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        # Log lines of other libraries may share stderr; the job's own message is one line.
        mine = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(mine) == 1, err
        return rc, mine[0]

    rc, err = run(
        "--input",
        str(tmp_path / "none"),
        "--checkpoint",
        f"{bucket}/ckpt",
        "--output",
        str(tmp_path / "o"),
    )
    assert rc == 2 and err.startswith("error: input") and "does not exist" in err
    rc, err = run(
        "--input",
        IN.format(bucket=bucket),
        "--checkpoint",
        str(tmp_path / "nock"),
        "--output",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "no checkpoint" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run(
        "--input",
        IN.format(bucket=bucket),
        "--checkpoint",
        f"{bucket}/ckpt",
        "--output",
        str(blocker / "out"),
    )
    assert rc == 2 and "cannot" in err
    rc, err = run(
        "--input",
        IN.format(bucket=bucket),
        "--checkpoint",
        f"{bucket}/ckpt",
        "--output",
        str(tmp_path / "o"),
        "--batch-size",
        "0",
        "finder.min_area=-1",
        "backend=tf",
    )
    # Every bad setting, from the flags and the overrides, in the one line.
    assert rc == 2 and all(k in err for k in ("batch_size", "finder.min_area", "backend"))


def test_slide_class_evaluation_joins_labels(ray_session, bucket):
    from cellmodel.data.voc import read_labels_csv
    from cellmodel.infer.finder_eval import evaluate_slide_class

    # Reuses the finished output of the resume test when it ran first (then nothing to do).
    out = f"{bucket}/out-resume"
    res = evaluate_slide_class(f"{bucket}/in", f"{bucket}/ckpt", out, cli_config())
    labels = read_labels_csv((SAMPLE / "slides" / "labels.csv").read_bytes())
    _, slides = read_results(out)
    right = total = 0
    for row in slides.itertuples():
        if row.slide_id.startswith("BloodImage_"):
            truth = labels[int(row.slide_id[11:16])]
            if len(truth) == 1 and truth[0] in CLASSES:
                right, total = right + (row.top_class == truth[0]), total + 1
    # 24 sample slides less the BASOPHIL and the unlabelled one.
    assert res["single_label_slides"] == total == 22
    assert res["slide_accuracy"] == pytest.approx(right / total)
    lo, hi = res["slide_accuracy_interval"]
    assert 0.0 <= lo <= right / total <= hi <= 1.0 and hi - lo > 0.1  # 22 slides are few
    assert sum(sum(v.values()) for v in res["confusion"].values()) == 22


def test_pair_differentials_count_box_and_classify_composed_slides(ray_session, tmp_path):
    import torch

    from cellmodel.data.voc import read_labels_csv
    from cellmodel.infer.finder import iou
    from cellmodel.infer.finder_eval import evaluate_pair_differentials

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "ck"))
    out = str(tmp_path / "pairs")
    cfg = SlidesConfig(**CFG)
    res = evaluate_pair_differentials(str(SAMPLE / "slides"), ckpt, out, cfg, seeds=(0, 1))
    composed = sorted(p.name for p in (tmp_path / "pairs" / "composed").glob("*.png"))
    assert res["pairs"] == len(composed) > 20 and res["seeds"] == [0, 1]
    # Every composed slide joins two single-label slides (the BASOPHIL and the unlabelled
    # one are left out): recount the job's output by hand from the names.
    labels = read_labels_csv((SAMPLE / "slides" / "labels.csv").read_bytes())
    cells, slides = read_results(str(tmp_path / "pairs" / "job"))
    assert sorted(slides.slide_id) == composed
    counted = exact = 0
    for name in composed:
        base, pasted = name.removesuffix(".png").split("-", 1)[1].split("+")
        want = [labels[int(x[11:16])][0] for x in (base, pasted)]
        assert all(w in CLASSES for w in want), name
        mine = cells[cells.slide_id == name]
        counted += len(mine) == 2
        exact += sorted(mine.pred_class) == sorted(want)
    assert res["counted_two"] == counted and res["differential_exact"] == exact
    # Most pasted cells are boxed where they were pasted: the slide's own box and a new one.
    assert res["cells_boxed"] >= 1.5 * res["pairs"]
    assert 0 <= res["own_cell_right"] <= 1 and 0 <= res["pasted_cell_right"] <= 1
    first = cells[cells.slide_id == composed[0]]
    base = composed[0].removesuffix(".png").split("-", 1)[1].split("+")[0]
    truth = wbc_truth(base)[0]
    assert max(iou(b, truth) for b in first[["xmin", "ymin", "xmax", "ymax"]].to_numpy()) > 0.3
    with pytest.raises(ValueError, match="no two-cell slide"):
        evaluate_pair_differentials(
            str(SAMPLE / "slides"), ckpt, str(tmp_path / "none"), cfg, limit=1
        )


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_classifier_stage_matches_the_predictor(tmp_path, backend):
    import torch

    from cellmodel.data.transforms import stack_bytes
    from cellmodel.infer.predictor import Predictor
    from cellmodel.infer.slides import Classifier, find_batch

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "ck"))
    jpgs = sorted((SAMPLE / "slides" / "JPEGImages").glob("*.jpg"))[:3]
    batch = {"slide_id": np.array([p.name for p in jpgs]), "uri": np.array([str(p) for p in jpgs])}
    rows = find_batch(batch, {}, (320, 240))
    out = Classifier(ckpt, batch_size=2, backend=backend)(dict(rows))
    # The same crops through the Predictor directly, as encoded PNGs.
    pngs = []
    for crop in rows["crop"]:
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        pngs.append(buf.getvalue())
    pred = Predictor(ckpt)
    ref = pred.predict_arrays(stack_bytes(pngs, pred.cfg))
    np.testing.assert_allclose(out["probs"], ref, atol=1e-4)
    assert "crop" not in out and len(out["probs"]) == len(rows["slide_id"]) >= 3


def test_windows_of_a_darker_slide_are_relit_to_the_training_level(tmp_path):
    from cellmodel.data.light import background_rgb, relight
    from cellmodel.infer.slides import find_batch

    src = sorted((SAMPLE / "slides" / "JPEGImages").glob("*.jpg"))[0]
    img = Image.open(src).convert("RGB")
    dark = tmp_path / "dark.png"  # the same field under a dimmer lamp: 15 levels darker
    Image.fromarray(relight(np.asarray(img), (-15, -15, -15))).save(dark)
    lit = tmp_path / "lit.png"
    img.save(lit)
    batch = {"slide_id": np.array(["lit", "dark"]), "uri": np.array([str(lit), str(dark)])}
    finder = {"method": "stain"}  # the same boxes on both: the stain rules are level-free
    plain = find_batch(batch, finder, (320, 240))
    assert plain["slide_id"].tolist() == ["lit", "dark"] and np.isnan(plain["light_offset"]).all()
    gap = plain["crop"][0].astype(int) - plain["crop"][1].astype(int)
    assert 13 < gap.mean() < 16  # cut as they are, the two windows differ by the lamp
    train = background_rgb(img) + 6  # training crops 6 levels brighter than this slide
    out = find_batch(batch, finder, (320, 240), train_background=tuple(train))
    np.testing.assert_allclose(out["light_offset"], [6, 21], atol=1.0)
    # Each slide measured alone ("slide"): both windows land on the training level.
    a, b = out["crop"][0].astype(int), out["crop"][1].astype(int)
    assert abs((a - b).mean()) < 1.0
    assert 5 < (a - plain["crop"][0].astype(int)).mean() < 7
    # One level for the archive: the same shift for both, so the lamp's difference stays.
    fixed = find_batch(
        batch, finder, (320, 240), train_background=tuple(train), slide_background=(200, 200, 200)
    )
    np.testing.assert_allclose(fixed["light_offset"], float(np.mean(train - 200)), atol=1e-4)


def test_training_light_comes_from_the_checkpoint_then_the_settings():
    from cellmodel.infer.slides import training_light

    on = SlidesConfig(train_background_rgb=(210.0, 211.0, 205.0))
    meta = {"data": {"background_rgb": [218.0, 219.0, 213.5]}}
    assert training_light(meta, on) == ([218.0, 219.0, 213.5], "checkpoint")
    assert training_light({"data": {}}, on) == (
        [210.0, 211.0, 205.0],
        "train_background_rgb setting",
    )
    assert training_light({}, SlidesConfig())[0] is None
    assert training_light(meta, SlidesConfig(light="off")) == (None, "light is off")
    with pytest.raises(ConfigError, match="light"):
        load_config(None, {"light": "bright"})
    with pytest.raises(ConfigError, match="train_background_rgb"):
        load_config(None, {"train_background_rgb": [200, 200]})


# ---------------------------------------------------------------- scale, overlays, report


def test_training_scale_comes_from_the_checkpoint_then_the_settings():
    from cellmodel.infer.slides import training_scale

    on = SlidesConfig(train_rbc_diameter_px=40.0)
    assert training_scale({"data": {"rbc_diameter_px": 38.5}}, on) == (38.5, "checkpoint")
    assert training_scale({"data": {}}, on)[0] == 40.0
    assert training_scale({}, SlidesConfig())[0] is None
    off = SlidesConfig(rescale=False, train_rbc_diameter_px=40.0)
    assert training_scale({"data": {"rbc_diameter_px": 38.5}}, off)[0] is None
    with pytest.raises(ConfigError, match="train_rbc_diameter_px"):
        load_config(None, {"train_rbc_diameter_px": -1})


def test_settings_file_overrides_and_flags():
    shipped = load_config(classify_slides.DEFAULT_CONFIG)
    # slides.toml spells out the defaults, [finder] included: the two cannot drift apart.
    # It ships the learned finder, whose weights lie beside it (a path relative to the file).
    weights = (classify_slides.DEFAULT_CONFIG.parent / "finder-centre-bccd.pt").resolve()
    assert weights.is_file()
    assert shipped == SlidesConfig(finder=FinderConfig(method="learned", weights=str(weights)))
    stain = load_config(classify_slides.DEFAULT_CONFIG, None, ["finder.method=stain"])
    assert stain.finder.to_dict() | {"weights": None} == FinderConfig().to_dict()
    # an override's relative path is the working directory's, not the file's
    moved = load_config(classify_slides.DEFAULT_CONFIG, None, ["finder.weights=runs/f.pt"])
    assert moved.finder.weights == "runs/f.pt"
    cfg = load_config(
        classify_slides.DEFAULT_CONFIG,
        {"tta": True, "batch_size": None},  # None: the flag was not given
        ["finder.min_area=1500", "batch_size=8", "backend=onnx"],
    )
    assert (cfg.tta, cfg.batch_size, cfg.backend, cfg.finder.min_area) == (True, 8, "onnx", 1500.0)
    assert load_config(None, {"batch_size": 4}, ["batch_size=8"]).batch_size == 4  # flags last


def test_bad_settings_are_reported_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'batch_size = 0\nbackend = "tf"\nbogus = 1\n[finder]\nmin_areaa = 3\ndownsample = 0\n'
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad, {"low_confidence": 2.0}, ["finder.split_elongation=0.5"])
    msg = str(e.value)
    for what in (
        "batch_size",
        "backend",
        "unknown key bogus",
        "low_confidence",
        "unknown key finder.min_areaa",
        "finder.downsample",
        "finder.split_elongation",
    ):
        assert what in msg, (what, msg)
    assert "known keys there:" in msg and "min_area" in msg  # says what would be right
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("batch_size = = 3")
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cut_cell_keeps_the_cell_centred():
    from cellmodel.infer.slides import cut_cell

    a = np.zeros((480, 640, 3), np.uint8)
    a[200:240, 300:340] = 255  # a white square centred at (320, 220)
    img = Image.fromarray(a)
    same = cut_cell(img, (320, 220), (320, 240), (320, 240))
    assert same.shape == (240, 320, 3) and same[120, 160].tolist() == [255, 255, 255]
    # A window twice the crop, resized: the square is half as large, still centred.
    big = cut_cell(img, (320, 220), (640, 480), (320, 240))
    assert big.shape == (240, 320, 3)
    ys, xs = np.nonzero(big[..., 0] > 127)
    assert abs(xs.mean() - 160) < 2 and abs(ys.mean() - 120) < 2
    assert 18 <= xs.max() - xs.min() + 1 <= 22  # 40 px square, half size
    # Near the border the window leaves the slide: it stays centred (edges repeated).
    edge = cut_cell(img, (10, 10), (320, 240), (320, 240))
    assert edge.shape == (240, 320, 3)


def test_cut_cell_inside_keeps_the_window_on_the_slide():
    """framing="inside": near a border the window moves onto the slide (real pixels, the
    cell off centre); a window larger than the slide shows all of it."""
    from cellmodel.infer.slides import cut_cell

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    corner = cut_cell(img, (10, 10), (320, 240), (320, 240), framing="inside")
    np.testing.assert_array_equal(corner, a[:240, :320])  # the slide's own corner, no padding
    far = cut_cell(img, (635, 470), (320, 240), (320, 240), framing="inside")
    np.testing.assert_array_equal(far, a[240:, 320:])
    centred = cut_cell(img, (10, 10), (320, 240), (320, 240), framing="centre")
    assert (centred[:100, :100] == centred[0, 0]).all()  # repeated edge pixel, not the slide
    inner = cut_cell(img, (320, 240), (320, 240), (320, 240), framing="inside")
    np.testing.assert_array_equal(inner, a[120:360, 160:480])  # away from borders: as centred
    # A window wider than the slide: the whole slide, plus a margin of repeated edges.
    whole = cut_cell(img, (600, 50), (660, 480), (660, 480), framing="inside")
    np.testing.assert_array_equal(whole[:, :640], a)  # moved as near the cell as it can
    with pytest.raises(ValueError, match="framing must be one of"):
        cut_cell(img, (10, 10), (320, 240), (320, 240), framing="middle")


@pytest.fixture(scope="module")
def multi_cell_input(tmp_path_factory, sample_dir):
    """Three sample slides and two composed ones with two white cells each (real cells:
    one slide's cell pasted beside another's, see ``finder_eval.compose_pair``)."""
    from cellmodel.infer.finder_eval import compose_pair, load_slides

    root = tmp_path_factory.mktemp("multi")
    slides = {s.name: s for s in load_slides(str(sample_dir / "slides"))}
    for stem in ("BloodImage_00021", "BloodImage_00127", "BloodImage_00113"):
        slides[stem].image.save(root / f"{stem}.jpg", quality=95)
    rng = np.random.default_rng(3)
    truths = {}
    for a, b in (
        ("BloodImage_00021", "BloodImage_00045"),
        ("BloodImage_00208", "BloodImage_00233"),
    ):
        p = compose_pair(slides[a], slides[b], rng)
        assert p is not None
        p.image.save(root / f"pair-{a[-3:]}-{b[-3:]}.png")
        truths[f"pair-{a[-3:]}-{b[-3:]}.png"] = p.truths
    return root, truths


def scaled_checkpoint(path, seed: int = 0, **data) -> str:
    """A tiny model whose checkpoint records a training pixel scale and background level
    (``data`` overrides them)."""
    import torch

    torch.manual_seed(seed)
    data = {"rbc_diameter_px": 38.0, "background_rgb": [218.0, 219.0, 213.5], **data}
    return save_checkpoint(build_model("tiny_bilstm"), str(path), data=data)


def test_overlays_report_and_multi_cell_slides(ray_session, tmp_path, multi_cell_input):
    root, truths = multi_cell_input
    ckpt = scaled_checkpoint(tmp_path / "ck")
    out = str(tmp_path / "out")
    cfg = SlidesConfig(**CFG, overlays=True, low_confidence=0.9)
    s = run_slides(str(root), ckpt, out, cfg, progress=False)
    assert s["n_slides"] == 5 and s["train_rbc_diameter_px"] == 38.0
    cells, slides = read_results(out)
    by = slides.set_index("slide_id")
    # Every white cell of a composed two-cell slide is counted, each in its own box.
    for sid, truth in truths.items():
        assert by.loc[sid].n_cells == 2, sid
        mine = cells[cells.slide_id == sid].sort_values("det_score", ascending=False)
        assert match(mine[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist(), truth) == 2
    # Cells were cut at the training scale: the window is the crop times slide/training RBC,
    # with one slide scale for the whole input (slide_scale "archive": the median of the
    # per-slide estimates).
    from cellmodel.data.scale import estimate_rbc_diameter
    from cellmodel.infer.slides import archive_rbc_diameter, list_slides

    archive, n = archive_rbc_diameter(list_slides(str(root)), 64)
    each = [estimate_rbc_diameter(Image.open(u).convert("RGB")) for _, u in list_slides(str(root))]
    assert n == 5 and archive == pytest.approx(float(np.median(each)), abs=0.01)
    assert len(set(np.round(each, 1))) > 1  # the slides differ; the job still uses one scale
    for row in slides.itertuples():
        assert row.rbc_diameter_px == pytest.approx(archive)
        assert 60 < row.rbc_diameter_px < 100
        assert row.crop_scale == pytest.approx(row.rbc_diameter_px / 38.0, rel=0.02)
    job = json.loads((Path(out) / "_job.json").read_text())
    assert job["scale"]["slide_from"] == "median of 5 slides of the input"
    # Illumination: one level for the input (light "archive", the same sample as the
    # scale), each window shifted by the training level minus it.
    from cellmodel.infer.slides import archive_background

    level, n = archive_background(list_slides(str(root)), 64)
    light = job["light"]
    assert n == 5 and light["slide_background_rgb"] == level and light["from"] == "checkpoint"
    assert light["offset"] == pytest.approx(np.subtract([218.0, 219.0, 213.5], level), abs=0.06)
    assert s["light"] == light
    assert slides.light_offset.to_numpy() == pytest.approx(np.mean(light["offset"]), abs=0.06)
    # One overlay per slide: the slide under a header line.
    for sid in by.index:
        png = Image.open(Path(out) / "overlays" / f"{sid}.png")
        assert png.size == (640, 480 + 26)
    # Overlays show class colours: the pixels on a box's edge are not the slide's.
    first = cells.iloc[0]
    png = np.asarray(Image.open(Path(out) / "overlays" / f"{first.slide_id}.png").convert("RGB"))
    x0, y0 = int(first.xmin) + 1, int(first.ymin) + 26 + 1
    assert png[y0, x0 + 20].tolist() != png[y0 + 20, x0 + 20].tolist()
    report = (Path(out) / "report.md").read_text()
    for part in ("# Slide report", "## Differential, all slides", "## Flagged slides",
                 "## Per slide", "## Overlays (5 of 5 slides"):  # fmt: skip
        assert part in report
    assert "overlays/pair-021-045.png" in report
    assert "- illumination: windows shifted to the training crops' background level" in report
    # The report says which scale and light were used: one each, measured on the input.
    assert f"slides' diameter {archive:.1f} px, from the median of 5 slides of the input" in report
    assert "slides' level from the median of 5 slides of the input: shift RGB" in report
    # low_confidence 0.9 with a random tiny model: every slide is flagged.
    assert report.count("low_confidence") >= 5


def test_a_resumed_output_keeps_its_scale_light_and_settings(
    ray_session, tmp_path, multi_cell_input
):
    import shutil

    from cellmodel.infer.slides import SlidesError, read_job

    root = tmp_path / "in"
    shutil.copytree(multi_cell_input[0], root)
    ckpt = scaled_checkpoint(tmp_path / "ck")
    out = str(tmp_path / "out")
    run_slides(str(root), ckpt, out, SlidesConfig(**CFG), progress=False)
    first = read_job(out)
    # The archive grows by a darker slide: the resumed job classifies it with the scale and
    # light its first run measured, so the output holds one of each.
    img = Image.open(root / "BloodImage_00021.jpg").convert("RGB")
    img.point(lambda v: max(0, v - 40)).save(root / "later.jpg", quality=95)
    s = run_slides(str(root), ckpt, out, SlidesConfig(**{**CFG, "batch_size": 4}), progress=False)
    assert s["n_new"] == 1 and s["n_slides"] == 6
    assert read_job(out) == first and s["light"] == first["light"]
    _, slides = read_results(out)
    assert slides.light_offset.nunique() == 1 and slides.crop_scale.nunique() == 1
    # A measurement taken afresh on the grown input would differ: the guard is not idle.
    from cellmodel.infer.slides import archive_background, list_slides

    assert (
        archive_background(list_slides(str(root)), 64)[0] != first["light"]["slide_background_rgb"]
    )
    # Settings that change the results refuse to resume into the same output.
    for change, name in (({"light": "off"}, "light"), ({"framing": "centre"}, "framing"),
                         ({"tta": True}, "tta")):  # fmt: skip
        with pytest.raises(SlidesError, match=f"other settings \\(.*{name}"):
            run_slides(str(root), ckpt, out, SlidesConfig(**CFG, **change), progress=False)


def test_a_slide_from_another_camera_is_measured_alone_and_found_at_the_finders_scale(
    ray_session, tmp_path, multi_cell_input
):
    """An archive of 640x480 slides with one slide of twice the pixels: the archive's scale
    and light are measured on its commonest size, the odd slide on its own red cells; the
    finder sees it at its own scale (the boxes are the original's, doubled) and its cells
    are cut at twice the window, so they show what the original's show."""
    import shutil

    from cellmodel.infer.finder import iou
    from cellmodel.infer.slides import read_job

    root = tmp_path / "in"
    shutil.copytree(multi_cell_input[0], root)
    img = Image.open(root / "BloodImage_00021.jpg").convert("RGB")
    img.resize((1280, 960), Image.BILINEAR).save(root / "x2.jpg", quality=95)
    ckpt = scaled_checkpoint(tmp_path / "ck")
    out = str(tmp_path / "out")
    run_slides(str(root), ckpt, out, SlidesConfig(**CFG), progress=False)
    job = read_job(out)
    assert job["scale"]["archive_size"] == [640, 480] == job["light"]["archive_size"]
    assert job["scale"]["finder_rbc_diameter_px"] == FinderConfig().rbc_diameter_px
    cells, slides = read_results(out)
    one, two = (slides.set_index("slide_id").loc[k] for k in ("BloodImage_00021.jpg", "x2.jpg"))
    assert (one.width, two.width) == (640, 1280)
    assert one.rbc_diameter_px == job["scale"]["slide_rbc_diameter_px"]  # the archive's
    assert two.rbc_diameter_px == pytest.approx(2 * one.rbc_diameter_px, rel=0.2)  # its own
    assert two.crop_scale == pytest.approx(2 * one.crop_scale, rel=0.2)
    boxes = {
        k: cells[cells.slide_id == k][["xmin", "ymin", "xmax", "ymax"]].to_numpy()
        for k in ("BloodImage_00021.jpg", "x2.jpg")
    }
    assert len(boxes["x2.jpg"]) == len(boxes["BloodImage_00021.jpg"]) >= 1
    for a, b in zip(boxes["BloodImage_00021.jpg"], boxes["x2.jpg"], strict=True):
        assert iou(tuple(a), tuple(b / 2)) > 0.85


def test_classifier_stage_averages_an_ensemble(tmp_path):
    from cellmodel.infer.slides import Classifier, find_batch

    a, b = (scaled_checkpoint(tmp_path / f"ck{i}", seed=i) for i in (0, 1))
    jpgs = sorted((SAMPLE / "slides" / "JPEGImages").glob("*.jpg"))[:3]
    batch = {"slide_id": np.array([p.name for p in jpgs]), "uri": np.array([str(p) for p in jpgs])}
    rows = find_batch(batch, {}, (320, 240))
    pa, pb = (Classifier(c, batch_size=2)(dict(rows))["probs"] for c in (a, b))
    assert np.abs(pa - pb).max() > 1e-3  # two different members
    both = Classifier([a, b], batch_size=2)(dict(rows))["probs"]
    np.testing.assert_allclose(both, (pa + pb) / 2, atol=1e-5)


def test_an_ensemble_classifies_slides_with_the_mean_of_its_members(
    ray_session, tmp_path, multi_cell_input
):
    from cellmodel.infer.slides import read_job

    root = str(multi_cell_input[0])
    a, b = (scaled_checkpoint(tmp_path / f"ck{i}", seed=i) for i in (0, 1))
    cfg = SlidesConfig(**CFG)
    probs = [f"prob_{c.lower()}" for c in CLASSES]
    keys = ["slide_id", "cell_index"]
    singles = []
    for i, ck in enumerate((a, b)):
        run_slides(root, ck, str(tmp_path / f"one{i}"), cfg, progress=False)
        singles.append(read_results(str(tmp_path / f"one{i}"))[0].sort_values(keys))
    out = str(tmp_path / "ens")
    s = run_slides(root, [a, b], out, cfg, progress=False)
    cells, slides = read_results(out)
    cells = cells.sort_values(keys)
    # The same cells in the same boxes, each with the mean of the members' probabilities.
    assert len(cells) == len(singles[0]) == len(singles[1]) >= 7
    for k in ("xmin", "ymin", "xmax", "ymax"):
        np.testing.assert_allclose(cells[k], singles[0][k])
    mean = (singles[0][probs].to_numpy() + singles[1][probs].to_numpy()) / 2
    np.testing.assert_allclose(cells[probs].to_numpy(), mean, atol=1e-5)
    assert (cells.pred_class.to_numpy() == np.array(CLASSES)[mean.argmax(1)]).all()
    job = read_job(out)
    assert job["checkpoint"] == sorted(os.path.abspath(c) for c in (a, b))
    assert job["model"] == ["tiny_bilstm", "tiny_bilstm"]
    assert s["checkpoint"] == [a, b]
    report = (Path(out) / "report.md").read_text()
    assert "- checkpoints: an ensemble of 2 (mean of their probabilities)" in report
    # The ensemble is its set of members: named in another order, it resumes the output;
    # one member alone may not write into it.
    again = run_slides(root, [b, a], out, cfg, progress=False)
    assert (again["n_new"], again["n_slides"]) == (0, s["n_slides"])
    # An ensemble folder holding the same members is the same ensemble.
    from cellmodel.models.checkpoint import write_ensemble

    folder = write_ensemble(str(tmp_path), ["ck1", "ck0"])
    again = run_slides(root, folder, out, cfg, progress=False)
    assert (again["n_new"], again["n_slides"]) == (0, s["n_slides"])
    with pytest.raises(SlidesError, match="holds results of checkpoint"):
        run_slides(root, a, out, cfg, progress=False)


def test_an_ensemble_refuses_members_that_read_slides_differently(tmp_path, capsys):
    a = scaled_checkpoint(tmp_path / "a")
    darker = scaled_checkpoint(tmp_path / "dark", seed=1, background_rgb=[205.0, 206.0, 200.0])
    finer = scaled_checkpoint(tmp_path / "fine", seed=2, rbc_diameter_px=52.0)
    other = save_checkpoint(build_model("tiny_bilstm", num_classes=3), str(tmp_path / "three"))
    inp, out = str(SAMPLE / "slides" / "JPEGImages"), str(tmp_path / "out")
    cases = (
        (darker, "training background level [205.0, 206.0, 200.0] instead of [218.0"),
        (finer, "training red-cell diameter 52.0 instead of 38.0"),
        (other, "classes ['class_0', 'class_1', 'class_2'] instead of"),
    )
    for member, why in cases:
        with pytest.raises(SlidesError, match="cannot join an ensemble") as e:
            run_slides(inp, [a, member], out, SlidesConfig(**CFG), progress=False)
        assert why in str(e.value) and member in str(e.value)
    # With the light off, the level is not read, so a member recorded at another one may join
    # as far as the light goes (checked before any slide is read: no output was written).
    from cellmodel.infer.slides import ensemble_meta

    meta = ensemble_meta([a, darker], SlidesConfig(**CFG, light="off"))
    assert [m["checkpoint"] for m in meta["ensemble"]] == [a, darker]
    # Two measurements of the same crops differ a little (half a level, a percent of scale):
    # such members join, and the job reads slides at their mean.
    near = scaled_checkpoint(
        tmp_path / "near", seed=3, background_rgb=[218.5, 219.5, 213.0], rbc_diameter_px=38.5
    )
    meta = ensemble_meta([a, near], SlidesConfig(**CFG))
    assert meta["data"]["background_rgb"] == [218.25, 219.25, 213.25]
    assert meta["data"]["rbc_diameter_px"] == 38.25
    # 4 levels or 4 % apart is another ingest's data: refused.
    for far in ({"background_rgb": [222.0, 219.0, 213.5]}, {"rbc_diameter_px": 39.6}):
        apart = scaled_checkpoint(tmp_path / f"far{len(far)}{list(far)[0]}", seed=4, **far)
        with pytest.raises(SlidesError, match="cannot join an ensemble"):
            ensemble_meta([a, apart], SlidesConfig(**CFG))
    assert not Path(out).exists()
    with pytest.raises(SlidesError, match="named twice"):
        ensemble_meta([a, a], SlidesConfig(**CFG))
    # On the command line: one line naming the member, exit status 2.
    argv = ["--input", inp, "--checkpoint", a, "--checkpoint", darker, "--output", out]
    assert classify_slides.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot join an ensemble" in err[0] and darker in err[0]


def test_a_grayscale_slide_is_reported_as_such_not_as_without_white_cells(tmp_path):
    """A slide saved in grey levels cannot be read by stain colour: it gets its own reason
    and flag instead of a silent "no white cell"; its colour original is found as usual."""
    from cellmodel.data.light import has_colour
    from cellmodel.infer.slides import find_batch, summarize_slide

    src = SAMPLE / "slides" / "JPEGImages" / "BloodImage_00021.jpg"
    grey = tmp_path / "grey.jpg"
    Image.open(src).convert("L").convert("RGB").save(grey, quality=90)
    assert all(has_colour(Image.open(p)) for p in (SAMPLE / "slides" / "JPEGImages").glob("*"))
    assert not has_colour(Image.open(grey))
    batch = {"slide_id": np.array(["colour", "grey"]), "uri": np.array([str(src), str(grey)])}
    rows = find_batch(batch, {}, (320, 240))
    by = {s: [i for i, x in enumerate(rows["slide_id"]) if x == s] for s in ("colour", "grey")}
    assert len(by["grey"]) == 1 and rows["cell_index"][by["grey"][0]] == -1
    assert rows["status"][by["grey"][0]] == "error" and rows["reason"][by["grey"][0]] == "grayscale"
    assert "scan or export the slide in colour" in rows["message"][by["grey"][0]]
    assert (rows["cell_index"][by["colour"]] >= 0).all() and set(rows["status"][by["colour"]]) == {
        "ok"
    }
    first = {k: rows[k][by["grey"][0]] for k in rows if k != "crop"}
    assert summarize_slide(first, [], list(CLASSES), 0.5)["flags"] == ["grayscale"]
    # A flat frame (an empty scan, a black or white image) is no grey scan: said as blank.
    from cellmodel.data.light import is_blank

    assert not is_blank(Image.open(grey)) and not is_blank(Image.open(src))
    frames = {}
    for name, colour in (("white", (255, 255, 255)), ("black", (0, 0, 0)), ("grey", (128,) * 3)):
        frames[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (640, 480), colour).save(frames[name])
    noisy = np.clip(np.random.default_rng(0).normal(235, 2, (480, 640, 3)), 0, 255)
    frames["noisy"] = tmp_path / "noisy.jpg"
    Image.fromarray(noisy.astype(np.uint8)).convert("L").convert("RGB").save(frames["noisy"])
    batch = {"slide_id": np.array(list(frames)), "uri": np.array([str(p) for p in frames.values()])}
    rows = find_batch(batch, {}, (320, 240))
    for i, sid in enumerate(rows["slide_id"]):
        assert (rows["status"][i], rows["reason"][i]) == ("error", "blank"), sid
        assert "blank" in rows["message"][i] and rows["cell_index"][i] == -1
        first = {k: rows[k][i] for k in rows if k != "crop"}
        assert summarize_slide(first, [], list(CLASSES), 0.5)["flags"] == ["blank"]
    # Grey slides do not measure the archive's illumination and scale, nor set its image
    # size, however many there are (two grey copies at another size against one colour).
    from cellmodel.infer.slides import archive_sample, commonest_size

    big = tmp_path / "grey_big.png"
    Image.open(grey).resize((800, 600)).save(big)
    archive = [("colour", str(src)), ("grey", str(grey)), ("grey_big", str(big)),
               ("grey_big2", str(big))]  # fmt: skip
    sample = archive_sample(archive, 10)
    assert [im.size for im in sample[1:]] == [(8, 8)] * 3
    assert commonest_size(sample) == (Image.open(src).size, [sample[0]])


def test_files_that_are_not_slide_images_are_left_out_and_said(tmp_path, caplog):
    from cellmodel.infer.slides import list_slides

    jpg = next((SAMPLE / "slides" / "JPEGImages").glob("*.jpg"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.JPG").write_bytes(jpg.read_bytes())
    Image.open(jpg).save(tmp_path / "b.gif")
    Image.open(jpg).save(tmp_path / "c.gif")
    (tmp_path / "notes.txt").write_text("scanned 2024")
    (tmp_path / "README").write_text("")
    with caplog.at_level("WARNING", logger="cellmodel"):
        assert [sid for sid, _ in list_slides(str(tmp_path))] == ["sub/a.JPG"]
    (msg,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert msg.startswith("4 files under ") and ".gif 2, " in msg and "(none) 1" in msg
    assert ".txt 1" in msg and ".jpg" in msg  # what it reads instead
    caplog.clear()
    (tmp_path / "b.gif").unlink()
    (tmp_path / "c.gif").unlink()
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "README").unlink()
    with caplog.at_level("WARNING", logger="cellmodel"):
        list_slides(str(tmp_path))
    assert not [r for r in caplog.records if "left out" in r.getMessage()]  # nothing to say
