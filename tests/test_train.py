"""Training: typed config, the plain loop and feature cache, and real Ray Train runs on CPU.

Runs use the tiny variant on shards ingested from the committed sample, 2 gloo workers on
the session's local Ray, and the session's real S3 server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmodel import storage
from cellmodel.config import ConfigError, TrainConfig, load_config
from cellmodel.models import build_model, load_checkpoint
from cellmodel.train import (
    CachedForward,
    PhaseTrainer,
    build_cache,
    make_loss,
    run_local,
    run_training,
)
from cellmodel.train.history import read_history
from cellmodel.train.trainer import lr_factor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
CPU = torch.device("cpu")


# -- config ---------------------------------------------------------------------------------
def test_config_files_parse_and_overrides_apply():
    paper = load_config(CONFIGS / "paper.toml")
    assert paper.model.name == "xception_bilstm" and paper.build_model_config().input_size == (
        3,
        240,
        320,
    )
    assert (paper.phase1.epochs, paper.phase2.epochs) == (100, 70)
    assert (paper.phase1.optimizer, paper.phase2.optimizer, paper.phase2.lr) == (
        "rmsprop",
        "adam",
        1e-4,
    )
    assert paper.scaling.use_gpu and paper.run.name == "paper"
    quick = load_config(
        CONFIGS / "quickstart.toml",
        ["model.name=resnet50", "phase1.epochs=3", "model.overrides.input_size=[3, 120, 160]",
         "loss.label_smoothing=0"],
    )  # fmt: skip
    assert quick.model.name == "resnet50" and quick.phase1.epochs == 3
    assert quick.build_model_config().input_size == (3, 120, 160)
    assert quick.loss.label_smoothing == 0.0 and isinstance(quick.loss.label_smoothing, float)
    # The saved form reads back to an equal config.
    assert TrainConfig.from_toml(quick.to_toml()) == quick


@pytest.mark.parametrize(
    "override, words",
    [
        ("phase1.epoch=3", ["phase1.epoch", "known"]),
        ("phase1.epochs=three", ["phase1.epochs", "int"]),
        ("phase2.optimizer=lbfgs", ["phase2.optimizer", "rmsprop"]),
        ("scaling.num_workers=0", ["scaling.num_workers"]),
        ("nonsense", ["section.key=value"]),
    ],
)
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "quickstart.toml", [override])
    for w in words:
        assert w in str(e.value)


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    from jobs.train import main

    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope.toml" in err and len(err.splitlines()) == 1
    cfg = CONFIGS / "quickstart.toml"
    assert main(["--config", str(cfg), f"data.uri={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.json" in err and len(err.splitlines()) == 1
    assert main(["--config", str(cfg), "model.name=no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err


# -- plain loop and feature cache -------------------------------------------------------------
def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 120, 160, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_cached_forward_matches_the_model_and_phase1_freezes_the_cnn():
    torch.manual_seed(0)
    model = build_model("tiny_bilstm")
    model.freeze_cnn()
    x, y = _images()
    cache = build_cache(model, [(x[:12], y[:12]), (x[12:], y[12:])], device=CPU)
    assert len(cache) == 24 and cache.feats.shape == (24, model.cnn_dim)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        got = CachedForward(model)(cache.feats, cache.gray)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # One cached phase-1 epoch trains the RNN and head and leaves every CNN tensor as it was.
    cnn_before = {k: v.clone() for k, v in model.cnns.state_dict().items()}
    rnn_before = model.rnn.weight_hh_l0.detach().clone()
    cfg = load_config(CONFIGS / "quickstart.toml")
    trainer = PhaseTrainer(model, cfg.phase1, cfg, device=CPU, steps_per_epoch=3)
    trainer.build_cache([(x[:12], y[:12]), (x[12:], y[12:])], [(x, y)])
    first = trainer.train_epoch(trainer.train_cache.batches(8, shuffle=True))
    for _ in range(15):
        last = trainer.train_epoch(trainer.train_cache.batches(8, shuffle=True, seed=1))
    for k, v in model.cnns.state_dict().items():
        assert torch.equal(v, cnn_before[k]), k
    assert not torch.equal(model.rnn.weight_hh_l0, rnn_before)
    assert last["loss"] < first["loss"] and first["n"] == 24


def test_cached_and_uncached_epochs_compute_the_same_loss():
    x, y = _images(16, seed=3)
    losses = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny_bilstm")
        cfg = load_config(CONFIGS / "quickstart.toml", [f"phase1.feature_cache={str(cached).lower()}",
                          "phase1.optimizer=sgd", "phase1.lr=0.1"])  # fmt: skip
        trainer = PhaseTrainer(model, cfg.phase1, cfg, device=CPU, steps_per_epoch=2)
        data = [(x[:8], y[:8]), (x[8:], y[8:])]
        if cached:
            trainer.build_cache(data, [(x, y)])
        torch.manual_seed(1)  # same dropout masks in both paths
        batches = trainer.train_cache.batches(8) if cached else data
        tr = trainer.train_epoch(batches)
        ev = trainer.evaluate(trainer.val_cache.batches(16) if cached else [(x, y)])
        losses.append((tr["loss"], ev["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_cosine_schedule_warms_up_then_decays():
    cfg = load_config(CONFIGS / "quickstart.toml", ["phase2.schedule=cosine",
                      "phase2.warmup_epochs=1", "phase2.epochs=4", "phase2.min_lr_ratio=0.1"])  # fmt: skip
    f = lr_factor(cfg.phase2, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.01) and f(5) < f(10) == pytest.approx(1.0)
    assert f(10) > f(25) > f(39) >= 0.1 and f(40) == pytest.approx(0.1)


def test_ema_weights_are_evaluated_and_saved(tmp_path):
    from cellmodel.train.trainer import write_epoch_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny_bilstm")
    cfg = load_config(CONFIGS / "quickstart.toml", ["phase2.ema_decay=0.9", "phase2.lr=1e-2"])
    trainer = PhaseTrainer(model, cfg.phase2, cfg, device=CPU, steps_per_epoch=3)
    x, y = _images(24)
    trainer.train_epoch([(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)])
    ema, raw = trainer.save_model, trainer.model
    assert ema is not raw and not torch.equal(ema.fc.weight, raw.fc.weight)
    state = {"epoch": 0, "phase": 2, "phase_epoch": 0, "history": []}
    write_epoch_checkpoint(str(tmp_path), trainer, {"val_loss": 1.0}, state, cfg, {})
    saved, _ = load_checkpoint(str(tmp_path))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[k], v, msg=k)
    # Evaluation reads the EMA weights too: the same loss as the EMA module by hand.
    ev = trainer.evaluate([(x, y)])
    with torch.no_grad():
        ema.eval()
        ref = make_loss(0.1)(ema(x), y).item() * 24
    assert ev["loss"] == pytest.approx(ref, rel=1e-5)


def test_batch_augment_keeps_shape_and_changes_pixels():
    from cellmodel.train.batch_aug import BatchAugment

    cfg = load_config(CONFIGS / "quickstart.toml", ["augment.flips=true", "augment.scale=[0.9, 1.1]",
                      "augment.translate=0.05", "augment.stain=0.1", "augment.saturation=0.2"])  # fmt: skip
    pre = build_model("tiny_bilstm").cfg.preprocessing()
    aug = BatchAugment(cfg.augment, pre["mean"], pre["std"])
    x, _ = _images(8)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)
    off = BatchAugment(load_config(CONFIGS / "quickstart.toml").augment, pre["mean"], pre["std"])
    assert off(x) is x


def test_mixup_and_cutmix_blend_images_and_targets_as_the_loss_says():
    from cellmodel.train.batch_aug import BatchAugment

    pre = build_model("tiny_bilstm").cfg.preprocessing()
    x, y = _images(8)
    y = torch.arange(8) % 4

    def aug(*overrides):
        cfg = load_config(CONFIGS / "quickstart.toml", list(overrides))
        return BatchAugment(cfg.augment, pre["mean"], pre["std"])

    # Off (the default) or never drawn: the batch passes untouched.
    assert aug().mix(x, y)[1] is None and aug().mix(x, y)[0] is x
    assert aug("augment.mixup=0.4", "augment.mix_prob=0").mix(x, y)[1] is None
    # Mixup: every image is lam of itself plus (1 - lam) of the image whose label it is given.
    out, y2, lam = aug("augment.mixup=0.4").mix(x, y, torch.Generator().manual_seed(0))
    assert 0 < lam < 1 and out.shape == x.shape and y2 is not None
    for i in range(8):
        j = [k for k in range(8) if y[k] == y2[i] and torch.allclose(
            out[i], lam * x[i] + (1 - lam) * x[k], atol=1e-5)]  # fmt: skip
        assert j, i
    # Cutmix: one box of each image comes from its partner; lam is the share left unpasted.
    out, y2, lam = aug("augment.cutmix=1.0").mix(x, y, torch.Generator().manual_seed(3))
    changed = (out != x).any(dim=1)  # (N, H, W): pixels taken from another image
    h, w = x.shape[-2:]
    for i in range(8):
        if y2[i] == y[i] and torch.equal(out[i], x[i]):
            continue  # paired with an identical-label image that happens to match
        rows, cols = changed[i].any(1).nonzero(), changed[i].any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert float(box) <= (1 - lam) * h * w + 1e-6
    assert 0 < lam < 1
    # The trainer's loss on a mixed batch is the same blend of the two targets' losses.
    import copy

    torch.manual_seed(0)
    model = build_model("tiny_bilstm")
    for m in model.modules():  # no dropout, so the loss can be recomputed by hand
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    before = copy.deepcopy(model)
    cfg = load_config(
        CONFIGS / "quickstart.toml",
        ["augment.mixup=0.4", "phase1.feature_cache=false", "phase1.freeze_cnn=false"],
    )
    trainer = PhaseTrainer(model, cfg.phase1, cfg, device=CPU, steps_per_epoch=1)
    calls = []
    real_mix = trainer.augment.mix
    trainer.augment.mix = lambda xx, yy: calls.append(real_mix(xx, yy)) or calls[-1]
    got = trainer.train_epoch([(x, y)])["loss"] / 8
    mixed, other, lam = calls[0]
    assert other is not None
    with torch.no_grad():
        logits = before.train()(mixed)
        want = lam * make_loss(0.1)(logits, y) + (1 - lam) * make_loss(0.1)(logits, other)
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ConfigError, match="augment.mixup"):
        load_config(CONFIGS / "quickstart.toml", ["augment.mixup=-1"])


def test_memory_batches_decode_the_split_before_the_first_step_and_reshuffle_it():
    from cellmodel.train import MemoryBatches

    served = []

    def source(seed):  # 10 rows in batches of 4, as a shard reader yields them
        for i in range(0, 10, 4):
            served.append(i)
            y = torch.arange(i, min(i + 4, 10))
            yield y.view(-1, 1).to(torch.uint8), y

    mem = MemoryBatches(source, lambda: iter(()), batch_size=4)
    epoch0 = mem.train(seed=1)
    first = next(epoch0)
    assert served == [0, 4, 8]  # the whole split was read before the first batch came out
    order0 = torch.cat([first[1]] + [y for _, y in epoch0]).tolist()
    order1 = [v for _, y in mem.train(seed=2) for v in y.tolist()]
    assert served == [0, 4, 8]  # never read again
    assert sorted(order0) == sorted(order1) == list(range(10))
    assert order0 != list(range(10)) and order0 != order1  # each epoch a seeded permutation
    assert order0 == [v for _, y in MemoryBatches(source, lambda: iter(()), 4).train(1)
                      for v in y.tolist()]  # fmt: skip
    stream = MemoryBatches(source, lambda: iter(()), batch_size=4, keep=False)
    served.clear()
    assert [v for _, y in stream.train(seed=1) for v in y.tolist()] == list(range(10))
    list(stream.train(seed=2))
    assert served == [0, 4, 8, 0, 4, 8]  # keep=False streams every epoch


def test_local_run_from_random_weights_learns_in_every_phase(local_shards, tmp_path):
    """The from-scratch recipe: the CNN trains in phase 1 too, so both phases lower the loss."""
    cfg = _cfg(local_shards, str(tmp_path), "scratch", "phase1.epochs=4", "phase2.epochs=3",
               "phase1.freeze_cnn=false", "phase1.feature_cache=false", "phase1.optimizer=adamw",
               "phase1.lr=3e-3", "phase1.schedule=cosine", "phase1.warmup_epochs=1",
               "phase2.lr=1e-3", "phase2.ema_decay=0.9", "augment.flips=true")  # fmt: skip
    result = run_local(cfg, device="cpu")
    hist = result.history
    assert [r["phase"] for r in hist] == [1] * 4 + [2] * 3
    for phase in (1, 2):
        losses = [r["train_loss"] for r in hist if r["phase"] == phase]
        assert min(losses[1:]) < losses[0], (phase, losses)
    assert hist[-1]["ema"] and not hist[0]["ema"]
    meta = json.loads(Path(result.model_uri, "checkpoint.json").read_text())
    assert meta["data"]["classes"] == meta["classes"] and meta["data"]["uri"] == local_shards
    # The same name again resumes: nothing left to run, the history is unchanged.
    again = run_local(cfg, device="cpu")
    assert again.history == hist


def test_a_final_fit_trains_on_joined_splits_and_says_validation_is_in_sample(
    local_shards, tmp_path, caplog
):
    from cellmodel.data.dataset import (
        DatasetNotFoundError,
        iter_rows,
        load_manifest,
        shard_uris,
        split_rows,
    )

    manifest = load_manifest(local_shards)
    rows = {s: manifest["splits"][s]["rows"] for s in ("train", "val")}
    both = shard_uris(local_shards, "train+val")
    assert both == shard_uris(local_shards, "train") + shard_uris(local_shards, "val")
    assert split_rows(manifest, "train+val") == rows["train"] + rows["val"]
    assert sum(1 for _ in iter_rows(local_shards, "train+val", ["label"])) == sum(rows.values())
    with pytest.raises(DatasetNotFoundError, match="'tset'"):
        shard_uris(local_shards, "train+tset")
    with pytest.raises(ConfigError, match="'tset'"):
        run_local(_cfg(local_shards, str(tmp_path), "bad", "data.train_split=train+tset"))
    cfg = _cfg(local_shards, str(tmp_path), "final", "data.train_split=train+val",
               "phase1.epochs=1")  # fmt: skip
    with caplog.at_level("WARNING"):
        result = run_local(cfg, device="cpu")
    assert "in-sample" in caplog.text
    assert result.history[0]["train_n"] == rows["train"] + rows["val"]


def test_mlflow_tracking_logs_params_and_every_epoch(local_shards, tmp_path):
    import mlflow

    store = tmp_path / "mlruns"
    cfg = _cfg(local_shards, str(tmp_path / "runs"), "tracked", "phase1.epochs=2",
               "phase2.epochs=1", "tracking.mlflow=true", f"tracking.uri={json.dumps(str(store))}")  # fmt: skip
    run_local(cfg, device="cpu")
    mlflow.set_tracking_uri("file://" + str(store))  # the tracker allowed the file store
    (run,) = mlflow.search_runs(experiment_names=["cellmodel"], output_format="list")
    assert run.data.params["phase1.epochs"] == "2" and run.data.tags["cellmodel_run"] == "tracked"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [0, 1, 2]


# -- Ray Train runs ---------------------------------------------------------------------------
def _cfg(data_uri: str, storage_uri: str, name: str, *extra: str) -> TrainConfig:
    return load_config(
        CONFIGS / "quickstart.toml",
        [f"data.uri={json.dumps(data_uri)}", f"run.storage={json.dumps(storage_uri)}",
         f"run.name={name}", "phase1.epochs=2", "phase2.epochs=0", *extra],
    )  # fmt: skip


def _epochs_started(run_dir: str) -> list[int]:
    fs, path = storage.get_fs(storage.join(run_dir, "events"))
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("epoch-"))


@pytest.mark.slow
def test_two_workers_from_s3_shards_to_s3_checkpoints(ray_session, s3_bucket):
    from cellmodel.data.dataset import iter_split
    from cellmodel.data.ingest import ingest

    shards = f"{s3_bucket}/shards"
    ingest(str(ROOT / "data/sample/crops"), shards, target_per_class=32, progress=False, workers=1)
    cfg = _cfg(shards, f"{s3_bucket}/runs", "s3run", "phase1.epochs=5", "phase1.lr=1e-2",
               "phase2.epochs=1")  # fmt: skip
    result = run_training(cfg)

    hist = result.history
    assert [r["epoch"] for r in hist] == list(range(6))
    assert [r["phase"] for r in hist] == [1] * 5 + [2]
    assert all(r["train_n"] == hist[0]["train_n"] > 0 for r in hist)
    assert min(r["train_loss"] for r in hist[1:]) < hist[0]["train_loss"]  # loss falls
    # Checkpoints in S3: the best and the last are kept, plus the final model and summary.
    fs, _ = storage.get_fs(s3_bucket)
    run = result.run_dir
    assert run.startswith("s3://")
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(run[5:]) if "epoch-" in p)
    assert "epoch-0005" in kept and 1 <= len(kept) <= 2
    for name in (
        "model/model.safetensors",
        "summary.json",
        "history.csv",
        "history.png",
        "config.toml",
    ):
        assert fs.exists(storage.join(run, name)[5:]), name
    best = min(hist, key=lambda r: r["val_loss"])
    assert result.metrics["epoch"] == best["epoch"]
    assert result.best_checkpoint.endswith(f"epoch-{best['epoch']:04d}")

    # Reloading the best checkpoint reproduces its validation metrics.
    model, meta = load_checkpoint(result.model_uri)
    assert meta["metrics"]["epoch"] == best["epoch"]
    batches = ((torch.from_numpy(x), torch.from_numpy(y))
               for x, y in iter_split(shards, "val", model.cfg, batch_size=16))  # fmt: skip
    trainer = PhaseTrainer(model, cfg.phase2, cfg, device=CPU, steps_per_epoch=1)
    ev = trainer.evaluate(batches)
    assert ev["n"] == best["val_n"]
    assert ev["loss"] / ev["n"] == pytest.approx(best["val_loss"], abs=1e-4)
    assert ev["correct"] / ev["n"] == pytest.approx(best["val_acc"])


@pytest.mark.slow
def test_killed_worker_recovery_phase1_cnn_and_resume_by_name(ray_session, local_shards, tmp_path):
    # Worker rank 1 exits hard (os._exit) after its first step of epoch 1, once.
    storage_uri = str(tmp_path / "runs")
    crash = ("run.seed=7", "phase1.epochs=3", "debug.crash_at_epoch=1", "debug.crash_rank=1",
             "run.max_failures=1")  # fmt: skip
    first = run_training(_cfg(local_shards, storage_uri, "resume", *crash))
    assert storage.exists(storage.join(first.run_dir, "events", "crash-injected"))
    # Every epoch reported once, in order; only the interrupted epoch was started twice.
    assert [r["epoch"] for r in first.history] == [0, 1, 2]
    assert _epochs_started(first.run_dir) == [0, 1, 1, 2]

    # Phase 1 leaves every CNN tensor (weights and batch-norm statistics) bit-identical.
    torch.manual_seed(7)
    init = build_model("tiny_bilstm")
    last, _ = load_checkpoint(first.last_checkpoint)
    for k, v in init.cnns.state_dict().items():
        assert torch.equal(last.cnns.state_dict()[k], v), k
    assert not torch.equal(last.fc.weight, init.fc.weight)

    # The same name again, with phase 2 added: it resumes, epochs 0-2 are not run again.
    second = run_training(_cfg(local_shards, storage_uri, "resume", *crash, "phase2.epochs=1"))
    assert [(r["epoch"], r["phase"]) for r in second.history] == [(0, 1), (1, 1), (2, 1), (3, 2)]
    assert _epochs_started(second.run_dir) == [0, 1, 1, 2, 3]
    thawed, _ = load_checkpoint(second.last_checkpoint)
    assert not torch.equal(thawed.cnns[0].conv1[0].weight, init.cnns[0].conv1[0].weight)
    assert read_history(second.run_dir) == second.history

    # A different model under the same name is refused instead of mixing weights.
    with pytest.raises(ConfigError, match="another run.name"):
        run_training(_cfg(local_shards, storage_uri, "resume", "model.name=resnet50"))
