"""Refresh the vendored KubeRay schemas from KubeRay's CRD files.

    python infra/schemas/update_kuberay.py ../shared/schemas/kuberay

For each CRD this project has a manifest of (RayJob, RayService), writes the ``ray.io/v1``
``openAPIV3Schema`` of ``ray.io_<plural>.yaml`` to ``kuberay/<plural>.v1.json``: the same
schema, as compact JSON with sorted keys (a sixth of the YAML's size), without the CRD
wrapper and the older API versions. tests/test_infra_manifests.py validates
infra/rayjob.yaml and infra/rayservice.yaml against these files, and checks that they still
equal this function's output when the CRD folder is at ../shared/schemas/kuberay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ("rayjobs", "rayservices")
VERSION = "v1"


def schema_from_crd(crd_file: Path, version: str = VERSION) -> dict:
    """The OpenAPI v3 schema of one served version of a CustomResourceDefinition."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(crd_file.read_text(), Loader=loader)
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{crd_file} is not a CustomResourceDefinition")
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd_file} has no version {version}")


def render(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n"


def vendored_path(plural: str) -> Path:
    return HERE / "kuberay" / f"{plural}.{VERSION}.json"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    for plural in CRDS:
        out = vendored_path(plural)
        out.write_text(render(schema_from_crd(src / f"ray.io_{plural}.yaml")))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
