"""Evaluating a tiny trained checkpoint end to end: the report's files, shard datasets, S3,
feature maps, and the bad inputs of issue 5 (empty folder, unknown class, corrupt images,
classes that differ between checkpoint and data, unwritable output)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmodel import CLASSES, storage
from cellmodel.data.transforms import bytes_to_array
from cellmodel.evaluate import (
    EvalDataError,
    EvalOutputError,
    capture_feature_maps,
    evaluate_checkpoint,
    feature_layers,
)
from cellmodel.evaluate.report import FILES
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_from_config, build_model, model_config, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT / "data" / "sample" / "crops"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample_files(per_class: int | None = None, classes=CLASSES) -> list[Path]:
    out = []
    for c in classes:
        out += sorted((CROPS / c).glob("*.jpeg"))[:per_class]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """tiny_bilstm trained for a few steps on the committed sample crops."""
    torch.manual_seed(0)
    model = build_model("tiny_bilstm")
    files = sample_files()
    x = torch.from_numpy(np.stack([bytes_to_array(f.read_bytes(), model.cfg) for f in files]))
    y = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    steps = 6  # enough to be a trained checkpoint; the LSTM's backward is the slow part
    for _ in range(steps):
        idx = torch.randint(0, len(files), (16,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    uri = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(model, uri, metrics={"val_loss": loss.item(), "step": steps})
    return uri


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics = evaluate_checkpoint(checkpoint, str(CROPS), str(out), batch_size=48)
    return metrics, out


def copy_crops(dst: Path, per_class: int, names: dict[str, str] | None = None) -> Path:
    """``per_class`` sample crops per class into ``dst/<name>/``."""
    for c in CLASSES:
        if names is not None and c not in names:
            continue
        folder = dst / (names[c] if names else c)
        folder.mkdir(parents=True, exist_ok=True)
        for f in sample_files(per_class, [c]):
            shutil.copy(f, folder / f.name)
    return dst


def test_report_writes_every_file(report):
    metrics, out = report
    for name in FILES.values():
        assert (out / name).is_file(), name
    for name in FILES.values():
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    md = (out / "report.md").read_text()
    assert md.startswith("# Evaluation of `tiny_bilstm`")
    for png in [v for v in FILES.values() if v.endswith(".png")]:
        assert f"]({png})" in md  # embedded by relative path
    assert f"{100 * metrics['accuracy']:.2f}%" in md
    assert "## Per class" in md and "## Calibration" in md and "## Feature maps" in md
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"]
    assert on_disk["checkpoint_metrics"]["step"] == 6
    assert on_disk["files"]["report"] == "report.md"


def test_metrics_agree_with_the_predictor_and_the_csv(report, checkpoint):
    metrics, out = report
    files = sample_files()
    probs = Predictor(checkpoint, device="cpu").predict_bytes([f.read_bytes() for f in files])
    y = np.array([CLASSES.index(f.parent.name) for f in files])
    assert metrics["n"] == 160 and metrics["n_skipped"] == 0
    assert metrics["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == 160 and cm.sum(axis=1).tolist() == [40, 40, 40, 40]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 160
    assert np.mean([r["true"] == r["pred"] for r in rows]) == pytest.approx(metrics["accuracy"])
    assert 0.0 <= metrics["ece"] <= 1.0
    assert sum(metrics["calibration"]["count"]) == 160


def test_confident_mistakes_are_wrong_and_sorted(report):
    metrics, _ = report
    mistakes = metrics["confident_mistakes"]
    assert len(mistakes) == min(16, 160 - round(metrics["accuracy"] * 160))
    assert all(m["true"] != m["pred"] for m in mistakes)
    conf = [m["confidence"] for m in mistakes]
    assert conf == sorted(conf, reverse=True)


def test_featuremap_layers_and_shapes(checkpoint):
    model = Predictor(checkpoint, device="cpu").model
    layers = feature_layers(model)
    assert layers == ["conv1.0", "stages.0", "stages.1", "stages.2"]
    x = bytes_to_array(sample_files(1)[0].read_bytes(), model.cfg)
    maps = capture_feature_maps(model, x)
    assert [m.shape for _, m in maps] == [(8, 60, 80), (16, 30, 40), (32, 15, 20), (64, 8, 10)]
    # The first map is the first convolution applied to the image, nothing else.
    direct = model.cnns[0].conv1[0](torch.from_numpy(x)[None].contiguous()).detach()[0]
    assert np.allclose(maps[0][1], direct.numpy(), atol=1e-5)
    # timm backbones name their stages: the first conv, then three later stages.
    assert feature_layers(build_model("resnet50")) == ["conv1", "layer1", "layer3", "layer4"]


def test_featuremaps_need_a_cnn_branch():
    rnn_only = build_from_config(model_config("tiny_bilstm", cnn=()))
    with pytest.raises(ValueError, match="no CNN branch"):
        feature_layers(rnn_only)


def test_featuremaps_job(checkpoint, tmp_path, capsys):
    from jobs.featuremaps import main

    out = tmp_path / "maps.png"
    img = str(sample_files(1)[0])
    assert main(["--checkpoint", checkpoint, "--image", img, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert main(["--checkpoint", checkpoint, "--image", img, "--out", str(out),
                 "--layers", "conv1.0,nope"]) == 2  # fmt: skip
    assert "no layer named nope" in capsys.readouterr().err


def test_cli_prints_summary_and_writes_report(checkpoint, tmp_path, capsys):
    from jobs.evaluate import main

    data = copy_crops(tmp_path / "data", 3)
    out = tmp_path / "out"
    chosen = str(sample_files(1, ["MONOCYTE"])[0])
    argv = ["--checkpoint", checkpoint, "--data", str(data), "--out", str(out), "--quiet"]
    assert main([*argv, "--featuremap-image", chosen, "--mistakes", "4"]) == 0
    assert "on 12 images (0 skipped)" in capsys.readouterr().out
    assert (out / "report.md").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["featuremaps"]["image"] == chosen
    assert len(m["confident_mistakes"]) <= 4
    assert main([*argv, "--featuremap-image", str(tmp_path / "nope.png")]) == 2
    assert "feature-map image not found" in capsys.readouterr().err


def test_cli_without_a_checkpoint_uses_the_environment_then_the_bundled_model(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """No --checkpoint: $CELLMODEL_CHECKPOINT when set, else the bundled model, from any
    working directory, and the command says which."""
    from cellmodel.models.checkpoint import default_checkpoint
    from jobs.evaluate import main, parse_args

    data = copy_crops(tmp_path / "data", 1)
    monkeypatch.setenv("CELLMODEL_CHECKPOINT", checkpoint)
    assert main(["--data", str(data), "--out", str(tmp_path / "env"), "--quiet"]) == 0
    assert f"checkpoint: {checkpoint} (none given)" in capsys.readouterr().err
    assert json.loads((tmp_path / "env" / "metrics.json").read_text())["checkpoint"] == checkpoint
    monkeypatch.delenv("CELLMODEL_CHECKPOINT")
    monkeypatch.chdir(tmp_path)  # not the repository: the bundled model is still found
    bundled = ROOT / "models" / "bundled"
    assert default_checkpoint() == str(bundled)
    assert parse_args(["--data", str(data)]).checkpoint == [str(bundled)]
    assert main(["--data", str(data), "--out", str(tmp_path / "bundled"), "--quiet"]) == 0
    m = json.loads((tmp_path / "bundled" / "metrics.json").read_text())
    assert m["checkpoint"] == str(bundled) and m["n"] == 4


def test_cli_user_mistake_gives_one_error_line(checkpoint, tmp_path):
    # A real process, so that the exit status and the absence of a traceback are real.
    r = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--checkpoint", checkpoint,
         "--data", str(tmp_path / "missing")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: data not found: {tmp_path / 'missing'} does not exist"


def test_cli_unwritable_output_and_missing_checkpoint(checkpoint, tmp_path, capsys):
    from jobs.evaluate import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["--checkpoint", checkpoint, "--data", str(CROPS), "--out", str(blocker / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: cannot write to the output folder")
    assert main(["--checkpoint", str(tmp_path / "none"), "--data", str(CROPS)]) == 2
    assert "checkpoint.json is missing" in capsys.readouterr().err


def test_empty_folder(checkpoint, tmp_path):
    with pytest.raises(EvalDataError, match="empty: it holds no class folders"):
        evaluate_checkpoint(checkpoint, str(tmp_path))
    (tmp_path / "EOSINOPHIL").mkdir()
    (tmp_path / "EOSINOPHIL" / "notes.txt").write_text("not an image")
    with pytest.raises(EvalDataError, match="hold no images"):
        evaluate_checkpoint(checkpoint, str(tmp_path))


def test_unknown_class_folder_is_named(checkpoint, tmp_path):
    data = copy_crops(tmp_path, 1, {"EOSINOPHIL": "EOSINOPHIL", "MONOCYTE": "BASOPHIL"})
    with pytest.raises(EvalDataError) as e:
        evaluate_checkpoint(checkpoint, str(data))
    assert "'BASOPHIL'" in str(e.value)
    assert "EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL" in str(e.value)


def test_subset_of_classes_case_insensitive(checkpoint, tmp_path):
    data = copy_crops(tmp_path, 2, {"EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "Lymphocyte"})
    m = evaluate_checkpoint(checkpoint, str(data))
    assert m["n"] == 4
    assert m["data_classes"] == ["EOSINOPHIL", "LYMPHOCYTE"]
    assert m["classes_present"] == ["EOSINOPHIL", "LYMPHOCYTE"]
    assert "MONOCYTE, NEUTROPHIL" in m["notes"][0]
    f1 = [m["per_class"][c]["f1"] for c in ("EOSINOPHIL", "LYMPHOCYTE")]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_corrupt_images_are_skipped_and_counted(checkpoint, tmp_path):
    data = copy_crops(tmp_path / "data", 2)
    good = sample_files(1)[0].read_bytes()
    (data / "EOSINOPHIL" / "text.jpeg").write_bytes(b"this is not a picture")
    (data / "MONOCYTE" / "cut.jpeg").write_bytes(good[: len(good) // 3])
    (data / "NEUTROPHIL" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    m = evaluate_checkpoint(checkpoint, str(data), str(out))
    assert (m["n"], m["n_found"], m["n_skipped"]) == (8, 11, 3)
    assert m["skipped_by_reason"] == {"not_an_image": 1, "truncated": 1, "empty": 1}
    assert {s["id"] for s in m["skipped"]} == {
        "EOSINOPHIL/text.jpeg", "MONOCYTE/cut.jpeg", "NEUTROPHIL/empty.png"
    }  # fmt: skip
    md = (out / "report.md").read_text()
    assert "## Skipped images" in md and "`MONOCYTE/cut.jpeg`: truncated" in md


def test_all_images_corrupt_is_an_error(checkpoint, tmp_path):
    (tmp_path / "EOSINOPHIL").mkdir()
    (tmp_path / "EOSINOPHIL" / "a.jpeg").write_bytes(b"junk")
    with pytest.raises(EvalDataError, match="none of the 1 images .* could be decoded"):
        evaluate_checkpoint(checkpoint, str(tmp_path))


def test_checkpoint_classes_differ_from_the_data(tmp_path):
    two = build_model("tiny_bilstm", classes=("EOSINOPHIL", "LYMPHOCYTE"))
    ckpt = save_checkpoint(two, str(tmp_path / "two"))
    with pytest.raises(
        EvalDataError, match="classes 'MONOCYTE', 'NEUTROPHIL' are not of the checkpoint"
    ):
        evaluate_checkpoint(ckpt, str(copy_crops(tmp_path / "data", 1)))


def test_unwritable_output_fails_before_work(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EvalOutputError, match="cannot write to the output folder"):
        evaluate_checkpoint(checkpoint, str(CROPS), str(blocker / "out"))


@pytest.fixture(scope="module")
def shard_dataset(tmp_path_factory) -> str:
    from cellmodel.data.ingest import ingest

    uri = str(tmp_path_factory.mktemp("shards") / "ds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # crop folders have no source ids: ingest says so
        ingest(str(CROPS), uri, target_per_class=8, val_fraction=0.25, progress=False, workers=1)
    return uri


def test_shard_dataset_reports_per_source_accuracy(checkpoint, shard_dataset, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    m = evaluate_checkpoint(checkpoint, shard_dataset, str(out), split="val", batch_size=16)
    table = pq.read_table(sorted(Path(shard_dataset, "val").glob("*.parquet")))
    assert m["data_kind"] == "shards" and m["split"] == "val"
    assert m["n"] == table.num_rows
    assert m["per_source"]["n_sources"] == len(set(table.column("source_id").to_pylist()))
    assert "## Per source cell" in (out / "report.md").read_text()
    ps = m["per_source"]
    for key, value in (
        ("accuracy", m["accuracy"]),
        ("vote_accuracy", ps["vote_accuracy"]),
        ("cell_balanced_accuracy", ps["cell_balanced_accuracy"]),
    ):
        lo, hi = ps["intervals"][key]
        assert 0.0 <= lo <= value <= hi <= 1.0
    assert "resamples of the" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["id"] for r in rows} == set(table.column("id").to_pylist())
    assert all(r["source_id"] for r in rows)
    with pytest.raises(EvalDataError, match="no split 'test'.*--split"):
        evaluate_checkpoint(checkpoint, shard_dataset, split="test")


def test_shard_dataset_with_classes_the_checkpoint_lacks(shard_dataset, tmp_path):
    two = build_model("tiny_bilstm", classes=("EOSINOPHIL", "LYMPHOCYTE"))
    ckpt = save_checkpoint(two, str(tmp_path / "two"))
    with pytest.raises(
        EvalDataError,
        match="classes 'MONOCYTE', 'NEUTROPHIL' are not of the checkpoint",
    ):
        evaluate_checkpoint(ckpt, shard_dataset)


def test_class_folders_and_report_on_s3(checkpoint, s3_bucket):
    for f in sample_files(2, ("LYMPHOCYTE", "NEUTROPHIL")):
        storage.write_bytes(f"{s3_bucket}/crops/{f.parent.name}/{f.name}", f.read_bytes())
    m = evaluate_checkpoint(checkpoint, f"{s3_bucket}/crops", f"{s3_bucket}/report")
    assert m["n"] == 4 and m["data_classes"] == ["LYMPHOCYTE", "NEUTROPHIL"]
    assert json.loads(storage.read_bytes(f"{s3_bucket}/report/metrics.json"))["n"] == 4
    for name in FILES.values():
        assert storage.exists(f"{s3_bucket}/report/{name}"), name


def test_an_ensemble_scores_the_mean_of_its_members(checkpoint, tmp_path, capsys):
    """Two checkpoints answer with the mean of their probabilities, in the library and the
    CLI; members that disagree on classes or input are refused with the difference named."""
    from cellmodel.infer.ensemble import Ensemble, EnsembleError
    from jobs.evaluate import main

    torch.manual_seed(1)
    other = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "other"))
    files = sample_files(2)
    x = np.stack([bytes_to_array(f.read_bytes(), build_model("tiny_bilstm").cfg) for f in files])
    a, b = Predictor(checkpoint).predict_arrays(x), Predictor(other).predict_arrays(x)
    assert not np.allclose(a, b)  # two different models, or the test shows nothing
    ens = Ensemble([checkpoint, other])
    np.testing.assert_allclose(ens.predict_arrays(x), (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert ens.weights_sha256 == Ensemble([other, checkpoint]).weights_sha256

    m = evaluate_checkpoint([checkpoint, other], str(CROPS), str(tmp_path / "out"))
    assert m["checkpoint"] == [checkpoint, other] and m["n"] == len(sample_files())
    assert main(["--checkpoint", checkpoint, "--checkpoint", other, "--data", str(CROPS),
                 "--quiet"]) == 0  # fmt: skip
    assert f"accuracy {m['accuracy']:.4f}" in capsys.readouterr().out

    two = save_checkpoint(
        build_model("tiny_bilstm", classes=("EOSINOPHIL", "LYMPHOCYTE")), str(tmp_path / "two")
    )
    with pytest.raises(EnsembleError, match=r"two cannot join .*classes \['EOSINOPHIL'"):
        Ensemble([checkpoint, two])
    small = save_checkpoint(
        build_model("tiny_bilstm", input_size=(3, 60, 80)), str(tmp_path / "small")
    )
    with pytest.raises(EnsembleError, match=r"input size \(3, 60, 80\)"):
        Ensemble([checkpoint, small])
    with pytest.raises(EnsembleError, match="two or more"):
        Ensemble([checkpoint])


# ---------------------------------------------------------------- temperature scaling


def test_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    from cellmodel.evaluate.calibrate import fit_temperature, scaled

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (6000, 4))
    for t in (0.5, 1.0, 2.0):
        p = scaled(z, t)
        y = (rng.random((len(z), 1)) > p.cumsum(1)).sum(1)  # a draw from softmax(z / t)
        assert fit_temperature(z, y) == pytest.approx(t, rel=0.1)
    with pytest.raises(ValueError, match="no labelled images"):
        fit_temperature(z[:0], np.zeros(0, np.int64))


def test_cross_fitting_scores_each_cell_with_a_temperature_fitted_on_the_others():
    from cellmodel.evaluate.calibrate import cross_fit, fit_temperature, scaled

    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (800, 4))
    hot, cold = np.arange(400), np.arange(400, 800)
    y = np.empty(800, np.int64)  # cell "a" drawn at temperature 0.5, cell "b" at 2
    for idx, t in ((hot, 0.5), (cold, 2.0)):
        y[idx] = (rng.random((len(idx), 1)) > scaled(z[idx], t).cumsum(1)).sum(1)
    groups = ["a"] * 400 + ["b"] * 400
    out = cross_fit(z, y, groups, folds=2)
    by_hand = {round(fit_temperature(z[i], y[i]), 4) for i in (hot, cold)}
    assert set(out["fold_temperatures"]) == by_hand and out["groups"] == 2
    assert out["temperature"] == pytest.approx(fit_temperature(z, y), abs=1e-4)
    # Fitted on the other cell, each cell is scored with the wrong temperature: worse than
    # fitting on everything would look, which is the point of cross-fitting.
    assert out["after_cross_fitted"]["nll"] > out["before"]["nll"]
    with pytest.raises(ValueError, match="too few"):
        cross_fit(z, y, ["a"] * 800, folds=2)


def test_cell_weighting_keeps_one_many_copy_cell_from_setting_the_temperature():
    from cellmodel.evaluate.calibrate import cell_weights, cross_fit, fit_temperature, scaled

    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (2000, 4))
    t_of = np.r_[np.full(1000, 2.0), np.full(1000, 0.5)]  # one cell's 1,000 copies, then 10 cells
    y = np.array(
        [(rng.random() > scaled(z[i : i + 1], t).cumsum()).sum() for i, t in enumerate(t_of)]
    )
    groups = ["big"] * 1000 + [f"c{i // 100}" for i in range(1000)]
    w = cell_weights(groups, len(y))
    assert w[:1000].sum() == pytest.approx(1.0) and w[1000:].sum() == pytest.approx(10.0)
    by_image, by_cell = fit_temperature(z, y), fit_temperature(z, y, w)
    assert by_cell < 0.8 and by_image > 1.0  # near the ten cells' 0.5, not the big cell's 2
    fit = cross_fit(z, y, groups, folds=2)
    assert fit["weight"] == "cell" and fit["temperature"] == pytest.approx(by_cell, abs=1e-3)
    assert cross_fit(z, y, groups, weight="image")["temperature"] == pytest.approx(
        by_image, abs=1e-3
    )
    with pytest.raises(ValueError, match="weight must be"):
        cross_fit(z, y, groups, weight="slide")


def test_predictor_divides_the_logits_by_the_stored_temperature(checkpoint, tmp_path):
    from cellmodel.evaluate.calibrate import write_temperature
    from cellmodel.infer.predictor import DIHEDRAL, dihedral, softmax

    ck = str(tmp_path / "ck")
    shutil.copytree(checkpoint, ck)
    plain = Predictor(ck)
    assert plain.temperature == 1.0
    entry = write_temperature(ck, 0.5, {"from": "a test"})
    assert entry == {"temperature": 0.5, "from": "a test"}
    x = np.stack([bytes_to_array(f.read_bytes(), plain.cfg) for f in sample_files(2)])
    logits = plain.logits_arrays(x)
    hot = Predictor(ck)
    assert hot.temperature == 0.5 and hot.weights_sha256 == plain.weights_sha256
    np.testing.assert_allclose(hot.predict_arrays(x), softmax(logits * 2), atol=1e-5)
    assert (hot.predict_arrays(x).argmax(1) == plain.predict_arrays(x).argmax(1)).all()
    views = [softmax(plain.logits_arrays(dihedral(x, k, f)) * 2) for k, f in DIHEDRAL]
    tta = Predictor(ck, tta=True).predict_arrays(x)
    np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="temperature must lie"):
        write_temperature(ck, 0.0, {})


def test_calibrate_command_fits_stores_and_refits_the_same(checkpoint, shard_dataset, tmp_path):
    from jobs import calibrate

    ck = str(tmp_path / "ck")
    shutil.copytree(checkpoint, ck)
    out = tmp_path / "cal.json"
    args = ["--checkpoint", ck, "--data", shard_dataset, "--quiet", "--json", str(out)]
    assert calibrate.main([*args, "--write"]) == 0
    fit = json.loads(out.read_text())
    stored = json.loads((Path(ck) / "checkpoint.json").read_text())["calibration"]
    assert stored["temperature"] == fit["temperature"] and "split val" in stored["from"]
    assert fit["grouped_by"] == "source cell" and len(fit["fold_temperatures"]) == 2
    assert fit["after_cross_fitted"]["accuracy"] == fit["before"]["accuracy"]
    # Fitted again on the calibrated checkpoint: the stored temperature is undone first.
    assert calibrate.main(args) == 0
    assert json.loads(out.read_text())["temperature"] == pytest.approx(fit["temperature"], rel=1e-3)
    assert (
        calibrate.main(["--checkpoint", ck, "--temperature", "0.8", "--note", "recipe", "--write"])
        == 0
    )
    assert Predictor(ck).temperature == 0.8


def test_an_ensemble_has_its_own_temperature_stored_for_that_combination(
    checkpoint, shard_dataset, tmp_path
):
    """jobs.calibrate with several checkpoints fits the temperature of their mean, stores it in
    every member under the combination, and the same members in any order apply it to the log
    of their mean probability; another combination and each member alone do not."""
    from cellmodel.infer.ensemble import Ensemble, EnsembleError
    from cellmodel.infer.predictor import softmax
    from jobs import calibrate

    a = str(tmp_path / "a")
    shutil.copytree(checkpoint, a)
    torch.manual_seed(1)
    b = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "b"))
    torch.manual_seed(2)
    c = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "c"))
    x = np.stack([bytes_to_array(f.read_bytes(), Predictor(a).cfg) for f in sample_files(2)])
    plain = Ensemble([a, b]).predict_arrays(x)
    assert Ensemble([a, b]).temperature == 1.0

    out = tmp_path / "cal.json"
    args = ["--checkpoint", a, "--checkpoint", b, "--data", shard_dataset, "--quiet"]
    assert calibrate.main([*args, "--json", str(out), "--write"]) == 0
    fit = json.loads(out.read_text())
    assert fit["checkpoint"] == [a, b] and fit["stored_temperature"] == 1.0
    for member in (a, b):
        meta = json.loads((Path(member) / "checkpoint.json").read_text())
        (entry,) = meta["ensemble_calibration"].values()
        assert entry["temperature"] == fit["temperature"] and entry["members"] == [a, b]
        assert "calibration" not in meta  # the member's own temperature is left alone
    assert Ensemble([b, a]).temperature == fit["temperature"]
    assert Predictor(a).temperature == 1.0 and Ensemble([a, c]).temperature == 1.0
    # Fitted again: the stored ensemble temperature is undone first, so the fit is the same.
    assert calibrate.main([*args, "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["stored_temperature"] == fit["temperature"]
    assert again["temperature"] == pytest.approx(fit["temperature"], rel=1e-3)

    # A given temperature: the ensemble answers softmax(log(mean) / T), its ranking unchanged.
    assert calibrate.main(["--checkpoint", b, "--checkpoint", a, "--temperature", "0.5",
                           "--write"]) == 0  # fmt: skip
    ens = Ensemble([a, b])
    assert ens.temperature == 0.5 and ens.meta["ensemble_temperature"] == 0.5
    np.testing.assert_allclose(ens.predict_arrays(x), softmax(np.log(plain) * 2), atol=1e-5)
    assert (ens.predict_arrays(x).argmax(1) == plain.argmax(1)).all()
    assert Ensemble([a, b, c]).temperature == 1.0  # a third member: another combination

    # Members that disagree about it are refused; a member named twice is refused.
    meta = json.loads((Path(b) / "checkpoint.json").read_text())
    for entry in meta["ensemble_calibration"].values():
        entry["temperature"] = 0.7
    (Path(b) / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match="different temperatures"):
        Ensemble([a, b])
    with pytest.raises(SystemExit):
        calibrate.main(["--checkpoint", a, "--checkpoint", a, "--temperature", "1", "--write"])


def test_calibrate_command_errors(checkpoint, tmp_path, capsys):
    from jobs import calibrate

    assert calibrate.main(["--checkpoint", checkpoint, "--temperature", "0", "--write"]) == 2
    assert "temperature must lie" in capsys.readouterr().err
    assert calibrate.main(["--checkpoint", str(tmp_path), "--temperature", "1", "--write"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calibrate.main(["--checkpoint", checkpoint])  # neither --data nor --temperature


def _fold_evaluations(checkpoint, tmp_path, k: int = 3, **evaluate) -> list[str]:
    """The sample slides ingested as ``k`` folds, each val split scored by jobs.evaluate."""
    from cellmodel.data.ingest import ingest

    evals = []
    for f in range(k):
        data = tmp_path / f"f{f}"
        if not data.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the sample's one BASOPHIL slide is skipped
                ingest(str(ROOT / "data" / "sample" / "slides"), str(data), target_per_class=4,
                       folds=k, fold=f, progress=False, workers=1)  # fmt: skip
        evals.append(str(tmp_path / f"ev{f}{'-tta' if evaluate.get('tta') else ''}"))
        evaluate_checkpoint(
            checkpoint, str(data), evals[-1], split="val", batch_size=16, **evaluate
        )
    return evals


def test_crossval_pools_the_folds_and_refuses_a_cell_scored_twice(checkpoint, tmp_path, capsys):
    """Three folds of the sample slides, each val split evaluated by jobs.evaluate, pooled by
    jobs.crossval: every cell once, the pooled figures counted from the predictions."""
    from jobs import crossval

    evals = _fold_evaluations(checkpoint, tmp_path)
    out = tmp_path / "cv"
    assert crossval.main([*evals, "--out", str(out)]) == 0
    r = json.loads((out / "crossval.json").read_text())
    rows = [row for e in evals for row in csv.DictReader(open(Path(e) / "predictions.csv"))]
    p = r["pooled"]
    assert p["n"] == len(rows) and p["n_sources"] == len({row["source_id"] for row in rows}) == 21
    assert p["accuracy"] == pytest.approx(np.mean([row["true"] == row["pred"] for row in rows]))
    folds = [json.loads((Path(e) / "metrics.json").read_text()) for e in evals]
    assert r["over_folds"]["accuracy"]["mean"] == pytest.approx(
        np.mean([m["accuracy"] for m in folds])
    )
    assert [f["fold"]["fold"] for f in r["folds"]] == [0, 1, 2] and r["warnings"] == []
    for _, key in (("per image", "accuracy"), ("cell-balanced", "cell_balanced_accuracy")):
        lo, hi = p["intervals"][key]
        assert lo <= p[key] <= hi
    assert "**pooled**" in (out / "crossval.md").read_text()
    assert "pooled (" in capsys.readouterr().out
    # Two of three folds: pooled, with a warning that the cells are not all there.
    assert crossval.main(evals[:2]) == 0
    assert "folds [0, 1] of 3" in capsys.readouterr().err
    # One evaluation twice scores its cells twice: refused, naming a cell.
    assert crossval.main([evals[0], evals[1], evals[0]]) == 2
    assert "is scored by both" in capsys.readouterr().err


def test_crossval_against_another_gives_the_paired_gap_on_the_same_cells(
    checkpoint, tmp_path, capsys
):
    """--against: the same folds scored with TTA. The gap is the difference of the two pooled
    figures, its interval brackets it, a cross-validation against itself is 0 [0, 0], and
    one that shares no cell, or scores a cell on other images, is refused."""
    from cellmodel.evaluate.crossval import CrossValError, gap, pool
    from jobs import crossval

    plain = _fold_evaluations(checkpoint, tmp_path)
    tta = _fold_evaluations(checkpoint, tmp_path, tta=True)
    out = tmp_path / "gap"
    assert crossval.main([*tta, "--against", *plain, "--out", str(out)]) == 0
    r = json.loads((out / "crossval.json").read_text())
    a = pool(plain)
    g = r["gap"]
    assert g["cells"] == r["pooled"]["n_sources"] == 21 and g["warnings"] == []
    for key in ("accuracy", "cell_balanced_accuracy", "vote_accuracy"):
        assert g[key]["gap"] == pytest.approx(r["pooled"][key] - a["pooled"][key])
        lo, hi = g[key]["interval"]
        assert lo <= g[key]["gap"] <= hi
    assert "Gap to the `--against` cross-validation" in (out / "crossval.md").read_text()
    assert "gap to --against on 21 cells" in capsys.readouterr().out
    # Against itself: nothing between them, however the cells are drawn.
    assert crossval.main([*plain, "--against", *plain, "--out", str(out)]) == 0
    same = json.loads((out / "crossval.json").read_text())["gap"]["accuracy"]
    assert same == {"gap": 0.0, "interval": [0.0, 0.0]}
    # Folds 0 and 1 against all three: the gap covers the shared cells, with a warning.
    assert crossval.main([plain[0], plain[1], "--against", *plain]) == 0
    assert "cells are scored by one side only" in capsys.readouterr().err
    with pytest.raises(CrossValError, match="share no cell"):
        gap({"pooled": {"cells": {"a": [3, 1, 1.0]}}}, {"pooled": {"cells": {"b": [3, 1, 1.0]}}})
    with pytest.raises(CrossValError, match="cell a has 3 images in one"):
        gap({"pooled": {"cells": {"a": [3, 1, 1.0]}}}, {"pooled": {"cells": {"a": [4, 1, 1.0]}}})
