"""jobs.compare trains and scores variants under one config and writes the comparison table."""

from __future__ import annotations

import json
from pathlib import Path

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
