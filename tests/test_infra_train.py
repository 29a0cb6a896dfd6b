"""The training infra files parse, follow their schemas, and run an entry point that exists."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from cellmodel.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _check_entrypoint(entrypoint: str) -> None:
    """``python -m MODULE --config FILE``: the module is importable and the config loads."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], entrypoint
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    assert "--config" in argv, entrypoint
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.is_file(), f"{config} is missing"
    cfg = load_config(config, argv[argv.index("--config") + 2 :])
    assert cfg.scaling.use_gpu and cfg.model.name == "xception_bilstm"


def test_cluster_launcher_yaml_is_valid_and_runs_the_training_job():
    import jsonschema
    import ray.autoscaler

    doc = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(doc, json.loads(schema_path.read_text()))
    assert doc["head_node_type"] in doc["available_node_types"]
    workers = [t for n, t in doc["available_node_types"].items() if n != doc["head_node_type"]]
    assert workers and all("gpu" in json.dumps(t).lower() or "g5" in json.dumps(t) for t in workers)
    _check_entrypoint(doc["metadata"]["entrypoint"])


def test_kuberay_rayjob_manifest_runs_the_training_job():
    doc = yaml.safe_load((ROOT / "infra" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    _check_entrypoint(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            gpus += int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * group["replicas"]
    cfg = load_config(ROOT / "jobs/configs/paper.toml")
    assert gpus >= cfg.scaling.num_workers, "the RayJob has fewer GPUs than the config's workers"
    yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.parametrize("name", ["cluster.yaml", "rayjob.yaml"])
def test_infra_files_are_plain_yaml(name):
    text = (ROOT / "infra" / name).read_text()
    assert "\t" not in text
    assert isinstance(yaml.safe_load(text), dict)
