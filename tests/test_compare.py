"""jobs.compare trains and scores variants under one config and writes the comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellmodel.data.ingest import ingest
from cellmodel.models import load_checkpoint
from jobs import compare

ROOT = Path(__file__).resolve().parents[1]


def test_compare_trains_scores_and_reuses_finished_runs(ray_session, tmp_path, capsys):
    shards = str(tmp_path / "shards")
    ingest(str(ROOT / "data/sample/crops"), shards, target_per_class=16, progress=False, workers=1)
    out = tmp_path / "compare"
    argv = [
        "--config", str(ROOT / "jobs/configs/quickstart.toml"),
        "--models", "tiny_bilstm",
        "--out", str(out),
        f"run.storage={tmp_path / 'runs'}",
        f"data.uri={shards}",
        "phase1.epochs=1",
        "phase2.epochs=1",
        "scaling.num_workers=1",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    (row,) = result["summary"]
    (run,) = result["runs"]
    assert row["model"] == "tiny_bilstm" and row["runs"] == 1
    assert 0.0 <= row["accuracy_mean"] <= 100.0
    assert run["run"] == "quickstart-tiny_bilstm-s0"
    model, meta = load_checkpoint(run["checkpoint"])
    assert meta["model_name"] == "tiny_bilstm"
    # the per-run evaluation report sits next to the table
    assert (out / run["run"] / "report.md").is_file()
    md = (out / "comparison.md").read_text()
    assert "| tiny_bilstm | 1 |" in md and "paper accuracy" in md

    capsys.readouterr()
    assert compare.main(argv) == 0  # a finished run is scored again, not retrained
    assert "already trained" in capsys.readouterr().out
    again = json.loads((out / "comparison.json").read_text())
    assert again["runs"][0]["accuracy"] == run["accuracy"]


def test_compare_rejects_unknown_models(capsys):
    argv = ["--config", str(ROOT / "jobs/configs/quickstart.toml"), "--models", "vgg16"]
    assert compare.main(argv) == 2
    assert "unknown model" in capsys.readouterr().err


def test_compare_checks_every_variant_before_training_any(tmp_path, capsys):
    """Table 1 at proxy scale (96x72) would train the models that fit, then fail on
    InceptionV3, which needs 75 pixels a side: refused up front, naming the variant and the
    size to give, with nothing trained."""
    argv = [
        "--config", str(ROOT / "jobs/configs/cpu_proxy.toml"), "--local",
        "--models", "xception_bilstm", "inception_v3_bilstm",
        "--out", str(tmp_path / "compare"), f"run.storage={tmp_path / 'runs'}",
    ]  # fmt: skip
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert "variant 'inception_v3_bilstm'" in err and "at least 75x75" in err
    assert "input_size=[3, 75, 96]" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "compare").exists()


def test_compare_variants_locally_in_parallel_report_mean_and_spread(tmp_path):
    """A recipe ablation: two named override sets x two seeds, trained in-process, two at a
    time; each row has the mean and spread over its seeds, per image and per source."""
    shards = str(tmp_path / "shards")
    ingest(str(ROOT / "data/sample/crops"), shards, target_per_class=16, progress=False,
           workers=1, group="file")  # fmt: skip
    out = tmp_path / "compare"
    argv = [
        "--config", str(ROOT / "jobs/configs/quickstart.toml"),
        "--variant", "base=",
        "--variant", 'ema="phase2.ema_decay=0.9 augment.flips=true"',
        "--seeds", "0", "1", "--local", "--parallel", "2", "--tta", "--ensemble",
        "--out", str(out),
        f"run.storage={tmp_path / 'runs'}", f"data.uri={shards}",
        "phase1.epochs=1", "phase2.epochs=1",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["model"]: r for r in result["summary"]}
    assert set(rows) == {"base", "ema"} and all(r["runs"] == 2 for r in rows.values())
    assert all(r["accuracy_std"] >= 0 and r["tta_accuracy_mean"] is not None for r in rows.values())
    runs = {(r["model"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {("base", 0), ("base", 1), ("ema", 0), ("ema", 1)}
    # every source cell weighing the same, carried per run and as mean and spread per row
    assert all(0 <= r["cell_balanced_accuracy"] <= 1 for r in runs.values())
    for name, row in rows.items():
        mine = [runs[(name, s)]["cell_balanced_accuracy"] * 100 for s in (0, 1)]
        assert row["cell_balanced_accuracy_mean"] == pytest.approx(sum(mine) / 2)
    assert "cell-balanced %" in (out / "comparison.md").read_text()
    # each run's interval over the source cells brackets its accuracy; the row keeps the widest
    for name, row in rows.items():
        cis = [runs[(name, s)]["accuracy_interval"] for s in (0, 1)]
        assert all(lo <= runs[(name, s)]["accuracy"] <= hi for s, (lo, hi) in zip((0, 1), cis))
        assert row["accuracy_interval_widest"] == pytest.approx(
            max(hi - lo for lo, hi in cis) * 100
        )
    assert "interval over its source cells" in (out / "comparison.md").read_text()
    # the variant against the reference on the same cells, resampled in pairs
    (gap,) = result["gaps"]
    assert (gap["model"], gap["reference"]) == ("ema", "base")
    assert gap["cells"] == runs[("base", 0)]["n_sources"]
    assert gap["accuracy"]["gap"] == pytest.approx(
        rows["ema"]["accuracy_mean"] - rows["base"]["accuracy_mean"]
    )
    for key in ("accuracy", "cell_balanced_accuracy", "vote_accuracy"):
        lo, hi = gap[key]["interval"]
        assert lo <= gap[key]["gap"] <= hi
    assert "## Gaps to base on the same cells" in (out / "comparison.md").read_text()
    assert runs[("ema", 0)]["checkpoint"] != runs[("base", 0)]["checkpoint"]
    _, meta = load_checkpoint(runs[("ema", 1)]["checkpoint"])
    assert meta["metrics"]["ema"] is True
    ens = {r["model"]: r for r in result["ensembles"]}  # each variant's two seeds as one model
    assert set(ens) == {"base", "ema"} and all(r["seeds"] == [0, 1] for r in ens.values())
    assert all(0 <= r["accuracy"] <= 1 and r["tta_accuracy"] is not None for r in ens.values())
    assert "## Seed ensembles" in (out / "comparison.md").read_text()


def test_compare_scores_the_last_epoch_when_asked(tmp_path):
    """``--epoch last`` scores each run's final weights (nothing chosen on the split); the same
    finished runs scored with the default are scored at their epoch of lowest validation loss."""
    shards = str(tmp_path / "shards")
    ingest(str(ROOT / "data/sample/crops"), shards, target_per_class=16, progress=False,
           workers=1, group="file")  # fmt: skip
    common = [
        "--config", str(ROOT / "jobs/configs/quickstart.toml"), "--variant", "base=", "--local",
        f"run.storage={tmp_path / 'runs'}", f"data.uri={shards}",
        "phase1.epochs=2", "phase2.epochs=1",
    ]  # fmt: skip
    assert compare.main([*common, "--epoch", "last", "--out", str(tmp_path / "last")]) == 0
    (run,) = json.loads((tmp_path / "last" / "comparison.json").read_text())["runs"]
    summary = json.loads((tmp_path / "runs" / run["run"] / "summary.json").read_text())
    assert run["scored_epoch"] == "last" and run["last_epoch"] == 2
    assert run["checkpoint"] == summary["last_checkpoint"]
    assert run["checkpoint"].rstrip("/").endswith("epoch-0002")
    _, meta = load_checkpoint(run["checkpoint"])
    assert meta["metrics"]["epoch"] == 2
    assert "last epoch (nothing chosen" in (tmp_path / "last" / "comparison.md").read_text()

    assert compare.main([*common, "--out", str(tmp_path / "best")]) == 0  # reused, not retrained
    (best,) = json.loads((tmp_path / "best" / "comparison.json").read_text())["runs"]
    assert best["scored_epoch"] == "best" and best["checkpoint"] == summary["model_uri"]
    assert best["best_epoch"] == summary["best_metrics"]["epoch"]
    assert "lowest validation loss" in (tmp_path / "best" / "comparison.md").read_text()
