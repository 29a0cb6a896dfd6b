"""The model family: every registered variant builds, trains, freezes and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cellmodel import CLASSES
from cellmodel.data.transforms import bytes_to_array
from cellmodel.models import (
    CheckpointError,
    WeightsError,
    build_model,
    list_models,
    load_checkpoint,
    load_pretrained,
    model_config,
    save_checkpoint,
)
from cellmodel.models.summary import count_flops, lstm_flops

PAPER_FAMILY = [
    "xception",
    "resnet50",
    "inception_v3",
    "xception_bilstm",
    "resnet50_bilstm",
    "inception_v3_bilstm",
    "xception_resnet50_bilstm",
]
ALL = list_models()


def test_registry_has_paper_family_and_tiny():
    assert set(PAPER_FAMILY) <= set(ALL)
    assert "tiny_bilstm" in ALL
    assert model_config("xception").cnn == ("legacy_xception",)
    assert model_config("xception_bilstm").input_size == (3, 240, 320)
    assert model_config("xception_resnet50_bilstm").cnn == ("legacy_xception", "resnet50")


def _batch(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.cfg.input_size, generator=g)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    m = build_model(name).train()
    x = _batch(m)
    y = m(x)
    assert y.shape == (2, 4)
    assert torch.isfinite(y).all()
    y.sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # timm-style API composes to forward
    m.eval()
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, m.num_features)
        assert torch.allclose(m.forward_head(feats), m(x), atol=1e-5)
        assert m.forward_head(feats, pre_logits=True).shape == feats.shape


@pytest.mark.parametrize("name", [n for n in ALL if model_config(n).has_rnn])
def test_fuse_with_cached_cnn_features_equals_forward(name):
    m = build_model(name).eval()
    x = _batch(m)
    with torch.no_grad():
        cached = m.forward_cnn(x)
        assert torch.allclose(m.forward_head(m.fuse(cached, x)), m(x), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_frozen_cnn_gets_no_gradient_and_keeps_weights(name):
    torch.manual_seed(0)
    m = build_model(name)
    m.freeze_cnn()
    m.train()
    assert not any(mod.training for mod in m.cnns.modules())  # BN statistics frozen too
    before = {k: v.clone() for k, v in m.cnns.state_dict().items()}
    opt = torch.optim.RMSprop([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(m(_batch(m)), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in m.cnns.parameters())
    opt.step()
    after = m.cnns.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the rest did train
    head_changed = [p for p in m.fc.parameters() if p.grad is not None]
    assert head_changed
    m.thaw_cnn()
    assert all(p.requires_grad for p in m.cnns.parameters())
    assert all(mod.training for mod in m.cnns.modules())


def _sample_batch(sample_dir: Path, cfg, per_class=6):
    xs, ys = [], []
    for label, cls in enumerate(CLASSES):
        for f in sorted((sample_dir / "crops" / cls).glob("*.jpeg"))[:per_class]:
            xs.append(bytes_to_array(f.read_bytes(), cfg))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def test_tiny_loss_falls_on_real_images(sample_dir):
    torch.manual_seed(0)
    m = build_model("tiny_bilstm").train()
    x, y = _sample_batch(sample_dir, m.cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(1)
    m = build_model(name).eval()
    uri = str(tmp_path / "ckpt")
    save_checkpoint(m, uri, metrics={"val_loss": 0.5})
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["model_name"] == name and meta["classes"] == list(CLASSES)
    assert meta["preprocessing"]["input_size"] == list(m.cfg.input_size)
    m2, meta2 = load_checkpoint(uri)
    assert meta2["metrics"] == {"val_loss": 0.5}
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = _batch(m)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_checkpoint_rebuilds_from_its_own_config(tmp_path):
    m = build_model("tiny_bilstm", rnn_hidden=8, input_size=(3, 64, 96))
    save_checkpoint(m, str(tmp_path))
    m2, _ = load_checkpoint(str(tmp_path))
    assert m2.cfg == m.cfg and m2.rnn.hidden_size == 8


def test_checkpoint_on_s3(s3_bucket):
    m = build_model("tiny_bilstm").eval()
    uri = f"{s3_bucket}/runs/a/best"
    save_checkpoint(m, uri)
    m2, meta = load_checkpoint(uri)
    assert meta["model_name"] == "tiny_bilstm"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_incomplete_checkpoint_is_refused(tmp_path):
    save_checkpoint(build_model("tiny_bilstm"), str(tmp_path))
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_backbone_weights_written_by_test_load(tmp_path, fmt):
    src = build_model("xception_bilstm")
    # An ImageNet-style file: backbone tensors under a DDP prefix plus a 1000-way classifier.
    sd = {f"module.{k}": v.clone() for k, v in src.cnns[0].state_dict().items()}
    sd["module.fc.weight"] = torch.randn(1000, 2048)
    sd["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / f"xception.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    dst = build_model("xception_bilstm")
    report = load_pretrained(dst, str(path))[0]
    assert report["missing"] == [] and report["unexpected"] == []
    a, b = src.cnns[0].state_dict(), dst.cnns[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_weights_from_s3(s3_bucket, tmp_path):
    import s3fs

    src = build_model("tiny_bilstm")
    p = tmp_path / "tiny_backbone.safetensors"
    save_file(src.cnns[0].state_dict(), str(p))
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(p), f"{s3_bucket}/w.safetensors")
    dst = build_model("tiny_bilstm")
    load_pretrained(dst, f"{s3_bucket}/w.safetensors")
    assert torch.equal(dst.cnns[0].conv1[0].weight, src.cnns[0].conv1[0].weight)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 this is not a weights file" * 10)
    with pytest.raises(WeightsError, match="neither safetensors nor a plain PyTorch state dict"):
        load_pretrained(build_model("tiny_bilstm"), str(bad))
    good = tmp_path / "trunc.safetensors"
    save_file(build_model("tiny_bilstm").cnns[0].state_dict(), str(good))
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_pretrained(build_model("tiny_bilstm"), str(good))
    with pytest.raises(WeightsError, match="not found"):
        load_pretrained(build_model("tiny_bilstm"), str(tmp_path / "missing.pt"))


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    p = tmp_path / "resnet.safetensors"
    save_file(build_model("resnet50").cnns[0].state_dict(), str(p))
    with pytest.raises(WeightsError, match="not a checkpoint of this architecture|wrong shape"):
        load_pretrained(build_model("xception_bilstm"), str(p))
    with pytest.raises(WeightsError, match="one per branch"):
        load_pretrained(build_model("xception_resnet50_bilstm"), str(p))
    p2 = tmp_path / "wide.safetensors"
    sd = build_model("tiny_bilstm").cnns[0].state_dict()
    sd["conv1.0.weight"] = torch.randn(16, 3, 3, 3)
    save_file(sd, str(p2))
    with pytest.raises(WeightsError, match="wrong shape"):
        load_pretrained(build_model("tiny_bilstm"), str(p2))


def test_unknown_model_and_override_errors():
    with pytest.raises(KeyError, match="registered models"):
        build_model("vgg16")
    with pytest.raises(TypeError, match="unknown override"):
        build_model("tiny_bilstm", rnn_size=3)


def test_an_input_too_small_for_a_branch_is_refused_with_the_size_it_needs():
    """InceptionV3 cannot take an input under 75 pixels a side (its forward fails deep in a
    convolution); the model's config says so, with the size to give, before anything runs."""
    with pytest.raises(ValueError, match=r"inception_v3 branch needs at least 75x75.*72 high"):
        model_config("inception_v3_bilstm", input_size=(3, 72, 96))
    net = build_model("inception_v3_bilstm", input_size=(3, 75, 96)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 75, 96)).shape == (1, len(CLASSES))
    assert model_config("xception_bilstm", input_size=(3, 72, 96)).height == 72


def test_flop_count_includes_lstm():
    m = build_model("tiny_bilstm")
    assert lstm_flops(m.rnn, 60) == 2 * 60 * 2 * 4 * 16 * (80 + 16)
    assert count_flops(m) > lstm_flops(m.rnn, 60) > 0
    assert count_flops(build_model("xception_bilstm")) > count_flops(build_model("xception"))
