"""``python -m jobs.bench serve_int8``: int8 accuracy on a leak-free split, and CPU timings.

The int8 serving backend (``onnx-int8``) is only worth having if it keeps the fp32 model's
answers. This checks it on cells the model never saw, with a checkpoint trained here in a few
minutes (no ImageNet weights can be downloaded, so it starts from random weights):

1. crop the white cell of every single-label BCCD slide (EOS/LYM/MONO/NEUT; the largest WBC
   box), split by slide (60/20/20 per class, seed 0): no cell is on two sides;
2. train xception_bilstm (320x240) for ``--train-s`` seconds (random rotation, flip and shift
   on the device, class-balanced sampling, label smoothing 0.1, AdamW 1e-3 with cosine decay,
   bf16 autocast), keeping the state with the lowest validation loss;
3. on the CPU: eager, ONNX Runtime fp32 and int8 (static, calibrated on 64 training crops)
   on the held-out test slides: accuracy, top-1 agreement, also over the 8 dihedral views;
4. per-image time of eager, ONNX Runtime fp32 (spinning off/on, optimisation level basic) and
   int8, pinned to two cores (``os.sched_setaffinity``), batch 1 and 8, and the fp32 matmul
   rate for the FLOP floor.

Meant for a machine with a GPU (the training); ``--device cpu --model tiny_bilstm`` runs it
anywhere as a smoke test. Results are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cellmodel.infer.predictor import DIHEDRAL, Predictor, dihedral, softmax
from cellmodel.models import build_model, save_checkpoint

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jobs.bench serve_int8", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd"))
    ap.add_argument("--train-s", type=float, default=210.0, help="training time budget")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="xception_bilstm")
    ap.add_argument("--steps-per-eval", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs/serve_int8"))
    ap.add_argument("--cpu-threads", type=int, default=8, help="threads for the accuracy part")
    args = ap.parse_args(argv)
    root, OUT, T_TRAIN = args.bccd, args.out, args.train_s
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "int8.txt", "w")

    def say(*parts):
        s = " ".join(str(x) for x in parts)
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    labels = {}
    for r in csv.DictReader(open(root / "labels.csv")):
        if r["Image"].strip().isdigit():
            cats = [
                c.strip().upper() for c in r["Category"].replace(";", ",").split(",") if c.strip()
            ]
            if len(cats) == 1 and cats[0] in CLASSES:
                labels[int(r["Image"])] = CLASSES.index(cats[0])

    def crop(n, w=352, h=272):  # a margin for random shifts; the centre 320x240 is the crop
        x = root / "Annotations" / f"BloodImage_{n:05d}.xml"
        if not x.exists():
            return None
        boxes = [
            o.find("bndbox") for o in ET.parse(x).iter("object") if o.findtext("name") == "WBC"
        ]
        if not boxes:
            return None
        b = max(
            boxes,
            key=lambda b: (
                (float(b.findtext("xmax")) - float(b.findtext("xmin")))
                * (float(b.findtext("ymax")) - float(b.findtext("ymin")))
            ),
        )
        cx = (float(b.findtext("xmin")) + float(b.findtext("xmax"))) / 2
        cy = (float(b.findtext("ymin")) + float(b.findtext("ymax"))) / 2
        img = Image.open(root / "JPEGImages" / f"BloodImage_{n:05d}.jpg").convert("RGB")
        arr = np.pad(np.asarray(img), ((h, h), (w, w), (0, 0)), mode="symmetric")
        left, top = int(round(cx - w / 2)) + w, int(round(cy - h / 2)) + h
        return arr[top : top + h, left : left + w]

    items = [(n, k, crop(n)) for n, k in sorted(labels.items())]
    items = [(n, k, c) for n, k, c in items if c is not None]
    rng = np.random.default_rng(0)
    split = {}
    for k in range(4):
        ns = [n for n, kk, _ in items if kk == k]
        rng.shuffle(ns)
        a, b = int(round(0.6 * len(ns))), int(round(0.8 * len(ns)))
        for i, n in enumerate(ns):
            split[n] = "train" if i < a else ("val" if i < b else "test")
    sets = {s: [(k, c) for n, k, c in items if split[n] == s] for s in ("train", "val", "test")}
    say(
        "slides per split:",
        {s: len(v) for s, v in sets.items()},
        "per class train:",
        np.bincount([k for k, _ in sets["train"]], minlength=4).tolist(),
        "test:",
        np.bincount([k for k, _ in sets["test"]], minlength=4).tolist(),
    )

    dev = args.device
    torch.manual_seed(0)
    MODEL = args.model
    model = (
        build_model(MODEL, **({"input_size": (3, 240, 320)} if MODEL.startswith("tiny") else {}))
        .to(dev)
        .to(memory_format=torch.channels_last)
    )
    pre = model.cfg.preprocessing()
    mean = torch.tensor(pre["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], device=dev).view(1, 3, 1, 1)

    def tens(s):
        x = (
            torch.from_numpy(np.stack([c for _, c in sets[s]])).to(dev).permute(0, 3, 1, 2).float()
            / 255
        )
        return x, torch.tensor([k for k, _ in sets[s]], device=dev)

    Xtr, Ytr = tens("train")
    Xva, Yva = tens("val")
    Xte, Yte = tens("test")

    def centre(x):
        return x[:, :, 16:256, 16:336]

    def augment(x):
        n = len(x)
        ang = torch.rand(n, device=dev) * 2 * math.pi
        flip = (torch.rand(n, device=dev) < 0.5).float() * 2 - 1
        cos, sin = torch.cos(ang), torch.sin(ang)
        sx, sy = 320 / 352, 240 / 272  # sample a 320x240 window of the 352x272 margin crop
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * torch.tensor(
            [16 / 176, 16 / 136], device=dev
        )
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = cos * flip * sx
        theta[:, 0, 1] = -sin * sx * (272 / 352)
        theta[:, 1, 0] = sin * flip * sy * (352 / 272)
        theta[:, 1, 1] = cos * sy
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, (n, 3, 240, 320), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)

    def norm(x):
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    w = 1.0 / torch.bincount(Ytr, minlength=4).float()
    p = w[Ytr] / w[Ytr].sum()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t0, step, best = time.time(), 0, (float("inf"), None, 0)
    while time.time() - t0 < T_TRAIN:
        model.train()
        for _ in range(args.steps_per_eval):
            idx = torch.multinomial(p, 48, replacement=True)
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(
                    model(norm(augment(Xtr[idx]))), Ytr[idx], label_smoothing=0.1
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        for g in opt.param_groups:
            g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / T_TRAIN)))
        model.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
            lv = model(norm(centre(Xva))).float()
        vl = F.cross_entropy(lv, Yva).item()
        va = (lv.argmax(1) == Yva).float().mean().item()
        if vl < best[0]:
            best = (
                vl,
                {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()},
                step,
            )
        say(
            f"t={time.time() - t0:.0f}s step {step} train loss {loss.item():.3f} val loss {vl:.3f} val acc {va:.3f}"
        )
    model.load_state_dict(best[1])
    model = model.float().cpu().eval().to(memory_format=torch.contiguous_format)
    ck = save_checkpoint(model, str(OUT / "model"))
    say(f"best val loss {best[0]:.3f} at step {best[2]}; checkpoint {ck}")

    torch.set_num_threads(args.cpu_threads)

    def to_u8(x):
        return (centre(x) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    te, tr = to_u8(Xte), to_u8(Xtr)
    calib_idx = np.random.default_rng(1).choice(len(tr), size=min(64, len(tr)), replace=False)
    fp32 = Predictor(ck, "cpu", backend="onnx", num_threads=args.cpu_threads)
    calib = fp32.normalize_uint8(tr[calib_idx])
    int8 = Predictor(
        ck, "cpu", backend="onnx-int8", num_threads=args.cpu_threads, calibration=calib
    )
    eager = Predictor(ck, "cpu", backend="eager", num_threads=args.cpu_threads)
    x = fp32.normalize_uint8(te)
    y = Yte.cpu().numpy()
    P = {n: m.predict_arrays(x) for n, m in (("eager", eager), ("fp32", fp32), ("int8", int8))}
    acc = {n: float((v.argmax(1) == y).mean()) for n, v in P.items()}
    views = np.concatenate([dihedral(x, k, f) for k, f in DIHEDRAL])
    l32, l8 = fp32.logits_arrays(views), int8.logits_arrays(views)
    yv = np.tile(y, len(DIHEDRAL))
    res = {
        "test_slides": int(len(y)),
        "accuracy": acc,
        "agreement_plain": float((P["fp32"].argmax(1) == P["int8"].argmax(1)).mean()),
        "views": int(len(views)),
        "accuracy_views": {
            "fp32": float((l32.argmax(1) == yv).mean()),
            "int8": float((l8.argmax(1) == yv).mean()),
        },
        "agreement_views": float((l32.argmax(1) == l8.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(softmax(l32) - softmax(l8)).max()),
        "tta_accuracy_fp32": float(
            (softmax(l32).reshape(8, len(y), 4).mean(0).argmax(1) == y).mean()
        ),
    }
    say(json.dumps(res))

    # quiet-CPU timings on 2 cores
    os.sched_setaffinity(0, {0, 1})
    torch.set_num_threads(2)
    from cellmodel.infer.export import OnnxForward, export_onnx, quantize_int8

    blob = export_onnx(model, model.cfg.input_size)
    runs = {
        "eager": Predictor(ck, "cpu", backend="eager", num_threads=2).logits_arrays,
        "onnx fp32": OnnxForward(blob, 2),
        "onnx fp32 spin": OnnxForward(blob, 2, spin=True),
        "onnx fp32 basic": OnnxForward(blob, 2, optimization="basic"),
        "onnx int8": OnnxForward(quantize_int8(blob, calib), 2),
    }

    def best_ms(f, xb, reps):
        f(xb)
        b = 1e9
        for _ in range(reps):
            t = time.perf_counter()
            f(xb)
            b = min(b, time.perf_counter() - t)
        return b / len(xb) * 1e3

    ma, mb = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm = best_ms(lambda _: ma @ mb, np.zeros(1), 20) / 1e3  # seconds per 1024^3 product
    cpu = platform.processor() or platform.machine()
    say(f"cpu: {cpu}, 2 cores pinned; fp32 matmul {2 * 1024**3 / mm / 1e9:.1f} GFLOP/s")
    for b in (1, 8):
        xb = x[:b] if len(x) >= b else np.concatenate([x] * 8)[:b]
        say(
            f"batch {b}: "
            + ", ".join(
                f"{n} {best_ms(f, xb, 5 if b == 1 else 3):.1f} ms/img" for n, f in runs.items()
            )
        )
    return 0
