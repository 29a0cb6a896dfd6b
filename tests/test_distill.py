"""Knowledge distillation: the loss, the teachers' view of the student's batch, a real run
on the committed sample, and the guard against teachers that saw the validation cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellmodel.config import ConfigError, TrainConfig, load_config
from cellmodel.data.transforms import normalize
from cellmodel.models import build_model, save_checkpoint
from cellmodel.train.distill import Teachers, check_teachers, distill_loss
from cellmodel.train.local import run_local

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


def test_distill_loss_is_the_tempered_kl_divergence_by_hand():
    torch.manual_seed(0)
    s, t_logits, t = torch.randn(6, 4), torch.randn(6, 4), 3.0
    p = torch.softmax(t_logits / t, 1)
    by_hand = t * t * (p * (p.log() - torch.log_softmax(s / t, 1))).sum(1).mean()
    assert distill_loss(s, p, t).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Zero when the student answers as the teacher does, positive otherwise; its gradient
    # moves the student's distribution toward the teacher's.
    assert distill_loss(t_logits, p, t).item() == pytest.approx(0.0, abs=1e-6)
    s = s.clone().requires_grad_(True)
    before = distill_loss(s, p, t)
    before.backward()
    with torch.no_grad():
        after = distill_loss(s - 0.5 * s.grad, p, t)
    assert before.item() > 0 and after.item() < before.item()


def test_teachers_read_the_students_batch_with_their_own_preprocessing(tmp_path):
    """A teacher normalised and sized unlike the student answers on the student's batch as
    it does on the same pixels prepared its own way; two teachers give the mean."""
    torch.manual_seed(0)
    student = build_model("tiny_bilstm")
    a = save_checkpoint(
        build_model("tiny_bilstm", mean=(0.5,) * 3, std=(0.5,) * 3), str(tmp_path / "a")
    )
    b = save_checkpoint(build_model("tiny_bilstm", input_size=(3, 60, 80)), str(tmp_path / "b"))
    pre = student.cfg.preprocessing()
    h, w = pre["input_size"][1:]
    pixels = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8)
    x = normalize(pixels, pre)
    teachers = Teachers([a, b], pre, torch.device("cpu"))
    t = 2.0
    from cellmodel.models.checkpoint import load_checkpoint

    ma, meta_a = load_checkpoint(a)
    mb, meta_b = load_checkpoint(b)
    with torch.no_grad():
        pa = F.softmax(ma(normalize(pixels, meta_a["preprocessing"])) / t, 1)
        small = F.interpolate(
            x, size=(60, 80), mode="bilinear", align_corners=False, antialias=True
        )
        pb = F.softmax(mb(small) / t, 1)
    got = teachers.probs(x, t)
    np.testing.assert_allclose(got.numpy(), ((pa + pb) / 2).numpy(), atol=1e-5)
    assert not any(p.requires_grad for p in teachers.parameters())
    teachers.train()
    assert not teachers.members[0].training  # a training loop's .train() leaves them in eval


def _cfg(data: str, runs: str, name: str, *extra: str) -> TrainConfig:
    return load_config(
        CONFIGS / "quickstart.toml",
        [f"data.uri={json.dumps(data)}", f"run.storage={json.dumps(runs)}", f"run.name={name}",
         "phase1.epochs=2", "phase2.epochs=1", *extra],
    )  # fmt: skip


def test_a_student_learns_from_teachers_trained_without_its_validation_cells(
    local_shards, tmp_path
):
    shards = local_shards
    runs = str(tmp_path / "runs")
    one = ("phase1.epochs=1", "phase2.epochs=0")
    teachers = [
        run_local(_cfg(shards, runs, f"t{s}", f"run.seed={s}", *one), device="cpu") for s in (0, 1)
    ]
    uris = [t.model_uri for t in teachers]
    meta = json.loads(Path(uris[0], "checkpoint.json").read_text())
    assert (meta["data"]["train_split"], meta["data"]["val_split"]) == ("train", "val")
    student = _cfg(shards, runs, "student", f"distill.teachers={json.dumps(uris)}",
                   "distill.weight=0.7", "distill.temperature=3")  # fmt: skip
    result = run_local(student, device="cpu")
    hist = result.history
    assert len(hist) == 3 and all(np.isfinite(r["train_loss"]) for r in hist)
    assert min(r["train_loss"] for r in hist[1:]) < hist[0]["train_loss"]
    got = json.loads(Path(result.model_uri, "checkpoint.json").read_text())["extra"]["distill"]
    assert got == {"teachers": uris, "weight": 0.7, "temperature": 3.0, "unchecked": False}
    # Weight 0 is the plain recipe: the same seed trains to the same weights as without teachers.
    plain = run_local(_cfg(shards, runs, "plain", "run.seed=5", *one), device="cpu")
    zero = _cfg(shards, runs, "zero", "run.seed=5", *one, f"distill.teachers={json.dumps(uris)}",
                "distill.weight=0")  # fmt: skip
    zero = run_local(zero, device="cpu")
    assert [r["train_loss"] for r in zero.history] == pytest.approx(
        [r["train_loss"] for r in plain.history], rel=1e-6
    )
    # A teacher that trained on the validation split is refused before any training, and so
    # is one whose split is unknown, unless the user vouches for it.
    leaky = _cfg(shards, runs, "leaky", "data.train_split=train+val", *one)
    leaky = run_local(leaky, device="cpu").model_uri
    with pytest.raises(ConfigError, match="validation split 'val'") as e:
        run_local(_cfg(shards, runs, "s2", f"distill.teachers={json.dumps([uris[0], leaky])}"))
    assert leaky in str(e.value) and not Path(runs, "s2").exists()
    old = tmp_path / "old"
    save_checkpoint(build_model("tiny_bilstm"), str(old), data={"uri": shards})
    cfg = _cfg(shards, runs, "s3", f"distill.teachers={json.dumps([str(old)])}")
    with pytest.raises(ConfigError, match="does not record which split"):
        check_teachers(cfg, cfg.build_model_config(meta["classes"]).classes)
    cfg.distill.unchecked = True
    assert len(check_teachers(cfg, cfg.build_model_config(meta["classes"]).classes)) == 1
    # A final fit, validated in-sample anyway, may learn from a teacher fitted alike.
    final = _cfg(shards, runs, "s4", "data.train_split=train+val",
                 f"distill.teachers={json.dumps([leaky])}")  # fmt: skip
    assert len(check_teachers(final, final.build_model_config(meta["classes"]).classes)) == 1


def test_teachers_of_other_classes_or_named_twice_are_refused(tmp_path):
    four = save_checkpoint(build_model("tiny_bilstm"), str(tmp_path / "four"))
    three = save_checkpoint(build_model("tiny_bilstm", num_classes=3), str(tmp_path / "three"))
    classes = build_model("tiny_bilstm").cfg.classes
    cfg = TrainConfig.from_dict({"data": {"uri": "x"}, "distill": {"teachers": [four, three]}})
    with pytest.raises(ConfigError, match=r"teacher .*three answers over \['class_0'"):
        check_teachers(cfg, classes)
    cfg.distill.teachers = [four, four]
    with pytest.raises(ConfigError, match="names a checkpoint twice"):
        check_teachers(cfg, classes)
    cfg.distill.teachers = [str(tmp_path / "none")]
    with pytest.raises(ConfigError, match="no checkpoint at"):
        check_teachers(cfg, classes)
    with pytest.raises(ConfigError, match="distill.weight"):
        TrainConfig.from_dict({"distill": {"weight": 1.5}})
