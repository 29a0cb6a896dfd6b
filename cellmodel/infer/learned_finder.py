"""A learned white-cell finder: a small centre-heat-map network trained from random weights.

The stain finder (:mod:`cellmodel.infer.finder`) separates cells by the shape of their
stained blobs, which fails when two nuclei touch. This finder learns what a white cell's
centre looks like instead, so two touching cells give two peaks:

- the network sees the slide downsampled ``downsample`` times (160x120 for a 640x480
  slide) and predicts, on a grid ``stride`` times coarser than its input, the probability
  that a cell centre falls in each grid cell (a heat map trained with the focal loss of
  CenterNet, Zhou et al. 2019, on Gaussian bumps at the annotated centres), the offset of
  that centre inside the grid cell, and the box's log width and height;
- a detection is a local maximum of the heat map (3x3) with a score of at least
  ``min_score``; its box is the predicted size around the predicted centre. With ``flips``
  the heat map and sizes are the mean over the slide and its three flips. With
  ``suppress`` > 0, a weaker detection is dropped when its centre lies in the central
  ``suppress`` share of a stronger one's box or the stronger one's centre in its own: a
  second peak inside one big cell, while a touching neighbour's centre lies near or beyond
  the box's edge.

It trains on the ``WBC`` boxes of a VOC-layout folder (BCCD); red cells and platelets are
the background it learns to ignore. Since BCCD almost never shows two white cells touching,
training pastes another slide's cell beside the slide's own in a share of the samples
(``paste``), cut with a soft ellipse of random size and edge: the composed pairs it is
scored on (``finder_eval.compose_pair``) are pasted too, with another mask, so their figures
may favour it. Training and detection use only torch and PIL.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from cellmodel import storage
from cellmodel.infer.finder import Detection, cut_by_frame

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
FORMAT = "cellmodel-centre-finder/1"


@dataclass
class LearnedFinderConfig:
    """How the centre finder is built and trained (stored with its weights)."""

    downsample: int = 4  # network input = slide / this (640x480 -> 160x120)
    stride: int = 4  # heat-map grid = input / this
    width: int = 32  # channels of the first stage (doubled per stage, three stages)
    epochs: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    sigma: float = 0.12  # Gaussian bump: sigma = this x the box's side, in grid cells
    paste: float = 0.5  # chance a training slide gets another slide's cell pasted beside its own
    # Detection threshold on the heat map; 0.35 chosen by 5-fold CV over BCCD with suppress
    # (BENCHMARKS.md): one false box fewer in ~280 slides than 0.3, the same recall.
    min_score: float = 0.35
    # A weaker peak centred in this central share of a stronger box, or holding its centre in
    # its own, is the same cell (0: off); 0.7 chosen by 5-fold CV over BCCD (BENCHMARKS.md).
    suppress: float = 0.7
    # Average the heat map and box sizes over the slide and its three flips (4x the network's
    # compute; training flips slides the same ways). Off: the 5-fold CV over BCCD did not
    # choose it (one false box fewer, one or two touching pairs more merged; BENCHMARKS.md).
    flips: bool = False
    # Networks trained with seeds seed, seed + 1, ... and averaged (heat map as the mean
    # probability, centre offsets and box sizes as the means). One network's touching-pair
    # counts swing by a few percent with its seed; 3 averaged beat the mean network in
    # 5-fold CV over BCCD at 3x the compute (BENCHMARKS.md).
    members: int = 3
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "threads"}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CentreNet(nn.Module):
    """Encoder to 1/16 of its input, decoder back to 1/``stride`` with skips; 5 outputs.

    Outputs per grid cell: centre logit, centre offset (x, y) in grid cells, log box width
    and height in input pixels.
    """

    def __init__(self, width: int = 32, stride: int = 4):
        super().__init__()
        if stride not in (2, 4, 8):
            raise ValueError(f"stride must be 2, 4 or 8, got {stride}")
        w = width
        self.stride = stride
        self.stem = _block(3, w // 2, 2)  # 1/2
        self.s1 = _block(w // 2, w, 2)  # 1/4
        self.s2 = _block(w, 2 * w, 2)  # 1/8
        self.s3 = _block(2 * w, 4 * w, 2)  # 1/16: a cell is about 3 x 3 here
        self.ctx = nn.Sequential(  # context wider than one cell (dilated)
            nn.Conv2d(4 * w, 4 * w, 3, 1, 2, dilation=2, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.up3 = nn.Conv2d(4 * w, 2 * w, 1)
        self.fuse2 = _block(4 * w, 2 * w, 1)
        self.up2 = nn.Conv2d(2 * w, w, 1)
        self.fuse1 = _block(2 * w, w, 1)
        self.up1 = nn.Conv2d(w, w // 2, 1)
        self.fuse0 = _block(w, w // 2, 1)
        out_c = {8: 2 * w, 4: w, 2: w // 2}[stride]
        self.head = nn.Sequential(
            nn.Conv2d(out_c, out_c, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(out_c, 5, 1)
        )
        nn.init.constant_(self.head[-1].bias, 0.0)
        with torch.no_grad():
            self.head[-1].bias[0] = -4.0  # start near "no centre anywhere" (focal-loss prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        x1 = self.s1(x0)
        x2 = self.s2(x1)
        x3 = self.ctx(self.s3(x2))
        y = self.fuse2(torch.cat([x2, _up(self.up3(x3), x2)], 1))
        if self.stride <= 4:
            y = self.fuse1(torch.cat([x1, _up(self.up2(y), x1)], 1))
        if self.stride == 2:
            y = self.fuse0(torch.cat([x0, _up(self.up1(y), x0)], 1))
        return self.head(y)


class CentreEnsemble(nn.Module):
    """Several :class:`CentreNet` of one shape answering as one: the mean probability of a
    centre (returned as a logit, like one network's) and the mean offsets and box sizes."""

    def __init__(self, nets: list[CentreNet]):
        super().__init__()
        if not nets:
            raise ValueError("a CentreEnsemble needs at least one network")
        self.nets = nn.ModuleList(nets)
        self.stride = nets[0].stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = torch.stack([net(x) for net in self.nets])
        y = ys.mean(0)
        heat = torch.sigmoid(ys[:, :, :1]).mean(0)
        return torch.cat([torch.logit(heat.clamp(1e-6, 1 - 1e-6)), y[:, 1:]], 1)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


# ---------------------------------------------------------------- data


def slide_tensor(img: Image.Image, downsample: int) -> torch.Tensor:
    """A slide as the network's input: RGB in [0, 1], downsampled, shape (3, H, W)."""
    w, h = img.size
    small = img.convert("RGB").resize((w // downsample, h // downsample), Image.BILINEAR)
    a = np.asarray(small, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def targets(
    boxes: list[Box], shape: tuple[int, int], scale: float, stride: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heat map (1, gh, gw), regression targets (4, gh, gw) and their mask (1, gh, gw).

    ``boxes`` are in input pixels x ``scale`` (slide pixels per input pixel); ``shape`` is the
    input (H, W).
    """
    gh, gw = shape[0] // stride, shape[1] // stride
    heat = torch.zeros(1, gh, gw)
    reg = torch.zeros(4, gh, gw)
    mask = torch.zeros(1, gh, gw)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / scale / stride, (y0 + y1) / 2 / scale / stride
        bw, bh = (x1 - x0) / scale, (y1 - y0) / scale
        if not (0 <= cx < gw and 0 <= cy < gh) or bw <= 1 or bh <= 1:
            continue
        ix, iy = int(cx), int(cy)
        s = max(sigma * max(bw, bh) / stride, 0.5)
        bump = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * s * s))
        heat[0] = torch.maximum(heat[0], bump)
        reg[:, iy, ix] = torch.tensor([cx - ix, cy - iy, math.log(bw), math.log(bh)])
        mask[0, iy, ix] = 1.0
    return heat, reg, mask


def _augment(x: torch.Tensor, boxes: list[Box], scale: float, rng: np.random.Generator):
    """Flips, 180-degree turns and stain/brightness jitter (pale and dark slides)."""
    _, h, w = x.shape
    W, H = w * scale, h * scale
    if rng.random() < 0.5:
        x = x.flip(-1)
        boxes = [(W - x1, y0, W - x0, y1) for x0, y0, x1, y1 in boxes]
    if rng.random() < 0.5:
        x = x.flip(-2)
        boxes = [(x0, H - y1, x1, H - y0) for x0, y0, x1, y1 in boxes]
    # colour: per-channel gain, brightness, contrast, and a pull towards grey (pale stain)
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, 3).astype(np.float32)).view(3, 1, 1)
    x = x * gain * float(rng.uniform(0.85, 1.15))
    mean = x.mean()
    x = (x - mean) * float(rng.uniform(0.7, 1.3)) + mean
    grey = x.mean(0, keepdim=True)
    x = x + (grey - x) * float(rng.uniform(0.0, 0.4))
    return x.clamp(0, 1), boxes


def _paste(
    x: torch.Tensor,
    boxes: list[Box],
    donor: torch.Tensor,
    dbox: Box,
    scale: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, list[Box]]:
    """``donor``'s cell pasted beside one of ``boxes`` (touching or overlapping), or anywhere.

    BCCD slides almost never hold two touching white cells, so without this the network
    never learns to see two centres in one stained blob. The cell is cut with a soft
    ellipse of random size and edge, so that no one seam becomes a cue. A donor cell cut by
    its own slide's frame (:func:`~cellmodel.infer.finder.cut_by_frame`) is not
    pasted: part of a cell, mid-slide, is no cell a slide shows. A cell placed beside one
    on the frame may fall partly outside it: the frame then cuts it as it cuts real cells
    (at least half of each side kept), and its box is the visible part, as annotated.
    """
    _, h, w = x.shape
    if cut_by_frame(dbox, (donor.shape[-1] * scale, donor.shape[-2] * scale)):
        return x, boxes
    x0, y0, x1, y1 = (int(round(v / scale)) for v in dbox)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, donor.shape[-1]), min(y1, donor.shape[-2])
    bw, bh = x1 - x0, y1 - y0
    if bw < 8 or bh < 8 or bw >= w or bh >= h:
        return x, boxes
    if boxes and rng.random() < 0.8:
        ax0, ay0, ax1, ay1 = (v / scale for v in boxes[int(rng.integers(len(boxes)))])
        over, shift = rng.uniform(0.0, 0.3), rng.uniform(-0.4, 0.4)
        side = int(rng.integers(4))
        acx, acy = (ax0 + ax1) / 2, (ay0 + ay1) / 2
        px, py = [
            (ax0 - bw + over * bw, acy - bh / 2 + shift * bh),
            (ax1 - over * bw, acy - bh / 2 + shift * bh),
            (acx - bw / 2 + shift * bw, ay0 - bh + over * bh),
            (acx - bw / 2 + shift * bw, ay1 - over * bh),
        ][side]
    else:
        px, py = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    px, py = int(round(px)), int(round(py))
    # the part inside the frame: (cx0, cy0)-(cx1, cy1) in the slide, offset (ox, oy) in the cell
    cx0, cy0, cx1, cy1 = max(px, 0), max(py, 0), min(px + bw, w), min(py + bh, h)
    if (cx1 - cx0) * 2 < bw or (cy1 - cy0) * 2 < bh:
        return x, boxes
    ox, oy = cx0 - px, cy0 - py
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, bh), torch.linspace(-1, 1, bw), indexing="ij")
    r = torch.sqrt(xx**2 + yy**2) / float(rng.uniform(0.9, 1.1))
    edge = float(rng.uniform(0.03, 0.15))
    mask = ((1.0 - r) / edge + 0.5).clamp(0, 1)
    mask = mask[oy : oy + cy1 - cy0, ox : ox + cx1 - cx0]
    cell = donor[:, y0 + oy : y0 + oy + cy1 - cy0, x0 + ox : x0 + ox + cx1 - cx0]
    x = x.clone()
    region = x[:, cy0:cy1, cx0:cx1]
    region.mul_(1 - mask).add_(cell * mask)
    new = (cx0 * scale, cy0 * scale, cx1 * scale, cy1 * scale)
    return x, [*boxes, new]


def focal_loss(logit: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg = 1 - pos
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - heat) ** 4 * neg
    n = pos.sum().clamp(min=1.0)
    return -(pos_loss.sum() + neg_loss.sum()) / n


# ---------------------------------------------------------------- training


def train_finder(
    images: list[Image.Image],
    boxes: list[list[Box]],
    cfg: LearnedFinderConfig | None = None,
    progress: bool = False,
) -> CentreNet | CentreEnsemble:
    """Train a :class:`CentreNet` from random weights on slides and their WBC boxes; with
    ``cfg.members`` > 1, that many (seeds ``cfg.seed``, ``cfg.seed + 1``, ...: each the
    network one would get with its seed alone) as a :class:`CentreEnsemble`."""
    cfg = cfg or LearnedFinderConfig()
    if cfg.members < 1:
        raise ValueError(f"members must be at least 1, got {cfg.members}")
    if cfg.members > 1:
        nets = []
        for i in range(cfg.members):
            if progress:
                print(f"network {i + 1} of {cfg.members} (seed {cfg.seed + i})", flush=True)
            one = dataclasses.replace(cfg, members=1, seed=cfg.seed + i)
            nets.append(train_finder(images, boxes, one, progress))
        return CentreEnsemble(nets).eval()
    if not images:
        raise ValueError("train_finder needs at least one annotated slide")
    if len(boxes) != len(images):
        raise ValueError(f"{len(images)} slides but {len(boxes)} box lists; give one per slide")
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(
            f"train_finder needs slides of one size, got {len(sizes)} ({sizes[0]} and "
            f"{sizes[-1]} among them): resize them to one size first"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    xs = [slide_tensor(im, cfg.downsample) for im in images]
    scale = images[0].size[0] / xs[0].shape[-1]
    model = CentreNet(cfg.width, cfg.stride)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xs) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(xs))
        run = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            batch, heats, regs, masks = [], [], [], []
            for i in idx:
                x, b = xs[i], boxes[i]
                if len(xs) > 1 and rng.random() < cfg.paste:
                    j = int(rng.integers(len(xs)))
                    if j != i and boxes[j]:
                        d = boxes[j][int(rng.integers(len(boxes[j])))]
                        x, b = _paste(x, b, xs[j], d, scale, rng)
                x, b = _augment(x, b, scale, rng)
                hm, rg, mk = targets(b, tuple(x.shape[-2:]), scale, cfg.stride, cfg.sigma)
                batch.append(x)
                heats.append(hm)
                regs.append(rg)
                masks.append(mk)
            x = torch.stack(batch)
            hm, rg, mk = torch.stack(heats), torch.stack(regs), torch.stack(masks)
            out = model(x)
            loss = focal_loss(out[:, :1], hm)
            n = mk.sum().clamp(min=1.0)
            loss = loss + (F.l1_loss(out[:, 1:], rg, reduction="none") * mk).sum() / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
        if progress:
            print(
                f"  epoch {epoch + 1}/{cfg.epochs}: loss {run / steps_per_epoch:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    return model


# ---------------------------------------------------------------- detection


def decode(
    y: torch.Tensor, sizes: list[tuple[int, int]], input_width: int, cfg: LearnedFinderConfig
) -> list[list[Detection]]:
    """Detections from the network's output ``y`` (N, 5, gh, gw), best score first.

    ``sizes``: each slide's (width, height) in pixels; ``input_width``: the width the
    network saw. A detection is a 3x3 local maximum of the heat map at or above
    ``cfg.min_score``; its box is clipped to the slide.
    """
    heat = torch.sigmoid(y[:, :1])
    peaks = (heat == F.max_pool2d(heat, 3, 1, 1)) & (heat >= cfg.min_score)
    out: list[list[Detection]] = []
    for j, (W, H) in enumerate(sizes):
        scale = W / input_width
        dets = []
        for gy, gx in torch.nonzero(peaks[j, 0]).tolist():
            ox, oy, lw, lh = y[j, 1:, gy, gx].tolist()
            cx = (gx + ox) * cfg.stride * scale
            cy = (gy + oy) * cfg.stride * scale
            bw, bh = math.exp(lw) * scale, math.exp(lh) * scale
            box = (max(0.0, cx - bw / 2), max(0.0, cy - bh / 2))
            box += (min(float(W), cx + bw / 2), min(float(H), cy + bh / 2))
            dets.append(Detection(*box, float(heat[j, 0, gy, gx]), 0.0))
        dets.sort(key=lambda d: -d.score)
        out.append(suppress_inner(dets, cfg.suppress) if cfg.suppress > 0 else dets)
    return out


def forward(model: nn.Module, x: torch.Tensor, flips: bool = False) -> torch.Tensor:
    """The network's maps for ``x`` (N, 5, gh, gw). With ``flips``: the heat map is the mean
    probability over ``x`` and its horizontal, vertical and double flips, each mapped back
    onto ``x``'s grid (returned as a logit, as the network's own), and the box's log width
    and height the mean of the four; the centre offsets are ``x``'s own (a flipped view's
    offset belongs to its own peak cell, which may be a neighbour)."""
    y = model(x)
    if not flips:
        return y
    heat = torch.sigmoid(y[:, :1])
    size = y[:, 3:].clone()
    for dims in ((-1,), (-2,), (-2, -1)):
        v = model(x.flip(dims)).flip(dims)
        heat = heat + torch.sigmoid(v[:, :1])
        size = size + v[:, 3:]
    y = y.clone()
    y[:, :1] = torch.logit((heat / 4).clamp(1e-6, 1 - 1e-6))
    y[:, 3:] = size / 4
    return y


def suppress_inner(dets: list[Detection], share: float) -> list[Detection]:
    """``dets`` (best score first) without each one that a stronger kept detection makes
    one cell with: either's centre inside the central ``share`` of the other's box (its
    width and height scaled by ``share``)."""

    def inside(a: Detection, b: Detection) -> bool:  # a's centre in b's central share
        return (
            abs(a.center[0] - b.center[0]) <= share * (b.xmax - b.xmin) / 2
            and abs(a.center[1] - b.center[1]) <= share * (b.ymax - b.ymin) / 2
        )

    kept: list[Detection] = []
    for d in dets:
        if not any(inside(d, k) or inside(k, d) for k in kept):
            kept.append(d)
    return kept


@torch.no_grad()
def detect(
    model: nn.Module, images: list[Image.Image], cfg: LearnedFinderConfig, batch: int = 16
) -> list[list[Detection]]:
    """White cells on each slide, best score first (boxes in slide pixels, clipped).

    Slides of one batch must share a size; ``images`` of mixed sizes go one at a time.
    """
    model.eval()
    out: list[list[Detection]] = []
    i = 0
    while i < len(images):
        same = 1  # a run of slides of one size, at most `batch`
        while same < batch and i + same < len(images) and images[i + same].size == images[i].size:
            same += 1
        chunk = images[i : i + same]
        x = torch.stack([slide_tensor(im, cfg.downsample) for im in chunk])
        out += decode(forward(model, x, cfg.flips), [im.size for im in chunk], x.shape[-1], cfg)
        i += same
    return out


def save(
    model: nn.Module,
    cfg: LearnedFinderConfig,
    uri: str,
    meta: dict | None = None,
    half: bool = False,
) -> None:
    """Write the weights with the settings that built them (a path or s3:// URI). ``half``:
    floating-point weights stored in float16 (half the file; :func:`load` reads them back
    into float32, the network computes as before)."""
    import io

    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(
        {"format": FORMAT, "config": cfg.to_dict(), "state_dict": state, "meta": meta or {}},
        buf,
    )
    storage.write_bytes(uri, buf.getvalue())


@functools.lru_cache(maxsize=4)
def load_cached(uri: str) -> tuple[nn.Module, LearnedFinderConfig]:
    """:func:`load`, once per process and URI (the slide job's finder tasks call it per slide)."""
    return load(uri)


def load(uri: str) -> tuple[nn.Module, LearnedFinderConfig]:
    """Read weights written by :func:`save`; a clear error for anything else."""
    return _build(_parse(_read_bytes(uri), uri), uri)


def check(uri: str) -> str:
    """Load the weights at ``uri`` once, as :func:`load` does (same errors), and return the
    file's SHA-256, to record which weights a job used."""
    raw = _read_bytes(uri)
    _build(_parse(raw, uri), uri)
    return hashlib.sha256(raw).hexdigest()


def _build(blob: dict, uri: str) -> tuple[nn.Module, LearnedFinderConfig]:
    unknown = set(blob["config"]) - set(LearnedFinderConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"{uri} holds settings this version does not know ({', '.join(sorted(unknown))}): "
            "it was written by another version of cellmodel; retrain it with jobs.train_finder"
        )
    cfg = LearnedFinderConfig(**recorded_settings(blob["config"]))
    if cfg.members > 1:
        model = CentreEnsemble([CentreNet(cfg.width, cfg.stride) for _ in range(cfg.members)])
    else:
        model = CentreNet(cfg.width, cfg.stride)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, cfg


def recorded_settings(settings: dict) -> dict:
    """The settings a file's recorded ``settings`` stand for. One it predates reads as what
    files of its time were built with: ``members`` 1 (one network), any other its default."""
    return LearnedFinderConfig().to_dict() | {"members": 1} | settings


def read_meta(uri: str) -> dict:
    """What :func:`save` recorded beside the weights (``trained_on``: the slide names)."""
    return dict(_parse(_read_bytes(uri), uri).get("meta") or {})


def _read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no finder weights at {uri}; train them with python -m jobs.train_finder"
        ) from None


def _parse(raw: bytes, uri: str) -> dict:
    import io

    try:
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        raise ValueError(f"{uri} is not a finder weights file ({e.__class__.__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{uri} is not a finder weights file (format {FORMAT} expected)")
    return blob
