"""Pretraining without labels: the contrastive loss, what a run may read, and its weights
travelling into a training run. Runs use the tiny variant on shards ingested from the
committed sample (traced to the committed sample slides)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmodel.config import ConfigError, load_config
from cellmodel.data.dataset import iter_rows
from cellmodel.models import build_from_config, load_pretrained
from cellmodel.train import run_local
from cellmodel.train.pretrain import load_pretrain_config, nt_xent, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
SLIDES = ROOT / "data" / "sample" / "slides"
CROPS = ROOT / "data" / "sample" / "crops"


@pytest.fixture(scope="module")
def traced_shards(tmp_path_factory):
    """The sample crops traced to the sample slides and split by slide."""
    from cellmodel.data.ingest import ingest

    out = str(tmp_path_factory.mktemp("ssl") / "traced")
    with pytest.warns(UserWarning):  # the sample has one neutrophil cell: nothing to validate
        ingest(str(CROPS), out, slides=str(SLIDES), group="slides", target_per_class=24,
               progress=False, workers=1)  # fmt: skip
    return out


def _cfg(data_uri: str, storage_uri: str, name: str, *extra: str):
    return load_pretrain_config(
        CONFIGS / "pretrain.toml",
        [f"data.uri={json.dumps(data_uri)}", f"run.storage={json.dumps(storage_uri)}",
         f"run.name={name}", "model.name=tiny_bilstm", "model.overrides={}",
         "ssl.batch_size=32", "ssl.channels_last=off", *extra],
    )  # fmt: skip


def test_nt_xent_matches_the_formula_and_finds_twins():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g)
    loss, _ = nt_xent(z, 0.5)
    # By hand: for view i, -log(exp(s(i, twin)) / sum over j != i of exp(s(i, j))).
    u = (z / z.norm(dim=1, keepdim=True)).tolist()
    total = 0.0
    for i in range(6):
        twin = (i + 3) % 6
        s = [sum(a * b for a, b in zip(u[i], u[j])) / 0.5 for j in range(6)]
        total += -s[twin] + math.log(sum(math.exp(s[j]) for j in range(6) if j != i))
    assert float(loss) == pytest.approx(total / 6, rel=1e-5)
    # Twins that are the same vector, other images orthogonal: every twin is found.
    base = torch.eye(4)
    loss_same, acc_same = nt_xent(torch.cat([base, base]), 0.2)
    loss_swapped, acc_swapped = nt_xent(torch.cat([base, base.roll(1, 0)]), 0.2)
    assert acc_same == 1.0 and acc_swapped == 0.0 and float(loss_same) < float(loss_swapped)


def test_pretraining_learns_reads_no_held_out_slide_and_its_weights_start_a_run(
    traced_shards, tmp_path
):
    cfg = _cfg(traced_shards, str(tmp_path), "ssl", "ssl.epochs=6", "ssl.lr=3e-3",
               f"slides.uri={json.dumps(str(SLIDES))}", "slides.windows_per_slide=2")  # fmt: skip
    record = run_pretrain(cfg, device="cpu")
    hist = record["history"]
    assert len(hist) == 6 and min(h["loss"] for h in hist[2:]) < hist[0]["loss"], hist
    # Held out: every slide a validation or unassigned row was cut from, and only those.
    held = set()
    for split in ("val", "unassigned"):
        held |= {p for r in iter_rows(traced_shards, split, ["source_id"])
                 for p in (r["source_id"] or "").split("+") if p}  # fmt: skip
    listed = {p.stem for p in SLIDES.rglob("*.jpg")}
    sl = record["slides"]
    assert held & listed and set(sl["excluded"]) == held & listed
    assert sl["read"] == sl["listed"] - len(sl["excluded"])
    assert sl["windows"] == 2 * sl["read"]
    assert sl["train_background_from"] == "manifest" and len(sl["light_offset"]) == 3
    assert record["images"] == record["data"]["crops"] + sl["windows"]
    assert record["data"]["crops"] == sum(1 for _ in iter_rows(traced_shards, "train", ["id"]))
    saved = json.loads((tmp_path / "ssl" / "pretrain.json").read_text())
    assert saved["history"] == hist
    # The weights file loads into a fresh model's CNN branch, tensor for tensor.
    (w,) = record["weights"]
    from safetensors.torch import load_file

    tensors = load_file(w["uri"])
    train_cfg = load_config(
        CONFIGS / "quickstart.toml",
        [f"data.uri={json.dumps(traced_shards)}", f"run.storage={json.dumps(str(tmp_path))}",
         "run.name=from_ssl", "phase1.epochs=1", "phase2.epochs=0",
         f"model.pretrained={json.dumps([w['uri']])}"],
    )  # fmt: skip
    fresh = build_from_config(train_cfg.build_model_config(["a", "b", "c", "d"]))
    load_pretrained(fresh, [w["uri"]])
    for k, v in fresh.cnns[0].state_dict().items():
        assert torch.equal(v, tensors[k]), k
    # A training run starts from them and records where they came from.
    result = run_local(train_cfg, device="cpu")
    meta = json.loads(Path(result.model_uri, "checkpoint.json").read_text())
    assert w["uri"] in json.dumps(meta)
    # The same run name again is refused, not overwritten.
    with pytest.raises(ConfigError, match="already holds"):
        run_pretrain(cfg, device="cpu")


def test_slides_are_refused_when_the_held_out_slides_are_unknown(tmp_path):
    from cellmodel.data.ingest import ingest

    data = str(tmp_path / "by_file")
    with pytest.warns(UserWarning, match="source cells unknown"):
        ingest(str(CROPS), data, target_per_class=8, progress=False, workers=1, group="file")
    cfg = _cfg(data, str(tmp_path), "ssl", "ssl.epochs=1",
               f"slides.uri={json.dumps(str(SLIDES))}")  # fmt: skip
    with pytest.raises(ConfigError, match="slides.exclude"):
        run_pretrain(cfg, device="cpu")
    assert not (tmp_path / "ssl").exists()
    # Named by hand, they are left out and the rest is read.
    cfg = _cfg(data, str(tmp_path), "ssl", "ssl.epochs=1", "slides.windows_per_slide=1",
               f"slides.uri={json.dumps(str(SLIDES))}", 'slides.exclude=["BloodImage_00008"]')  # fmt: skip
    record = run_pretrain(cfg, device="cpu")
    assert record["slides"]["excluded"] == ["BloodImage_00008"]
    assert record["slides"]["windows"] == record["slides"]["listed"] - 1


def test_a_dataset_without_a_recorded_light_level_has_it_measured(traced_shards, tmp_path):
    """Datasets ingested before the level was recorded: the windows are still relit, to the
    level measured on the training split itself (what ``python -m cellmodel.data.light DATA``
    reports; within a few levels of what the ingest records from all the source crops)."""
    import shutil

    from cellmodel.data.light import dataset_images, estimate_dataset_background

    old = tmp_path / "old"
    shutil.copytree(traced_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    recorded = manifest.pop("light")["background_rgb"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = _cfg(str(old), str(tmp_path), "ssl", "ssl.epochs=1", "slides.windows_per_slide=1",
               f"slides.uri={json.dumps(str(SLIDES))}")  # fmt: skip
    sl = run_pretrain(cfg, device="cpu")["slides"]
    assert sl["train_background_from"].startswith("measured")
    cli = estimate_dataset_background(dataset_images(str(old), 64, 0), n=64)["background_rgb"]
    assert sl["train_background_rgb"] == cli
    assert np.allclose(cli, recorded, atol=5.0)
    assert sl["light_offset"] is not None


def test_cli_reports_mistakes_in_one_line(tmp_path, capsys):
    from jobs.pretrain import main

    assert main(["--config", str(CONFIGS / "pretrain.toml"), "ssl.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "ssl.epoch" in err and len(err.splitlines()) == 1
    rc = main(["--config", str(CONFIGS / "pretrain.toml"), "views.mixup=0.2",
               f"data.uri={json.dumps(str(tmp_path))}"])  # fmt: skip
    assert rc == 2 and "views.mixup" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "pretrain.toml"), "--print-config"]) == 0
    assert "[ssl]" in capsys.readouterr().out


def test_views_of_one_image_differ_but_keep_its_shape():
    from cellmodel.train.batch_aug import BatchAugment

    cfg = load_pretrain_config(CONFIGS / "pretrain.toml")
    aug = BatchAugment(cfg.views, (0.5,) * 3, (0.25,) * 3)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 3, 24, 32)).astype("float32"))
    g = torch.Generator().manual_seed(0)
    a, b = aug(x, g), aug(x, g)
    assert a.shape == x.shape and not torch.allclose(a, b)
