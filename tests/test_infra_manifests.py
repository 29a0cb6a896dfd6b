"""The infra manifests follow their schemas, and name the image the Dockerfile builds.

- infra/rayjob.yaml and infra/rayservice.yaml against KubeRay's CRD schemas (vendored in
  infra/schemas/kuberay, see its README), checked as strictly as ``kubectl apply`` with
  server-side field validation: unknown fields are errors;
- infra/cluster.yaml against the cluster launcher's schema inside the installed ``ray``;
- the Dockerfile: on Ray's official images at the tested Ray version, installing the project
  from pyproject.toml and nothing else, with the tags every manifest and doc uses.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
VENDORED = INFRA / "schemas" / "kuberay"
SHARED_CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = {"RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- KubeRay CRD schemas ------------------------------------------------------------------------


def _updater():
    spec = importlib.util.spec_from_file_location(
        "update_kuberay", INFRA / "schemas" / "update_kuberay.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def to_json_schema(node: dict) -> dict:
    """A Kubernetes structural schema as a JSON Schema that ``jsonschema`` enforces the way the
    API server does: int-or-string, nullable, and no unknown fields unless the schema says
    ``x-kubernetes-preserve-unknown-fields`` or has ``additionalProperties``."""
    node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-validations")}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = to_json_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = to_json_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [to_json_schema(s) if isinstance(s, dict) else s for s in node[key]]
    return node


@cache
def kuberay_validator(kind: str):
    import jsonschema

    raw = json.loads((VENDORED / f"{PLURALS[kind]}.v1.json").read_text())
    schema = to_json_schema(raw)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(kind: str, doc: dict) -> list[str]:
    errors = kuberay_validator(kind).iter_errors(doc)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_follows_the_kuberay_crd(kind):
    doc = _load_yaml(INFRA / MANIFESTS[kind])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert schema_errors(kind, doc) == []


@pytest.mark.parametrize(
    "kind, path, value, message",
    [
        ("RayJob", ["spec", "entrypointt"], "python -m x", "Additional properties"),
        ("RayJob", ["spec", "backoffLimit"], "two", "is not of type 'integer'"),
        (
            "RayJob",
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0],
            {"name": "w", "image": "x", "resourcez": {}},
            "Additional properties",
        ),
        ("RayService", ["spec", "rayClusterConfig", "rayVersion"], 2.6, "is not of type"),
        ("RayService", ["spec", "serveConfigV2"], {"applications": []}, "is not of type"),
    ],
)
def test_schema_check_catches_mistakes(kind, path, value, message):
    """The check is not vacuous: a misspelled field or a wrong type is an error."""
    doc = copy.deepcopy(_load_yaml(INFRA / MANIFESTS[kind]))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = schema_errors(kind, doc)
    assert any(message in e for e in errors), errors


def test_resource_quantities_may_be_strings_or_integers():
    doc = copy.deepcopy(_load_yaml(INFRA / "rayjob.yaml"))
    limits = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    limits["resources"]["limits"]["cpu"] = 4
    assert schema_errors("RayJob", doc) == []
    limits["resources"]["limits"]["cpu"] = [4]
    assert schema_errors("RayJob", doc)


@pytest.mark.skipif(
    not SHARED_CRDS.is_dir(), reason=f"KubeRay CRD files not at {SHARED_CRDS} (optional)"
)
@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_vendored_schema_is_the_crd_schema(kind):
    """infra/schemas/kuberay holds exactly what update_kuberay.py makes of the CRD files."""
    up = _updater()
    plural = PLURALS[kind]
    expected = up.render(up.schema_from_crd(SHARED_CRDS / f"ray.io_{plural}.yaml"))
    assert up.vendored_path(plural).read_text() == expected, (
        "stale copy: run `python infra/schemas/update_kuberay.py ../shared/schemas/kuberay`"
    )


def test_vendored_schemas_carry_their_licence():
    assert "Apache License" in (VENDORED / "LICENSE").read_text()
    readme = (INFRA / "schemas" / "README.md").read_text()
    assert "KubeRay" in readme and "Apache License 2.0" in readme


def test_rayservice_embeds_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    doc = _load_yaml(INFRA / "rayservice.yaml")
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def test_rayjob_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    doc = _load_yaml(INFRA / "rayjob.yaml")
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    # The image holds the project at /app (Dockerfile WORKDIR); the job runs from there.
    assert env.get("working_dir") == dockerfile().workdir


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_clusters_use_token_authentication(kind):
    doc = _load_yaml(INFRA / MANIFESTS[kind])
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert cluster.get("authOptions", {}).get("mode") == "token", (
        f"{MANIFESTS[kind]}: set rayCluster authOptions.mode: token (docs/cluster.md)"
    )


# -- the cluster launcher's schema --------------------------------------------------------------


@cache
def launcher_validator():
    import jsonschema
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"the installed ray has no {path}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft7Validator(schema)


def test_cluster_yaml_follows_the_launcher_schema():
    doc = _load_yaml(INFRA / "cluster.yaml")
    errors = [e.message for e in launcher_validator().iter_errors(doc)]
    assert errors == []


def test_launcher_schema_check_catches_mistakes():
    doc = _load_yaml(INFRA / "cluster.yaml")
    doc["docker"]["imagee"] = doc["docker"].pop("image")
    assert list(launcher_validator().iter_errors(doc))


def test_cluster_yaml_installs_nothing_at_start_and_uses_token_auth():
    doc = _load_yaml(INFRA / "cluster.yaml")
    commands = [
        c
        for key in ("initialization_commands", "setup_commands", "head_setup_commands")
        for c in doc.get(key, [])
    ]
    assert not [c for c in commands if "pip install" in c], "the image holds the dependencies"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in doc[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
    assert "~/.ray/auth_token" in doc["file_mounts"]


# -- the Dockerfile -----------------------------------------------------------------------------


class Dockerfile:
    """The few things the tests need from the Dockerfile, read without Docker."""

    def __init__(self, text: str):
        self.text = text
        lines, buf = [], ""
        for raw in text.splitlines():
            line = raw.strip()
            if not buf and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            lines.append(buf + line)
            buf = ""
        self.instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
        self.args: dict[str, str] = {}
        for op, rest in self.instructions:
            if op == "ARG" and "=" in rest and rest.split("=", 1)[0] not in self.args:
                k, v = rest.split("=", 1)
                self.args[k.strip()] = v.strip()

    def expand(self, s: str, **extra: str) -> str:
        values = self.args | extra
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m[1] or m[2]], s)

    @property
    def stages(self) -> dict[str, str]:
        """Stage name -> base image (unexpanded), and '' -> the final stage's base."""
        out = {}
        for op, rest in self.instructions:
            if op == "FROM":
                parts = rest.split()
                name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
                out[name] = parts[0]
        return out

    @property
    def runs(self) -> list[str]:
        return [rest for op, rest in self.instructions if op == "RUN"]

    @property
    def workdir(self) -> str:
        (path,) = {rest for op, rest in self.instructions if op == "WORKDIR"}
        return path

    @property
    def build_commands(self) -> dict[str, str]:
        """Image tag -> FLAVOR, from the documented `docker build` lines in the header."""
        out = {}
        for m in re.finditer(r"^#\s+(docker build .*)$", self.text, re.M):
            argv = shlex.split(m[1])
            tag = argv[argv.index("-t") + 1]
            flavor = next(a.split("=", 1)[1] for a in argv if a.startswith("FLAVOR="))
            out[tag] = flavor
        return out

    def label(self, name: str) -> str:
        for op, rest in self.instructions:
            if op == "LABEL":
                for tok in shlex.split(rest):
                    k, _, v = tok.partition("=")
                    if k == name:
                        return v
        raise KeyError(name)


@cache
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


def test_dockerfile_builds_on_the_official_ray_image_of_the_tested_version():
    import ray
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    df = dockerfile()
    assert df.args["RAY_VERSION"] == ray.__version__
    (ray_req,) = [
        Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("ray")
    ]
    assert ray_req.specifier.contains(df.args["RAY_VERSION"]), ray_req
    m = re.fullmatch(r"py3(\d+)", df.args["PYTHON_TAG"])
    assert m, df.args["PYTHON_TAG"]
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(f"3.{m[1]}"), (df.args["PYTHON_TAG"], requires)

    stages = df.stages
    assert df.expand(stages["base-cpu"]) == f"rayproject/ray:{ray.__version__}-py3{m[1]}"
    assert df.expand(stages["base-gpu"]) == f"rayproject/ray:{ray.__version__}-py3{m[1]}-gpu"
    assert stages[""] == "base-${FLAVOR}" and df.args["FLAVOR"] in ("cpu", "gpu")


def test_dockerfile_installs_the_project_from_pyproject_and_nothing_else():
    """Every pip install installs this project (``.``), at most with its own extras; the
    dependencies come from pyproject.toml, as in CI's ``pip install -e ".[dev]"``."""
    extras = set(_pyproject()["project"].get("optional-dependencies", {}))
    installs = 0
    for run in dockerfile().runs:
        for cmd in re.split(r"&&|\|\|", run):
            argv = shlex.split(cmd)
            if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
                installs += 1
                targets = [a for a in argv[argv.index("install") + 1 :] if not a.startswith("-")]
                assert targets == [targets[0]] and re.fullmatch(r"\.(\[[\w,]+\])?", targets[0]), (
                    f"installs something other than the project: {cmd.strip()}"
                )
                asked = set(re.findall(r"\w+", targets[0][1:]))
                assert asked <= extras, f"unknown extras {asked - extras}"
                assert not {"-r", "--requirement", "-e", "--editable"} & set(argv), cmd
            if argv[:2] == ["pip", "uninstall"]:
                assert argv[2:] == ["-y", _pyproject()["project"]["name"]], cmd
    assert installs >= 1


def test_dockerfile_context_holds_the_project_and_not_the_local_state():
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
            for pat in patterns
            for p in prefixes
        )

    for needed in (
        "pyproject.toml",
        "README.md",
        "cellmodel/__init__.py",
        "jobs/configs/paper.toml",
        "serve/config.yaml",
        "data/sample/crops",
    ):
        assert not ignored(needed), f".dockerignore leaves out {needed}"
    for local in (".git", ".venv/bin/python", "runs/quickstart", "data/shards/sample"):
        assert ignored(local), f".dockerignore sends {local} to the build"


def test_manifests_name_the_images_the_dockerfile_builds():
    df = dockerfile()
    tags = df.build_commands  # image -> flavor
    version = _pyproject()["project"]["version"]
    assert set(tags.values()) == {"cpu", "gpu"}
    repos = {t.rsplit(":", 1)[0] for t in tags}
    assert len(repos) == 1, repos
    for tag, flavor in tags.items():
        assert tag.rsplit(":", 1)[1] == f"{version}-{flavor}", tag
    assert df.label("org.opencontainers.image.version") == version

    for kind, name in MANIFESTS.items():
        doc = _load_yaml(INFRA / name)
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
        images = {c["image"] for c in containers}
        wants_gpu = any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers
        )
        if kind == "RayService":
            serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
            wants_gpu |= any(
                (d.get("ray_actor_options") or {}).get("num_gpus", 0)
                for app in serve_cfg["applications"]
                for d in app.get("deployments", [])
            )
        assert len(images) == 1, f"{name}: one image for the whole Ray cluster, not {images}"
        (image,) = images
        assert image in tags, f"{name} names {image}; the Dockerfile builds {sorted(tags)}"
        assert tags[image] == ("gpu" if wants_gpu else "cpu"), f"{name}: {image}"
    launcher = _load_yaml(INFRA / "cluster.yaml")["docker"]
    images = {launcher[k] for k in ("image", "head_image", "worker_image") if k in launcher}
    assert images and images <= set(tags), f"cluster.yaml names {images}"
    assert tags[launcher.get("worker_image", launcher.get("image"))] == "gpu"

    docs = (ROOT / "docs" / "cluster.md").read_text()
    for tag in tags:
        assert tag in docs, f"docs/cluster.md does not say how to build {tag}"
