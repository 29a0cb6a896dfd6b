"""Classes, geometry and preprocessing flow as data: folder -> manifest -> model -> checkpoint
-> evaluation and inference, with no code naming the classes."""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cellmodel.config import load_config
from cellmodel.data.ingest import ingest
from cellmodel.models import build_from_config, load_checkpoint, load_pretrained, save_checkpoint
from cellmodel.train import run_local

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


@pytest.fixture(scope="module")
def five_class_folder(sample_dir, tmp_path_factory) -> Path:
    """The sample's four class folders plus a fifth (``BASOPHIL``, made of other real cells,
    flipped so that it is its own class to learn)."""
    from PIL import Image

    src = tmp_path_factory.mktemp("five") / "crops"
    for d in sorted((sample_dir / "crops").iterdir()):
        shutil.copytree(d, src / d.name)
    (src / "BASOPHIL").mkdir()
    for f in sorted((sample_dir / "crops" / "MONOCYTE").glob("*.jpeg"))[:12]:
        Image.open(f).transpose(Image.FLIP_TOP_BOTTOM).save(src / "BASOPHIL" / f"b{f.name}")
    return src


CLASSES5 = ["BASOPHIL", "EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


@pytest.fixture(scope="module")
def five_class_model(five_class_folder, tmp_path_factory) -> tuple[str, str, dict]:
    """(shards, trained checkpoint, manifest) of the five-class folder."""
    tmp_path = tmp_path_factory.mktemp("five-run")
    shards = str(tmp_path / "shards")
    m = ingest(str(five_class_folder), shards, group="file", target_per_class=40,
               progress=False, workers=1, scale=0.5)  # fmt: skip
    cfg = load_config(CONFIGS / "quickstart.toml", [
        f"data.uri={json.dumps(shards)}", f"run.storage={json.dumps(str(tmp_path / 'runs'))}",
        "run.name=five", "phase1.epochs=1", "phase2.epochs=1"])  # fmt: skip
    return shards, run_local(cfg, device="cpu").model_uri, m


def test_five_class_folder_ingests_trains_evaluates_and_predicts(five_class_model):
    from cellmodel.evaluate import evaluate_checkpoint
    from cellmodel.infer.predictor import Predictor

    shards, model_uri, m = five_class_model
    classes = CLASSES5
    assert m["classes"] == classes
    assert m["geometry"]["crop_size"] == [160, 120] and m["geometry"]["window"] == [320, 240]
    from PIL import Image

    from cellmodel.data.dataset import iter_rows

    row = next(iter_rows(shards, "train", ["image"]))
    assert Image.open(io.BytesIO(row["image"])).size == (160, 120)
    assert m["splits"]["train"]["counts"] == {c: 40 for c in classes}

    model, meta = load_checkpoint(model_uri)
    assert meta["classes"] == classes and model.cfg.num_classes == 5
    assert meta["data"]["classes"] == classes and meta["data"]["crop_size"] == [160, 120]
    # The crops' background level travels from the manifest into the checkpoint, where the
    # slide job reads it (cellmodel.data.light).
    bg = m["light"]["background_rgb"]
    assert len(bg) == 3 and m["light"]["background_images"] > 0
    assert meta["data"]["background_rgb"] == bg

    metrics = evaluate_checkpoint(model_uri, shards, split="val")
    assert "BASOPHIL" in metrics["data_classes"]
    assert set(metrics["per_class"]) == set(classes) if "per_class" in metrics else True
    probs = Predictor(model_uri).predict_arrays(np.zeros((2, *model.cfg.input_size), np.float32))
    assert probs.shape == (2, 5)


def test_five_class_model_serves_over_http(five_class_model, ray_session, sample_dir):
    import httpx
    from ray import serve

    from serve.app import build_app
    from serve.settings import AppArgs

    _, model_uri, _ = five_class_model
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(checkpoint=model_uri)), name="five", route_prefix="/")
        image = next((sample_dir / "crops" / "MONOCYTE").glob("*.jpeg")).read_bytes()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", content=image,
                       headers={"content-type": "image/jpeg"}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert sorted(body["probabilities"]) == CLASSES5 and body["class"] in CLASSES5
    finally:
        serve.delete("five")
        serve.shutdown()


def test_classes_asked_for_keep_a_subset(five_class_folder, tmp_path):
    m = ingest(str(five_class_folder), str(tmp_path / "ds"), group="file", progress=False,
               workers=1, classes=["monocyte", "NEUTROPHIL"])  # fmt: skip
    assert m["classes"] == ["MONOCYTE", "NEUTROPHIL"]
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert (
        reasons["BASOPHIL/"] == "class_not_listed" and reasons["LYMPHOCYTE/"] == "class_not_listed"
    )


def test_per_branch_weights_and_preprocessing_travel_in_the_checkpoint(tmp_path):
    """Two CNN branches, each with its own weights file and its own normalisation."""
    cfg = load_config(CONFIGS / "quickstart.toml", [
        'model.overrides.cnn=["tiny_cnn", "tiny_cnn"]',
        'model.preprocessing=["imagenet", "inception"]'])  # fmt: skip
    mcfg = cfg.build_model_config()
    assert mcfg.branch_norms == ("imagenet", "inception")
    torch.manual_seed(0)
    donor = build_from_config(mcfg)
    files = []
    for i, branch in enumerate(donor.cnns):
        path = tmp_path / f"branch{i}.safetensors"
        save_file({k: v.contiguous() for k, v in branch.state_dict().items()}, str(path))
        files.append(str(path))
    torch.manual_seed(1)
    model = build_from_config(mcfg)
    load_pretrained(model, files)
    for a, b in zip(model.cnns, donor.cnns):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k

    # Branch 1 sees its input re-normalised to mean = std = 0.5, branch 0 the input as is.
    model.eval()
    x = torch.randn(2, 3, *mcfg.input_size[1:])
    rgb = x * torch.tensor(mcfg.std).view(1, 3, 1, 1) + torch.tensor(mcfg.mean).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.cat([model.cnns[0](x), model.cnns[1]((rgb - 0.5) / 0.5)], dim=1)
        torch.testing.assert_close(model.forward_cnn(x), ref, rtol=1e-5, atol=1e-5)
        out = model(x)
    save_checkpoint(model, str(tmp_path / "ckpt"))
    again, meta = load_checkpoint(str(tmp_path / "ckpt"))
    assert meta["preprocessing"]["branch_norms"] == ["imagenet", "inception"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)
