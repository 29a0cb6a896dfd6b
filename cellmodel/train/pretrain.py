"""Self-supervised pretraining of a model's CNN branch on unlabelled images: domain weights.

Where no ImageNet weights can be had (an air-gapped cluster, or this project's sandbox), the
CNN branch can first learn from the data itself: the training crops with their labels ignored
and windows cut from the archive's slides. Each image is seen as two random views (zoom,
shift, flips, mild brightness, contrast and saturation); a small projection head maps both to
a vector, and the loss (NT-Xent, the contrastive loss of SimCLR) asks each view to pick out
its twin among every other view of the batch. The head is thrown away; what remains is one
weights file per CNN branch that ``model.pretrained`` loads, so that any training recipe
(the paper's two phases included: its frozen phase 1 then has features to learn from) starts
from them.

What it may read, so that nothing held out is seen even without labels: the splits named in
``data.train_split`` only, and from ``slides.uri`` only slides that no row of another split
was cut from (the manifest's ``source_id``; a dataset whose sources are not slides cannot say
which those are, and the run refuses slides unless ``slides.exclude`` names them or
``slides.allow_unknown_sources`` is set). Windows are cut at the training crops' pixel scale
and illumination (``cellmodel.data.scale``, ``cellmodel.data.light``), as the slide job does.

``run_pretrain(cfg)`` writes ``<run.storage>/<run.name>/``: ``branch<i>-<cnn>.safetensors``
(after every epoch), ``config.toml`` and ``pretrain.json`` (what was read and excluded, the
normalisation the weights expect, the loss per epoch). Every image is held decoded at the
model's input size in memory (8,000 images at 128x96: 300 MB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cellmodel import storage
from cellmodel.config import (
    AugmentSection,
    ConfigError,
    DataSection,
    ModelSection,
    PhaseSection,
    RunSection,
    Section,
    TrainConfig,
    load_settings,
    to_toml,
)

log = logging.getLogger(__name__)

RECORD = "pretrain.json"
# Source units whose ids name slides: the held-out cells' slides are then known.
SLIDE_SOURCES = ("slide", "match_to_slides")


class SslSection(Section):
    """The contrastive objective and its optimisation (AdamW, warm-up then cosine decay)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)  # images per step; each gives two views
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    temperature: float = Field(0.2, gt=0)  # NT-Xent softmax temperature
    hidden_dim: int = Field(512, ge=1)  # projection head, dropped after pretraining
    proj_dim: int = Field(128, ge=1)
    channels_last: Literal["auto", "on", "off"] = "auto"  # "auto": on CUDA only
    # What one instance is: "source", every image of one source cell (the ingest's rotated
    # copies and the slide it was cut from are positives of each other, never negatives);
    # "image", each image alone (SimCLR as published).
    instances: Literal["source", "image"] = "source"


class SlidePatchSection(Section):
    """Windows of whole slides as more unlabelled images ("" : crops only)."""

    uri: str = ""  # folder or prefix of slide images (JPEG/PNG), VOC folders included
    windows_per_slide: int = Field(8, ge=1)
    exclude: list[str] = Field(default_factory=list)  # slide ids (file stems) never to read
    allow_unknown_sources: bool = False  # read slides when the dataset cannot name held-out ones
    rescale: bool = True  # cut at the training crops' pixel scale (manifest rbc_diameter_px)
    light: bool = True  # shift to the training crops' background level (manifest light)
    sample: int = Field(64, ge=1)  # slides the archive's scale and light are measured on


def _views_default() -> AugmentSection:
    # Zoom in up to 1.8x (a view keeps 30-100 % of the image), shifts, flips, and colour kept
    # mild: granule colour separates eosinophils from neutrophils, so hue and stain stay fixed.
    return AugmentSection(flips=True, scale=(1.0, 1.8), translate=0.1, brightness=0.2,
                          contrast=0.2, saturation=0.2)  # fmt: skip


class PretrainConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    ssl: SslSection = Field(default_factory=SslSection)
    views: AugmentSection = Field(default_factory=_views_default)
    slides: SlidePatchSection = Field(default_factory=SlidePatchSection)

    def validate_run(self) -> PretrainConfig:
        problems = []
        if not self.data.uri:
            problems.append("data.uri is empty: set it to the dataset folder or s3:// URI")
        if not self.run.name:
            problems.append("run.name is empty: name the run (its folder holds the weights)")
        if self.views.mixup or self.views.cutmix:
            problems.append(
                "views.mixup and views.cutmix do not apply to pretraining; set them to 0"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> str:
        return storage.join(self.run.storage, self.run.name)


def load_pretrain_config(path, overrides: list[str] | None = None) -> PretrainConfig:
    """A pretraining config from TOML plus ``section.key=value`` overrides; ``run.name``
    defaults to the file's stem."""
    cfg = load_settings(PretrainConfig, path, overrides)
    if not cfg.run.name and path is not None:
        cfg.run.name = PurePosixPath(str(path)).stem
    return cfg


def projector(dim: int, hidden: int, out: int) -> nn.Module:
    """Linear, batch norm, ReLU, linear: the head the contrastive loss reads (then dropped)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))  # fmt: skip


def nt_xent(
    z: torch.Tensor, temperature: float, ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """NT-Xent over ``z`` (2N, D), where rows ``i`` and ``i + N`` are two views of one image:
    ``(loss, share of views whose most similar other view is a positive)``.

    ``ids`` (N,): which instance each image shows. Views of images with one id are then all
    positives of each other (the loss averages over them, as supervised contrastive learning
    does with classes), so that copies of one cell are not pushed apart as negatives. Without
    ``ids`` each image is its own instance: the twin is the only positive.
    """
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own positive
    if ids is None:
        ids = torch.arange(n)
    ids = torch.cat([ids, ids]).to(z.device)
    pos = ids[:, None] == ids[None, :]
    pos.fill_diagonal_(False)
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    loss = -(logp.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()
    acc = float(pos.gather(1, sim.argmax(dim=1, keepdim=True)).float().mean())
    return loss, acc


# -- data --------------------------------------------------------------------------------------
def held_out_sources(uri: str, manifest: dict, used: list[str]) -> set[str]:
    """Source ids of every row in a split not in ``used`` (duplicate slides joined by ``+``
    count as each of them)."""
    from cellmodel.data.dataset import iter_rows, split_names

    out: set[str] = set()
    for split in split_names(manifest):
        if split in used:
            continue
        for row in iter_rows(uri, split, ["source_id"]):
            for s in str(row.get("source_id") or "").split("+"):
                if s:
                    out.add(s)
    return out


def crop_images(cfg: PretrainConfig, model_cfg) -> tuple[np.ndarray, list[str]]:
    """Every row of the pretraining splits, decoded and resized: ``(uint8 (N, 3, H, W),
    source id of each row)`` (a row without a source is its own: its row id)."""
    from cellmodel.data.dataset import iter_record_batches
    from cellmodel.data.transforms import stack_bytes_uint8

    parts, sources = [], []
    cols = ["id", "image", "source_id"]
    for _, _, d in iter_record_batches(cfg.data.uri, cfg.data.train_split, cols, 256):
        parts.append(stack_bytes_uint8(d["image"], model_cfg))
        sources += [s or f"row:{i}" for i, s in zip(d["id"], d["source_id"])]
    if not parts:
        return np.zeros((0, *model_cfg.input_size), np.uint8), []
    return np.concatenate(parts), sources


def slide_windows(cfg: PretrainConfig, model_cfg, manifest: dict, held_out: set[str]) -> tuple:
    """Random windows of the allowed slides, cut at the training scale and light and resized:
    ``(uint8 (M, 3, H, W), slide id of each window, record)``; the record names what was
    read, what was excluded and why."""
    from cellmodel.data.light import estimate_dataset_background, light_offset, relight
    from cellmodel.data.scale import crop_window
    from cellmodel.data.transforms import ImageDecodeError, decode_image
    from cellmodel.infer.slides import (
        archive_background,
        archive_rbc_diameter,
        archive_sample,
        list_slides,
    )

    sc = cfg.slides
    src = manifest.get("source", {})
    known = src.get("source_unit") in SLIDE_SOURCES
    if not known and not sc.exclude and not sc.allow_unknown_sources:
        raise ConfigError(
            f"slides.uri is set but the dataset's sources are {src.get('source_unit')!r}, not "
            "slides, so the slides of its held-out cells are unknown and reading them would "
            "leak; ingest with --slides (sources traced to slides), list them in "
            "slides.exclude, or set slides.allow_unknown_sources = true"
        )
    drop = set(sc.exclude) | (held_out if known else set())
    listed = list_slides(sc.uri)
    allowed = [(sid, u) for sid, u in listed if PurePosixPath(sid).stem not in drop]
    excluded = sorted(
        PurePosixPath(sid).stem for sid, u in listed if PurePosixPath(sid).stem in drop
    )
    geo, light = manifest.get("geometry", {}), manifest.get("light", {})
    crop = tuple(geo.get("crop_size") or geo.get("window") or (model_cfg.width, model_cfg.height))
    sample = archive_sample(allowed, sc.sample) if allowed else []
    rbc = archive_rbc_diameter(allowed, sc.sample, sample)[0] if sc.rescale and sample else None
    window = crop_window(crop, rbc, geo.get("rbc_diameter_px") if sc.rescale else None)
    offset, light_from = None, "off"
    train_bg = light.get("background_rgb")
    if sc.light:
        light_from = "manifest"
        if not train_bg:  # a dataset ingested before its level was recorded: measure it
            from cellmodel.data.light import dataset_images

            est = estimate_dataset_background(dataset_images(cfg.data.uri, 64, 0), n=64)
            train_bg, light_from = est["background_rgb"], "measured on the training split"
    if sc.light and train_bg and sample:
        bg = archive_background(allowed, sc.sample, sample)[0]
        offset = light_offset(train_bg, bg) if bg else None
    rng = np.random.default_rng(cfg.run.seed)
    _, h, w = model_cfg.input_size
    out, ids, unreadable = [], [], []
    for sid, u in allowed:
        try:
            img = decode_image(storage.read_bytes(u))
        except (ImageDecodeError, OSError) as e:
            unreadable.append(f"{sid}: {e}")
            continue
        ww, wh = min(window[0], img.size[0]), min(window[1], img.size[1])
        for _ in range(sc.windows_per_slide):
            x0 = int(rng.integers(0, img.size[0] - ww + 1))
            y0 = int(rng.integers(0, img.size[1] - wh + 1))
            patch = img.crop((x0, y0, x0 + ww, y0 + wh)).resize((w, h))
            a = relight(np.asarray(patch, dtype=np.uint8), offset)
            out.append(a.transpose(2, 0, 1))
            ids.append(PurePosixPath(sid).stem)
    arr = np.stack(out) if out else np.zeros((0, 3, h, w), np.uint8)
    record = {
        "uri": sc.uri, "listed": len(listed), "read": len(allowed) - len(unreadable),
        "excluded": excluded, "excluded_because": "a row of a held-out split was cut from it, or "
        "slides.exclude lists it" if known else "slides.exclude lists it", "unreadable": unreadable,
        "windows": int(len(arr)), "window": list(window), "archive_rbc_diameter_px": rbc,
        "light_offset": None if offset is None else [round(float(v), 1) for v in offset],
        "train_background_rgb": train_bg, "train_background_from": light_from,
    }  # fmt: skip
    return arr, ids, record


# -- the run -----------------------------------------------------------------------------------
def _save(model, run_dir: str) -> list[dict]:
    from safetensors.torch import save

    files = []
    for i, (name, m) in enumerate(zip(model.cfg.cnn, model.cnns)):
        sd = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
        data = save(sd)
        uri = storage.join(run_dir, f"branch{i}-{name}.safetensors")
        storage.write_bytes(uri, data)
        files.append({"branch": i, "cnn": name, "uri": uri,
                      "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    return files


def run_pretrain(cfg: PretrainConfig, *, device: str | None = None) -> dict:
    """Pretrain the CNN branch(es) of ``cfg.model``; returns the record written to
    ``pretrain.json``."""
    from cellmodel.data.dataset import load_manifest, split_parts
    from cellmodel.data.transforms import normalize
    from cellmodel.models import build_from_config, load_pretrained
    from cellmodel.train.batch_aug import BatchAugment
    from cellmodel.train.trainer import lr_factor

    cfg.validate_run()
    run_dir = cfg.run_dir
    if storage.exists(storage.join(run_dir, RECORD)):
        raise ConfigError(
            f"{run_dir} already holds a pretraining run ({RECORD}); choose another run.name "
            "or remove the folder"
        )
    manifest = load_manifest(cfg.data.uri)
    model_cfg = TrainConfig(model=cfg.model).build_model_config(manifest.get("classes"))
    if not model_cfg.cnn:
        raise ConfigError(f"model {cfg.model.name!r} has no CNN branch to pretrain")
    used = split_parts(cfg.data.train_split)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.run.seed)
    model = build_from_config(model_cfg)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)

    t0 = time.perf_counter()
    crops, sources = crop_images(cfg, model_cfg)
    slides_record = None
    pool = crops
    if cfg.slides.uri:
        held = held_out_sources(cfg.data.uri, manifest, used)
        windows, slide_ids, slides_record = slide_windows(cfg, model_cfg, manifest, held)
        pool = np.concatenate([crops, windows])
        # A window shows the cell its slide's crops show: one instance ("A+B" for duplicates).
        joined = {p: s for s in set(sources) for p in s.split("+")}
        sources = sources + [joined.get(i, i) for i in slide_ids]
    if cfg.ssl.instances == "source":
        ids = torch.from_numpy(np.unique(np.asarray(sources), return_inverse=True)[1].ravel())
    else:
        ids = torch.arange(len(pool))
    if len(pool) < 2:
        raise ConfigError(
            f"{len(pool)} image(s) to pretrain on in {cfg.data.train_split!r}; need 2 or more"
        )
    log.info("pretraining on %d images (%d crops) after %.0f s of decoding",
             len(pool), len(crops), time.perf_counter() - t0)  # fmt: skip
    storage.write_bytes(storage.join(run_dir, "config.toml"), to_toml(cfg).encode())

    s = cfg.ssl
    cl = s.channels_last == "on" or (s.channels_last == "auto" and dev.type == "cuda")
    model.to(dev)
    head = projector(model.cnn_dim, s.hidden_dim, s.proj_dim).to(dev)
    if cl:
        model.cnns.to(memory_format=torch.channels_last)
    params = list(model.cnns.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    bs = min(s.batch_size, len(pool))
    steps = len(pool) // bs  # full batches only: BN and the loss want equal-sized batches
    sched = PhaseSection(epochs=s.epochs, lr=s.lr, schedule="cosine",
                         warmup_epochs=s.warmup_epochs, min_lr_ratio=s.min_lr_ratio)  # fmt: skip
    factor = lr_factor(sched, steps)
    views = BatchAugment(cfg.views, model_cfg.mean, model_cfg.std)
    g = torch.Generator().manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    pool_t = torch.from_numpy(pool)
    model.cnns.train()
    head.train()
    history, step = [], 0
    record = {
        "model": {"name": cfg.model.name, "cnn": list(model_cfg.cnn),
                  "input_size": list(model_cfg.input_size), "mean": list(model_cfg.mean),
                  "std": list(model_cfg.std), "from": list(cfg.model.pretrained)},
        "data": {"uri": cfg.data.uri, "splits": used, "crops": int(len(crops)),
                 "classes_ignored": manifest.get("classes")},
        "instances": {"unit": cfg.ssl.instances, "count": int(ids.max()) + 1},
        "slides": slides_record, "images": int(len(pool)), "steps_per_epoch": steps,
        "device": str(dev), "history": history,
    }  # fmt: skip
    for epoch in range(s.epochs):
        t_ep, losses, accs = time.perf_counter(), [], []
        order = torch.from_numpy(rng.permutation(len(pool)))
        for b in range(steps):
            for grp in opt.param_groups:
                grp["lr"] = s.lr * factor(step)
            idx = order[b * bs : (b + 1) * bs]
            x = normalize(pool_t[idx].to(dev), model_cfg)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            v = torch.cat([views(x, g), views(x, g)])
            loss, acc = nt_xent(head(model.forward_cnn(v)), s.temperature, ids[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            accs.append(acc)
            step += 1
        secs = time.perf_counter() - t_ep
        history.append({"epoch": epoch, "loss": round(float(np.mean(losses)), 4),
                        "positive_acc": round(float(np.mean(accs)), 4), "lr": s.lr * factor(step - 1),
                        "seconds": round(secs, 1),
                        "images_per_s": round(steps * bs / max(secs, 1e-9), 1)})  # fmt: skip
        log.info("pretrain epoch %d: loss %.4f, positive found %.1f %%, %.0f s", epoch,
                 history[-1]["loss"], 100 * history[-1]["positive_acc"], secs)  # fmt: skip
        record["weights"] = _save(model, run_dir)
        record["epochs_done"] = epoch + 1
        storage.write_bytes(storage.join(run_dir, RECORD + ".partial"),
                            json.dumps(record, indent=1).encode())  # fmt: skip
    record["seconds"] = round(time.perf_counter() - t0, 1)
    storage.write_bytes(storage.join(run_dir, RECORD), json.dumps(record, indent=1).encode())
    fs, path = storage.get_fs(storage.join(run_dir, RECORD + ".partial"))
    fs.rm(path)
    return record
