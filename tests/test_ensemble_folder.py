"""An ensemble folder (``ensemble.json`` naming member checkpoints inside it) stands for its
members everywhere a checkpoint is taken: loading, bundling, calibration, evaluation,
distillation teachers, on object storage, and behind the Serve application over HTTP."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cellmodel import CLASSES
from cellmodel.infer.ensemble import Ensemble, combination_digest, load_predictor
from cellmodel.infer.predictor import Predictor
from cellmodel.models import CheckpointError, build_model, save_checkpoint
from cellmodel.models.checkpoint import (
    ENSEMBLE_FILE,
    ensemble_members,
    expand_checkpoints,
    read_checkpoint_meta,
    write_ensemble,
)

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT / "data" / "sample" / "crops"


def _member(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    return save_checkpoint(build_model("tiny_bilstm"), str(path), metrics={"seed": seed})


def _folder(root: Path, names=("seed0", "seed1")) -> str:
    for i, n in enumerate(names):
        _member(root / n, i)
    return write_ensemble(str(root), list(names), note="test")


def _images(per_class: int = 2) -> list[bytes]:
    return [p.read_bytes() for c in CLASSES for p in sorted((CROPS / c).glob("*.jpeg"))[:per_class]]


def test_an_ensemble_folder_loads_as_its_members(tmp_path):
    root = _folder(tmp_path / "ens")
    members = [str(tmp_path / "ens" / n) for n in ("seed0", "seed1")]
    assert ensemble_members(root) == members
    assert expand_checkpoints([root, members[0]]) == [*members, members[0]]
    assert ensemble_members(members[0]) is None  # an ordinary checkpoint
    folder, named = load_predictor(root), load_predictor(members)
    assert isinstance(folder, Ensemble) and folder.checkpoints == members
    imgs = _images()
    p = folder.predict_bytes(imgs)
    np.testing.assert_array_equal(p, named.predict_bytes(imgs))
    singles = [Predictor(m).predict_bytes(imgs) for m in members]
    np.testing.assert_allclose(p, np.mean(singles, axis=0), atol=1e-6)
    assert np.abs(singles[0] - singles[1]).max() > 1e-3  # two different members
    assert folder.weights_sha256 == combination_digest(
        read_checkpoint_meta(m)["weights_sha256"] for m in members
    )
    # Pinned to a digest: the same members load; any other digest is refused.
    Ensemble([root], expected_sha256=folder.weights_sha256)
    with pytest.raises(CheckpointError, match="a member changed"):
        Ensemble([root], expected_sha256="0" * 64)
    # A step that takes one checkpoint says what the folder is and which member to name.
    with pytest.raises(CheckpointError, match=r"an ensemble of 2 .*name a member .*seed0"):
        Predictor(root)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps(["seed0", "seed1"]), "must hold an object"),
        (json.dumps({"members": ["seed0"]}), "needs two or more"),
        (json.dumps({"members": "seed0,seed1"}), "must be a list"),
        (json.dumps({"members": ["seed0", "seed0"]}), "names a member twice"),
        (json.dumps({"members": ["seed0", "../elsewhere"]}), "inside the ensemble folder"),
        (json.dumps({"members": ["seed0", "."]}), "inside the ensemble folder"),
        (json.dumps({"members": ["seed0", "/abs/seed1"]}), "inside the ensemble folder"),
        (json.dumps({"members": ["seed0", "s3://b/seed1"]}), "inside the ensemble folder"),
        (json.dumps({"format_version": 99, "members": ["a", "b"]}), "upgrade cellmodel"),
    ],
)
def test_a_malformed_ensemble_file_is_refused_with_what_is_wrong(tmp_path, doc, match):
    root = Path(_folder(tmp_path / "ens"))
    (root / ENSEMBLE_FILE).write_text(doc)
    with pytest.raises(CheckpointError, match=match):
        load_predictor(str(root))


def test_a_missing_member_is_named(tmp_path):
    root = _folder(tmp_path / "ens")
    shutil.rmtree(Path(root) / "seed1")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*seed1"):
        load_predictor(root)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*seed2"):
        write_ensemble(root, ["seed0", "seed2"])
    assert json.loads((Path(root) / ENSEMBLE_FILE).read_text())["members"] == ["seed0", "seed1"]


def test_bundle_writes_an_ensemble_folder_of_float16_members(tmp_path, capsys):
    from jobs.bundle import main

    a, b = _member(tmp_path / "runs" / "a", 0), _member(tmp_path / "runs" / "b", 1)
    out = tmp_path / "bundled"
    args = ["--checkpoint", a, "--checkpoint", b, "--out", str(out), "--command", "train x"]
    assert main([*args, "--names", "s0,s1"]) == 0
    assert json.loads((out / ENSEMBLE_FILE).read_text())["members"] == ["s0", "s1"]
    meta = read_checkpoint_meta(str(out / "s1"))
    assert meta["extra"]["bundle"]["from"] == b and meta["metrics"] == {"seed": 1}
    imgs = _images()
    np.testing.assert_allclose(
        load_predictor(str(out)).predict_bytes(imgs),
        load_predictor([a, b]).predict_bytes(imgs),
        atol=2e-3,  # float16 weights
    )
    # Names that would leave the folder, or do not match the checkpoints, write nothing.
    bad = tmp_path / "bad"
    assert main(["--checkpoint", a, "--checkpoint", b, "--out", str(bad), "--names", "x,../y"]) == 2
    assert main(["--checkpoint", a, "--checkpoint", b, "--out", str(bad), "--names", "x"]) == 2
    assert main(["--checkpoint", a, "--out", str(bad), "--names", "x"]) == 2
    assert not bad.exists()
    err = capsys.readouterr().err
    assert "inside the ensemble folder" in err and "1 names for 2" in err
    # Default names.
    assert main(["--checkpoint", a, "--checkpoint", b, "--out", str(tmp_path / "d")]) == 0
    assert ensemble_members(str(tmp_path / "d"))[1].endswith("member-2")


def test_calibrate_and_evaluate_take_the_folder(tmp_path, capsys):
    from jobs.calibrate import main as calibrate
    from jobs.evaluate import main as evaluate

    root = _folder(tmp_path / "ens")
    members = ensemble_members(root)
    assert calibrate(["--checkpoint", root, "--temperature", "0.5", "--write"]) == 0
    # Stored for this combination in every member: the folder and the members named find it.
    assert load_predictor(root).temperature == 0.5 == load_predictor(members[::-1]).temperature
    assert Predictor(members[0]).temperature == 1.0  # a member alone keeps its own
    out = {}
    for name, ck in (("folder", [root]), ("named", members)):
        args = ["--data", str(CROPS), "--out", str(tmp_path / name), "--quiet"]
        assert evaluate([*args, *(x for c in ck for x in ("--checkpoint", c))]) == 0
        out[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    for k in ("accuracy", "log_loss", "n"):
        assert out["folder"][k] == out["named"][k]


def test_distillation_teachers_may_be_an_ensemble_folder(tmp_path):
    from cellmodel.train.distill import Teachers

    root = _folder(tmp_path / "ens")
    pre = read_checkpoint_meta(ensemble_members(root)[0])["preprocessing"]
    teachers = Teachers([root], pre, torch.device("cpu"))
    named = Teachers(ensemble_members(root), pre, torch.device("cpu"))
    x = torch.randn(2, 3, *pre["input_size"][1:])
    assert len(teachers.members) == 2
    torch.testing.assert_close(teachers.probs(x, 2.0), named.probs(x, 2.0))


def test_an_ensemble_folder_on_object_storage(s3_bucket, tmp_path):
    import s3fs

    local = _folder(tmp_path / "ens")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(local, s3_bucket.removeprefix("s3://") + "/models/ens", recursive=True)
    uri = f"{s3_bucket}/models/ens"
    assert ensemble_members(uri) == [f"{uri}/seed0", f"{uri}/seed1"]
    imgs = _images(1)
    np.testing.assert_array_equal(
        load_predictor(uri).predict_bytes(imgs), load_predictor(local).predict_bytes(imgs)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_with_the_ensemble_over_http(ray_session, tmp_path):
    from ray import serve

    from serve.app import build_app, pinned_meta
    from serve.settings import AppArgs

    root = _folder(tmp_path / "ens")
    members = ensemble_members(root)
    meta = pinned_meta(root)
    digest = combination_digest(read_checkpoint_meta(m)["weights_sha256"] for m in members)
    assert meta["weights_sha256"] == digest and meta["metrics"] == {}
    assert [m["checkpoint"] for m in meta["members"]] == members
    imgs = _images(1)
    expected = load_predictor(root).predict_bytes(imgs)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(AppArgs(checkpoint=root)), name="ensemble", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            m = client.get("/v1/model").json()
            assert m["version"] == digest[:12] and m["weights_sha256"] == digest
            assert [x["weights_sha256"] for x in m["members"]] == [
                read_checkpoint_meta(c)["weights_sha256"] for c in members
            ]
            for img, want in zip(imgs, expected):
                r = client.post("/v1/classify", content=img, headers={"content-type": "image/jpeg"})
                assert r.status_code == 200, r.text
                got = np.array([r.json()["probabilities"][c] for c in CLASSES])
                np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        serve.shutdown()
    # A member that changes after the app was built: a new replica refuses to load it.
    _member(Path(members[1]), 7)
    with pytest.raises(CheckpointError, match="a member changed"):
        load_predictor(root, expected_sha256=meta["weights_sha256"])
