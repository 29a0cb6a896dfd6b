"""Checkpoints: ``model.safetensors`` plus ``checkpoint.json`` in one folder (local or URI).

The JSON holds the model name, its full config (so loading rebuilds the architecture
without the registry's defaults), classes, preprocessing, metrics and versions. Loading
never unpickles anything.

An **ensemble folder** holds ``ensemble.json`` and its members, each an ordinary checkpoint
folder inside it (``{"members": ["seed0", "seed1", "seed2"]}``): wherever a checkpoint is
taken, the folder stands for its members named together (``expand_checkpoints``), so it
copies, uploads and serves as one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import cellmodel
from cellmodel import storage
from cellmodel.models.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1
CHECKPOINT_ENV = "CELLMODEL_CHECKPOINT"  # the checkpoint commands use when given none
BUNDLED = "models/bundled"  # the bundled model (models/README.md), relative to the repository


def default_checkpoint() -> str:
    """The checkpoint to use when none is named: ``$CELLMODEL_CHECKPOINT``, else the bundled
    model, found from any working directory (also inside the image)."""
    if uri := os.environ.get(CHECKPOINT_ENV):
        return uri
    here = Path(BUNDLED)
    return str(
        (here if here.exists() else Path(__file__).resolve().parents[2] / BUNDLED).absolute()
    )


def checkpoints_or_default(given: list[str] | None) -> list[str]:
    """A command's ``--checkpoint`` list, or ``[default_checkpoint()]`` when it named none
    (said on stderr, so a user sees which model answered)."""
    if given:
        return given
    uri = default_checkpoint()
    print(f"checkpoint: {uri} (none given)", file=sys.stderr)
    return [uri]


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, incomplete or inconsistent."""


def ensemble_members(uri: str) -> list[str] | None:
    """The member checkpoints of the ensemble folder ``uri`` (its ``ensemble.json``, members
    in its order), or None when ``uri`` is not one. A malformed ``ensemble.json`` raises
    ``CheckpointError``."""
    path = storage.join(uri, ENSEMBLE_FILE)
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} must hold an object with a members list")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{uri} uses ensemble format {doc['format_version']}, newer than this cellmodel "
            f"({FORMAT_VERSION}); upgrade cellmodel"
        )
    names = doc.get("members")
    check_member_names(path, names)
    return [storage.join(uri, n) for n in names]


def check_member_names(path: str, names) -> None:
    """``CheckpointError`` unless ``names`` are two or more distinct folder names inside the
    ensemble folder (``path`` is the ``ensemble.json`` the message names)."""
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise CheckpointError(f"{path}: 'members' must be a list of member folder names")
    if len(names) < 2:
        raise CheckpointError(
            f"{path} names {len(names)} member(s); an ensemble needs two or more (point at "
            "the member's own folder to use one checkpoint)"
        )
    for n in names:
        parts = PurePosixPath(n).parts
        if not parts or n.startswith("/") or "\\" in n or ":" in n or ".." in parts:
            raise CheckpointError(
                f"{path}: member {n!r} must be a folder inside the ensemble folder, named "
                "relative to it (no absolute paths, URIs or '..'), so the folder moves as one"
            )
    if len(set(names)) < len(names):
        raise CheckpointError(f"{path} names a member twice: {names}")


def expand_checkpoints(uris: str | Iterable[str]) -> list[str]:
    """Checkpoint URIs with every ensemble folder replaced by its members, in order."""
    out: list[str] = []
    for uri in [uris] if isinstance(uris, str) else uris:
        out.extend(ensemble_members(uri) or [uri])
    return out


def write_ensemble(uri: str, members: Iterable[str], **extra) -> str:
    """Write ``ensemble.json`` in ``uri`` naming ``members`` (folders inside ``uri``, which
    must already hold checkpoints); ``extra`` entries (provenance) are stored beside them.
    Nothing is written unless every member is there and named as ``ensemble_members`` reads."""
    names = list(members)
    path = storage.join(uri, ENSEMBLE_FILE)
    check_member_names(path, names)
    for n in names:
        read_checkpoint_meta(storage.join(uri, n))
    doc = {"format_version": FORMAT_VERSION, "members": names, **extra}
    storage.write_bytes(path, json.dumps(doc, indent=2).encode())
    return uri


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP wraps in .module, torch.compile in ._orig_mod.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(
    model: nn.Module,
    uri: str,
    *,
    metrics: dict | None = None,
    extra: dict | None = None,
    data: dict | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write a checkpoint folder at ``uri``; the JSON is written last, so it marks completion.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type, halving a
    bundled model's size; loading casts them back to the model's own (float32) parameters.

    ``data``: what the model learned from (dataset URI, classes, crop geometry, pixel
    scale and background level from the dataset's manifest); the slide job reads them here.
    """
    model = _unwrap(model)
    cfg: ModelConfig = model.cfg
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    weights = st_save(tensors)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_name": cfg.name,
        "config": cfg.to_dict(),
        "classes": list(cfg.classes),
        "preprocessing": cfg.preprocessing(),
        # Names the exact weights: loaders verify it, serving derives the model version from it.
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "metrics": metrics or {},
        "data": data or {},
        "extra": extra or {},
        "versions": {"cellmodel": cellmodel.__version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_bytes(storage.join(uri, META_FILE), json.dumps(meta, indent=2).encode())
    return uri


def read_checkpoint_meta(uri: str) -> dict:
    meta_uri = storage.join(uri, META_FILE)
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
    except FileNotFoundError as e:
        if members := ensemble_members(uri):
            raise CheckpointError(
                f"{uri} is an ensemble of {len(members)} checkpoints ({ENSEMBLE_FILE}), not "
                f"one checkpoint; this step takes a single one: name a member (e.g. "
                f"{members[0]})"
            ) from e
        raise CheckpointError(
            f"no checkpoint at {uri}: {META_FILE} is missing (an unfinished save, or the wrong "
            "folder; point at the folder that holds model.safetensors and checkpoint.json)"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_uri} is not valid JSON: {e}") from e
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{uri} uses checkpoint format {meta['format_version']}, newer than this cellmodel "
            f"({FORMAT_VERSION}); upgrade cellmodel"
        )
    return meta


def load_checkpoint(
    uri: str, map_location: str | torch.device = "cpu", *, expected_sha256: str | None = None
):
    """Rebuild the model from the checkpoint's own config and load its weights.

    Returns ``(model, meta)``; the model is in eval mode. The weights must hash to the
    ``weights_sha256`` in ``checkpoint.json`` (when it has one, i.e. any checkpoint saved since
    it was added) and to ``expected_sha256`` when given; otherwise ``CheckpointError``.
    """
    from cellmodel.models.registry import build_from_config

    meta = read_checkpoint_meta(uri)
    cfg = ModelConfig.from_dict(meta["config"])
    model = build_from_config(cfg)
    try:
        weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: {WEIGHTS_FILE} is missing") from e
    digest = hashlib.sha256(weights).hexdigest()
    for want, what in ((meta.get("weights_sha256"), META_FILE), (expected_sha256, "the caller")):
        if want and want != digest:
            raise CheckpointError(
                f"{uri}: {WEIGHTS_FILE} has sha256 {digest[:12]}..., but {what} names "
                f"{want[:12]}...: the folder changed (a save in progress, or another model "
                "written over it); refusing to load a model other than the one named"
            )
    meta.setdefault("weights_sha256", digest)  # older checkpoints: the digest just computed
    try:
        tensors = st_load(weights)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{uri}: {WEIGHTS_FILE} is unreadable ({e})") from e
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{uri}: weights do not match the config's architecture (missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.to(map_location).eval()
    return model, meta
