"""Bulk slide classification: slide images in, a white-cell differential per slide out.

The pipeline is two Ray Data stages and one writer:

1. ``find_batch`` (tasks): read each slide, find its white cells, cut one crop per cell at
   the training geometry (320x240, centred on the cell). A slide with no cell, or one that
   cannot be read, still yields one placeholder row so that it is reported.
2. ``Classifier`` (an actor pool, ``concurrency`` actors, GPUs when present): classify the
   crops in batches of ``batch_size`` cells.
3. The driver gathers rows per slide; once every cell of a slide is back, the slide is
   complete. Complete slides are written in parts of ``slides_per_part`` slides:
   ``cells/part-H.parquet``, ``slides/part-H.parquet``, then ``_committed/part-H.json``
   last. ``H`` is a hash of the slide ids in the part.

Exactly once, by the commit protocol (``cellmodel.commit``, ``PARTS``): a part exists for
readers only once its marker exists. A re-run reads the markers, skips committed slides,
and deletes data files without a marker (left by a run killed between the data files and
the marker), so no slide is ever counted twice. Only one run at a time may write to one
output.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from cellmodel import commit, storage
from cellmodel.config import Section, apply_overrides, read_toml, validate_settings
from cellmodel.infer.finder import FinderConfig, find_cells_at_scale

log = logging.getLogger(__name__)

from cellmodel.data.transforms import IMAGE_EXTS as IMAGE_EXTENSIONS  # noqa: E402

COMMITTED = "_committed"
FRAMINGS = ("inside", "centre")
JOB_FILE = "_job.json"
SUMMARY_FILE = "summary.json"
# The output in the commit protocol: per part, two data files committed by one marker.
PARTS = commit.Layout(
    markers=f"{COMMITTED}/*.json",
    data=("cells/*", "slides/*"),
    files=lambda m: [f"cells/{m['part']}.parquet", f"slides/{m['part']}.parquet"],
)


class SlidesError(RuntimeError):
    """A user mistake: no slides at the input, an output written by another checkpoint..."""


class SlidesConfig(Section):
    """Settings of the slide job (``jobs/configs/slides.toml`` holds the defaults).

    Read with :func:`load_config` (or ``cellmodel.config.load_settings``): unknown keys and
    bad values are reported together, in one ``ConfigError``.
    """

    batch_size: int = Field(32, ge=1)  # cells per model batch
    concurrency: int = Field(2, ge=1)  # classifier actors
    num_gpus: float | None = Field(None, ge=0)  # per actor; None: 1 on a GPU cluster, else 0
    find_batch_size: int = Field(4, ge=1)  # slides per finder task batch
    slides_per_part: int = Field(64, ge=1)  # slides per output Parquet part
    low_confidence: float = Field(0.5, ge=0, le=1)  # top probability under this: doubtful
    backend: Literal["eager", "onnx", "auto"] = "eager"  # auto: ONNX Runtime on CPU
    tta: bool = False  # average each cell over its 8 flips and quarter turns (8x the compute)
    # Pixel scale (cellmodel.data.scale): cut each cell with a window that shows what a
    # training crop shows, i.e. crop size x slide red-cell diameter / training red-cell
    # diameter, resized to the crop size. The training diameter comes from the
    # checkpoint (meta["data"]["rbc_diameter_px"]), else from train_rbc_diameter_px;
    # without either, cells are cut at the crop size (no rescale).
    rescale: bool = True
    train_rbc_diameter_px: float | None = Field(None, gt=0)
    # A number: used for every slide. None: measured from the slides themselves, as the
    # median over up to `scale_sample` slides of the input drawn by a fixed seed ("archive":
    # one microscope, one scale; the per-slide estimate is noisy) or on each slide alone
    # ("slide": for inputs that mix microscopes; a slide with too few red cells is not
    # rescaled).
    slide_rbc_diameter_px: float | None = Field(None, gt=0)
    slide_scale: Literal["archive", "slide"] = "archive"
    scale_sample: int = Field(64, ge=1)
    overlays: bool = False  # write overlays/<slide>.png (boxes, class, confidence, flags)
    # On a slide with several white cells, paint the other cells (an ellipse in each box,
    # outside this cell's box) in the slide's background colour before cutting a cell:
    # at the training scale the window is wide enough to show a neighbour, and training
    # crops show one white cell.
    mask_neighbours: bool = True
    # How a cell's window meets the slide's border: "inside" moves the window to stay on the
    # slide (the cell off centre, as in crops of whole fields such as blood-cells TRAIN);
    # "centre" keeps the cell centred and repeats the edge pixels beyond the border.
    # Chosen on training slides (BENCHMARKS.md, "Framing").
    framing: Literal["inside", "centre"] = "inside"
    # Illumination (cellmodel.data.light): shift each cell's window, per channel, by the
    # training crops' background level minus the slides' (the plasma between the cells).
    # "archive": the slides' level is the median over the same sample of slides as the
    # scale; "slide": each slide's own; "off": windows as cut. The training level comes
    # from the checkpoint (meta["data"]["background_rgb"]), else from
    # train_background_rgb; without either, nothing is shifted. Chosen on training
    # slides (BENCHMARKS.md, "Slide illumination").
    light: Literal["archive", "slide", "off"] = "archive"
    train_background_rgb: tuple[float, float, float] | None = None
    slide_background_rgb: tuple[float, float, float] | None = None
    finder: FinderConfig = Field(default_factory=FinderConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def load_config(
    path: str | os.PathLike | None,
    flags: dict | None = None,
    overrides: list[str] | None = None,
) -> SlidesConfig:
    """The slide job's settings: a TOML file (None: the defaults), then ``key=value``
    overrides (``finder.min_area=1500``), then command-line ``flags`` (None values are
    not given), validated together (``cellmodel.config``: one ``ConfigError`` lists every
    problem). A relative ``finder.weights`` path in the file is relative to the file (an
    override's is relative to the working directory)."""
    d = read_toml(path) if path is not None else {}
    weights = (d.get("finder") or {}).get("weights")
    if isinstance(weights, str) and not storage.is_remote(weights) and not os.path.isabs(weights):
        d["finder"]["weights"] = str((Path(path).parent / weights).resolve())
    apply_overrides(d, list(overrides or []))
    d.update({k: v for k, v in (flags or {}).items() if v is not None})
    return validate_settings(SlidesConfig, d)


# ---------------------------------------------------------------- listing and state


def list_slides(input_uri: str) -> list[tuple[str, str]]:
    """``[(slide_id, uri)]`` for every JPEG/PNG under ``input_uri``, sorted by id.

    ``slide_id`` is the path relative to ``input_uri``; a single image file is accepted too.
    """
    fs, path = storage.get_fs(input_uri)
    if not fs.exists(path):
        raise SlidesError(f"input {input_uri} does not exist; give a folder or prefix of slides")
    proto = input_uri.split("://", 1)[0] + "://" if storage.is_remote(input_uri) else ""
    if fs.isfile(path):
        return [(os.path.basename(path), proto + path)]
    root = path.rstrip("/") + "/"
    every = fs.find(path)
    found = [p for p in every if p.lower().endswith(IMAGE_EXTENSIONS)]
    out = sorted((p[len(root) :] if p.startswith(root) else p, proto + p) for p in found)
    if not out:
        raise SlidesError(
            f"no slide images ({', '.join(IMAGE_EXTENSIONS)}) under {input_uri}; "
            "check the input folder or prefix"
        )
    kept = set(found)
    others = Counter(os.path.splitext(p)[1].lower() or "(none)" for p in every if p not in kept)
    if others:  # said, so that a folder of another format is not taken for an empty one
        n = sum(others.values())
        log.warning(
            "%s under %s left out, not slide images by their names (%s); the job reads %s",
            f"{n} file" + ("s" if n > 1 else ""),
            input_uri,
            ", ".join(f"{ext} {n}" for ext, n in others.most_common(8)),
            " ".join(IMAGE_EXTENSIONS),
        )
    return out


def part_name(slide_ids: list[str]) -> str:
    """A name that depends only on the set of slides in the part."""
    h = hashlib.sha1("\n".join(sorted(slide_ids)).encode()).hexdigest()[:16]
    return f"part-{h}"


def committed_parts(output: str) -> list[dict]:
    """The markers of every committed part (what readers may see), sorted by name."""
    return commit.committed(output, PARTS)


# Settings that change how a job runs, not what it writes: a resumed job may change them.
RUN_ONLY = frozenset(
    {
        "batch_size",
        "concurrency",
        "num_gpus",
        "find_batch_size",
        "slides_per_part",
        "overlays",
        "backend",
    }
)


def read_job(output: str) -> dict | None:
    """The job record of ``output`` (``_job.json``), or None before the first run."""
    uri = storage.join(output, JOB_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _changed(old: dict, job: dict) -> list[str]:
    """The settings (``config`` keys, ``scale``, ``light``, the finder's weights) of ``job``
    that differ from ``old``'s, i.e. that would make a resumed output mix two kinds of result."""
    a, b = old.get("config") or {}, job.get("config") or {}
    keys = sorted(k for k in set(a) | set(b) if k not in RUN_ONLY and a.get(k) != b.get(k))
    return keys + [
        k for k in ("scale", "light", "finder_weights_sha256") if old.get(k) != job.get(k)
    ]


def check_job(output: str, job: dict) -> None:
    """Record which checkpoint and settings write ``output``; refuse to mix two checkpoints,
    or two sets of settings that change the results, in one output."""
    old = read_job(output)
    if old is None:
        storage.write_bytes(storage.join(output, JOB_FILE), json.dumps(job, indent=2).encode())
        return
    for k in ("checkpoint", "classes"):
        if old.get(k) != job.get(k):
            raise SlidesError(
                f"{output} holds results of {k} {old.get(k)!r}, not {job.get(k)!r}; "
                "write to a new output, or rerun with the same checkpoint to resume"
            )
    if changed := _changed(old, job):
        raise SlidesError(
            f"{output} holds results made with other settings ({', '.join(changed)} differ from "
            f"its {JOB_FILE}); write to a new output, or rerun with the same settings to resume"
        )


# ---------------------------------------------------------------- stage 1: finder


GRAYSCALE = (
    "the slide has no colour (grey levels only): the finder and the classifier read the "
    "stain's colours; scan or export the slide in colour"
)
BLANK = (
    "the image is blank (one flat level, no cells or background on it): an empty scan or "
    "frame; check the scan or the export"
)


def _slide_row(slide_id, uri, status="ok", reason="", message="", size=(0, 0)) -> dict:
    row = dict(slide_id=slide_id, uri=uri, status=status, reason=reason, message=message)
    return row | dict(width=size[0], height=size[1])


def window_origin(
    center: tuple[float, float], window: tuple[int, int], size: tuple[int, int], framing: str
) -> tuple[int, int]:
    """The top left corner, on a slide of ``size``, of the ``window`` that :func:`cut_cell`
    cuts around ``center`` with ``framing``."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    (ww, wh), (iw, ih) = window, size
    left = int(round(center[0] - ww / 2))
    top = int(round(center[1] - wh / 2))
    if framing == "inside":
        left = min(max(left, min(0, iw - ww)), max(0, iw - ww))
        top = min(max(top, min(0, ih - wh)), max(0, ih - wh))
    return left, top


def cut_cell(
    img,
    center: tuple[float, float],
    window: tuple[int, int],
    size: tuple[int, int],
    framing: str = "centre",
) -> np.ndarray:
    """A ``window`` (width, height) around ``center``, resized to ``size``; uint8 HxWx3.

    ``framing="centre"``: the window is centred on the cell; where it leaves the slide, the
    slide's edge pixels are repeated. ``"inside"``: the window is moved (the cell off its
    centre) to stay on the slide as far as it fits, so only a window larger than the slide
    shows repeated edges; this is how a dataset of whole-field crops frames its cells.
    """
    from PIL import Image

    ww, wh = window
    iw, ih = img.size
    left, top = window_origin(center, window, img.size, framing)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + ww, iw), min(top + wh, ih)
    if x1 <= x0 or y1 <= y0:  # centre outside the slide: should not happen
        x0, y0, x1, y1 = 0, 0, iw, ih
    part = img.crop((x0, y0, x1, y1))
    if (x0, y0, x1, y1) != (left, top, left + ww, top + wh):
        a = np.asarray(part)
        pad = ((y0 - top, top + wh - y1), (x0 - left, left + ww - x1), (0, 0))
        part = Image.fromarray(np.pad(a, [(max(0, p), max(0, q)) for p, q in pad], mode="edge"))
    if part.size != tuple(size):
        part = part.resize(tuple(size), Image.BILINEAR)
    return np.asarray(part)


def hide_others(img, cell, others):
    """``img`` with each of ``others`` (an ellipse inscribed in its box, outside ``cell``'s
    box) painted in the slide's background colour (the median of its brightest tenth)."""
    from PIL import Image, ImageDraw

    a = np.asarray(img)
    g = a[..., 1]
    bright = a[g >= np.percentile(g, 90)]
    bg = tuple(int(v) for v in np.median(bright, axis=0))
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    for o in others:
        draw.ellipse(o.as_tuple(), fill=255)
    draw.rectangle(cell.as_tuple(), fill=0)
    out = img.copy()
    out.paste(Image.new("RGB", img.size, bg), (0, 0), mask)
    return out


def find_batch(
    batch: dict,
    finder: dict,
    crop_size: tuple[int, int],
    train_rbc_px: float | None = None,
    slide_rbc_px: float | None = None,
    mask_neighbours: bool = False,
    framing: str = "centre",
    train_background: tuple | None = None,
    slide_background: tuple | None = None,
    finder_rbc_px: float | None = None,
    archive_size: tuple | None = None,
) -> dict:
    """Stage 1 on a batch of slides (``slide_id``, ``uri``): one row per found cell.

    The slide's red-cell diameter is ``slide_rbc_px`` or measured on the slide. The finder
    sees the slide resized to its own scale (``finder_rbc_px``, see ``FinderConfig``), and
    each cell is cut at the training pixel scale when ``train_rbc_px`` is given (see
    ``SlidesConfig``). With ``train_background`` (R, G, B), each window is shifted by it
    minus the slide's background level: ``slide_background`` or measured on the slide.
    ``archive_size`` (width, height): the archive's measured ``slide_rbc_px`` and
    ``slide_background`` hold for slides of that size only; another size (another camera)
    is measured alone. Slides with no cell, or that failed, give one row with ``cell_index``
    -1.
    """
    from cellmodel.data.light import background_rgb, has_colour, is_blank, light_offset, relight
    from cellmodel.data.scale import crop_window, estimate_rbc_diameter
    from cellmodel.data.transforms import ImageDecodeError, decode_image

    fcfg = validate_settings(FinderConfig, finder or {})
    w, h = crop_size
    rows, crops = [], []
    for slide_id, uri in zip(batch["slide_id"], batch["uri"], strict=True):
        slide_id, uri = str(slide_id), str(uri)
        rbc, window, offset = None, (w, h), None
        try:
            img = decode_image(storage.read_bytes(uri))
        except ImageDecodeError as e:
            dets, base = [], _slide_row(slide_id, uri, "error", e.reason, str(e))
        except OSError as e:  # missing object, permission, network
            msg = f"{type(e).__name__}: {e}"
            dets, base = [], _slide_row(slide_id, uri, "error", "unreadable", msg)
        else:
            if not has_colour(img):
                blank = is_blank(img)  # an empty frame is no grey scan of a slide
                reason, msg = ("blank", BLANK) if blank else ("grayscale", GRAYSCALE)
                base = _slide_row(slide_id, uri, "error", reason, msg, img.size)
                dets = []
            else:
                # the archive's camera, landscape or portrait
                of_archive = archive_size is None or sorted(img.size) == sorted(archive_size)
                if slide_rbc_px and of_archive:
                    rbc = slide_rbc_px
                elif train_rbc_px or finder_rbc_px:
                    rbc = estimate_rbc_diameter(img)
                dets, _ = find_cells_at_scale(img, fcfg, rbc, finder_rbc_px)
                base = _slide_row(slide_id, uri, size=img.size)
                if train_rbc_px and dets:
                    window = crop_window((w, h), rbc, train_rbc_px)
                if train_background is not None and dets:
                    level = (
                        slide_background if slide_background is not None and of_archive else None
                    )
                    level = background_rgb(img) if level is None else level
                    offset = None if level is None else light_offset(train_background, level)
        base["rbc_diameter_px"] = float(rbc) if rbc else float("nan")
        base["crop_scale"] = window[0] / w
        base["light_offset"] = float(np.mean(offset)) if offset is not None else float("nan")
        for i, d in enumerate(dets or [None]):
            row = dict(base, n_cells=len(dets), cell_index=i if d else -1)
            box = d.as_tuple() if d else (0.0, 0.0, 0.0, 0.0)
            row.update(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
            row["det_score"] = d.score if d else 0.0
            # where the cell lies in its crop (x, y, half its box's long side), for a model
            # that reads the window around the cell: that window is framed on this cell
            row["near"] = (0.0, 0.0, 0.0)
            if d is not None:
                left, top = window_origin(d.center, window, img.size, framing)
                k = w / window[0]
                half = max(d.xmax - d.xmin, d.ymax - d.ymin) / 2
                row["near"] = ((d.center[0] - left) * k, (d.center[1] - top) * k, half * k)
            rows.append(row)
            src = img
            if d is not None and mask_neighbours and len(dets) > 1:
                src = hide_others(img, d, [o for o in dets if o is not d])
            crop = cut_cell(src, d.center, window, (w, h), framing) if d else None
            crops.append(relight(crop, offset) if crop is not None else None)
    if not rows:
        return {}
    out = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
    blank = np.zeros((h, w, 3), np.uint8)  # placeholders; never classified
    out["crop"] = np.stack([c if c is not None else blank for c in crops])
    return out


# ---------------------------------------------------------------- stage 2: classifier


class Classifier:
    """Ray Data actor: loads the checkpoint once (every member of an ensemble: a list of
    checkpoints, the mean of their probabilities), then classifies crop batches."""

    def __init__(
        self,
        checkpoint: str | list[str],
        batch_size: int = 32,
        backend: str = "eager",
        tta: bool = False,
    ) -> None:
        from cellmodel.infer.ensemble import load_predictor

        # Only name a non-default backend, so the default works with any Predictor version.
        kw: dict = {"backend": backend} if backend != "eager" else {}
        if tta:
            kw["tta"] = True
        self.predictor = load_predictor(checkpoint, **kw)
        self.pre = self.predictor.cfg.preprocessing()
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        from cellmodel.data.transforms import to_array

        crops, near = batch.pop("crop"), batch.pop("near")
        idx = np.nonzero(batch["cell_index"] >= 0)[0]
        probs = np.full((len(crops), len(self.predictor.classes)), np.nan, np.float32)
        for s in range(0, len(idx), self.batch_size):
            sel = idx[s : s + self.batch_size]
            x = np.stack(
                [to_array(Image.fromarray(crops[i]), self.pre, tuple(near[i])) for i in sel]
            )
            probs[sel] = self.predictor.predict_arrays(x)
        batch["probs"] = probs
        return batch


# ---------------------------------------------------------------- writing


def _cells_table(rows: list[dict], classes: list[str]) -> pa.Table:
    keys = ("slide_id", "cell_index", "xmin", "ymin", "xmax", "ymax", "det_score")
    cols = {k: [r[k] for r in rows] for k in keys}
    probs = np.asarray([r["probs"] for r in rows], np.float32).reshape(len(rows), len(classes))
    pred = probs.argmax(1) if len(rows) else np.zeros(0, np.int64)
    table = {
        "slide_id": pa.array(cols["slide_id"], pa.string()),
        "cell_index": pa.array(cols["cell_index"], pa.int32()),
        **{k: pa.array(cols[k], pa.float32()) for k in ("xmin", "ymin", "xmax", "ymax")},
        "det_score": pa.array(cols["det_score"], pa.float32()),
        "pred_label": pa.array(pred, pa.int32()),
        "pred_class": pa.array([classes[i] for i in pred], pa.string()),
        "confidence": pa.array(probs.max(1) if len(rows) else [], pa.float32()),
    }
    for j, c in enumerate(classes):
        table[f"prob_{c.lower()}"] = pa.array(probs[:, j], pa.float32())
    return pa.table(table)


def summarize_slide(first: dict, cells: list[dict], classes: list[str], low: float) -> dict:
    """The per-slide row: counts and fractions per class, confidence and flags."""
    probs = np.asarray([c["probs"] for c in cells], np.float32).reshape(len(cells), len(classes))
    pred = probs.argmax(1)
    conf = probs.max(1)
    counts = np.bincount(pred, minlength=len(classes))
    n = len(cells)
    row = {
        k: first[k] for k in ("slide_id", "uri", "status", "reason", "message", "width", "height")
    }
    row["n_cells"] = n
    rbc = first.get("rbc_diameter_px")
    row["rbc_diameter_px"] = None if rbc is None or rbc != rbc else float(rbc)  # NaN: unknown
    row["crop_scale"] = float(first.get("crop_scale", 1.0))
    off = first.get("light_offset")
    row["light_offset"] = None if off is None or off != off else float(off)  # NaN: not shifted
    for j, c in enumerate(classes):
        row[f"count_{c.lower()}"] = int(counts[j])
    for j, c in enumerate(classes):
        row[f"frac_{c.lower()}"] = float(counts[j] / n) if n else 0.0
    # The slide's class: most cells; ties go to the class with the larger summed probability.
    row["top_class"] = classes[int(np.lexsort((probs.sum(0), counts))[-1])] if n else None
    row["mean_confidence"] = float(conf.mean()) if n else None
    row["n_low_confidence"] = int((conf < low).sum())
    flags = []
    if first["status"] != "ok":
        reason = first["reason"]
        flags.append(reason if reason in ("grayscale", "blank") else "unreadable")
    elif n == 0:
        flags.append("no_white_cell")
    if row["n_low_confidence"]:
        flags.append("low_confidence")
    row["flags"] = flags
    return row


def _slides_schema(classes: list[str]) -> pa.Schema:
    # Explicit, so that a part where every value is null (no cells) has the same schema.
    s, i32, f32 = pa.string(), pa.int32(), pa.float32()
    fields = [(k, s) for k in ("slide_id", "uri", "status", "reason", "message")]
    fields += [("width", i32), ("height", i32), ("n_cells", i32)]
    fields += [("rbc_diameter_px", f32), ("crop_scale", f32), ("light_offset", f32)]
    fields += [(f"count_{c.lower()}", i32) for c in classes]
    fields += [(f"frac_{c.lower()}", f32) for c in classes]
    fields += [("top_class", s), ("mean_confidence", f32), ("n_low_confidence", i32)]
    return pa.schema(fields + [("flags", pa.list_(s))])


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(
    output: str,
    slides: list[dict],
    cells: list[dict],
    classes: list[str],
    *,
    fault: commit.Fault | None = None,
) -> dict:
    """Write one part (cells, slides, then the marker) and return its marker.

    ``fault`` (tests) stops the part after its first data file, the cells file when
    ``after_files`` is 1: the worst moment for a kill.
    """
    name = part_name([s["slide_id"] for s in slides])
    unit = commit.Unit(output, PARTS, f"{COMMITTED}/{name}.json", fault=fault)
    unit.write(f"cells/{name}.parquet", _parquet_bytes(_cells_table(cells, classes)))
    stable = pa.Table.from_pylist(slides, schema=_slides_schema(classes))
    unit.write(f"slides/{name}.parquet", _parquet_bytes(stable))
    marker = {
        "part": name,
        "slides": [s["slide_id"] for s in slides],
        "n_slides": len(slides),
        "n_errors": sum(s["status"] != "ok" for s in slides),
        "n_cells": len(cells),
        "n_no_white_cell": sum("no_white_cell" in s["flags"] for s in slides),
        "n_low_confidence": sum("low_confidence" in s["flags"] for s in slides),
        "counts": {c: sum(s[f"count_{c.lower()}"] for s in slides) for c in classes},
        "errors": {s["slide_id"]: s["reason"] for s in slides if s["status"] != "ok"},
    }
    return unit.commit(marker)


# ---------------------------------------------------------------- the job


def summarize(output: str, parts: list[dict] | None = None) -> dict:
    """Totals over every committed part of ``output``."""
    parts = committed_parts(output) if parts is None else parts
    counts: dict[str, int] = {}
    for p in parts:
        for c, n in p["counts"].items():
            counts[c] = counts.get(c, 0) + n
    total = sum(counts.values())
    keys = ("n_slides", "n_errors", "n_cells", "n_no_white_cell", "n_low_confidence")
    out = {k: sum(p[k] for p in parts) for k in keys}
    out.update(
        n_parts=len(parts),
        counts=counts,
        fractions={c: (n / total if total else 0.0) for c, n in counts.items()},
        errors={k: v for p in parts for k, v in p["errors"].items()},
    )
    return out


def _read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def read_results(output: str) -> tuple:
    """``(cells, slides)`` pandas DataFrames of the committed parts only."""
    import pandas as pd

    cells, slides = [], []
    for p in committed_parts(output):
        cells.append(_read_table(storage.join(output, "cells", p["part"] + ".parquet")))
        slides.append(_read_table(storage.join(output, "slides", p["part"] + ".parquet")))
    if not cells:
        return pd.DataFrame(), pd.DataFrame()
    return (
        pa.concat_tables(cells, promote_options="default").to_pandas(),
        pa.concat_tables(slides, promote_options="default").to_pandas(),
    )


def _actor_gpus(cfg: SlidesConfig) -> float:
    import ray

    if cfg.num_gpus is not None:
        return float(cfg.num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_slides(
    input_uri: str,
    checkpoint: str | Sequence[str],
    output: str,
    cfg: SlidesConfig | None = None,
    *,
    limit: int | None = None,
    progress: bool = True,
    fault_after_parts: int | None = None,
    fault_mode: Literal["raise", "hang"] = "raise",
) -> dict:
    """Classify every slide under ``input_uri`` not yet committed in ``output``.

    ``checkpoint``: one checkpoint, or several (a seed ensemble: each cell gets the mean of
    their probabilities; :func:`ensemble_meta` says what the members must share), or an
    ensemble folder (its members).
    Returns the summary (also written to ``<output>/summary.json``), with ``n_new``
    (slides processed by this run), ``n_skipped`` and ``seconds``.

    ``fault_after_parts`` (tests): after committing that many parts, stop the next part
    between its cells file and its marker: raise ``commit.InjectedFault`` (``fault_mode``
    "raise") or wait there to be killed ("hang").
    """
    import ray
    from tqdm import tqdm

    from cellmodel.data.light import light_offset
    from cellmodel.data.voc import CROP_SIZE
    from cellmodel.models.checkpoint import expand_checkpoints

    cfg = cfg or SlidesConfig()
    t0 = time.perf_counter()
    members = expand_checkpoints(checkpoint)  # an ensemble folder: its members
    meta = ensemble_meta(members, cfg)
    checkpoint = members[0] if len(members) == 1 else members
    classes = list(meta["classes"])
    slides = list_slides(input_uri)[:limit]
    # The same local checkpoint named by a relative or an absolute path is one checkpoint;
    # an ensemble is its set of members, in any order.
    ids = [c if storage.is_remote(c) else os.path.abspath(c) for c in members]
    ckpt_id = ids[0] if len(ids) == 1 else sorted(ids)
    train_rbc, scale_from = training_scale(meta, cfg)
    log.info("pixel scale: training red-cell diameter %s px (%s)", train_rbc, scale_from)
    job = dict(checkpoint=ckpt_id, classes=classes, input=input_uri, config=cfg.to_dict())
    job["scale"] = {"train_rbc_diameter_px": train_rbc, "from": scale_from}
    if cfg.finder.method == "learned":
        job["finder_weights_sha256"] = learned_weights_digest(str(cfg.finder.weights))
    train_bg, light_from = training_light(meta, cfg)
    job["light"] = {"train_background_rgb": train_bg, "from": light_from}
    finder_rbc = finder_scale(cfg.finder)
    job["scale"]["finder_rbc_diameter_px"] = finder_rbc
    slide_rbc, slide_bg = cfg.slide_rbc_diameter_px, cfg.slide_background_rgb
    need_rbc = (train_rbc or finder_rbc) and slide_rbc is None and cfg.slide_scale == "archive"
    need_bg = train_bg and slide_bg is None and cfg.light == "archive"
    # One output, one archive scale and light: a resumed job (the input may have grown since)
    # keeps what its first run measured instead of measuring again.
    old = read_job(output) or {}
    old_scale, old_light = old.get("scale") or {}, old.get("light") or {}
    if need_rbc and "slide_rbc_diameter_px" in old_scale:
        need_rbc = False
        slide_rbc = old_scale["slide_rbc_diameter_px"]
        keep = ("slide_rbc_diameter_px", "slide_from", "archive_size")
        job["scale"].update({k: old_scale[k] for k in keep if k in old_scale})
    if need_bg and "slide_background_rgb" in old_light:
        need_bg = False
        slide_bg = old_light["slide_background_rgb"]
        keep = ("slide_background_rgb", "slide_from", "archive_size")
        job["light"].update({k: old_light[k] for k in keep if k in old_light})
    if train_rbc and cfg.slide_rbc_diameter_px:
        job["scale"].update(
            slide_rbc_diameter_px=slide_rbc, slide_from="slide_rbc_diameter_px setting"
        )
    if train_bg and cfg.slide_background_rgb:
        job["light"].update(
            slide_background_rgb=list(slide_bg), slide_from="slide_background_rgb setting"
        )
    sample = archive_sample(slides, cfg.scale_sample) if need_rbc or need_bg else None
    if sample is not None:
        # One archive, one camera: measured on the slides of its commonest image size; a
        # slide of another size is measured alone (find_batch).
        size, sample = commonest_size(sample)
        for part, measured in (("scale", need_rbc), ("light", need_bg)):
            if measured:
                job[part]["archive_size"] = list(size) if size else None
    if need_rbc:
        slide_rbc, n_measured = archive_rbc_diameter(slides, cfg.scale_sample, sample)
        job["scale"]["slide_rbc_diameter_px"] = slide_rbc
        job["scale"]["slide_from"] = f"median of {n_measured} slides of the input"
    if need_bg:
        slide_bg, n_measured = archive_background(slides, cfg.scale_sample, sample)
        job["light"]["slide_background_rgb"] = slide_bg
        job["light"]["slide_from"] = f"median of {n_measured} slides of the input"
    log.info("pixel scale: %s", job["scale"])
    if train_bg and slide_bg:
        job["light"]["offset"] = [round(float(v), 1) for v in light_offset(train_bg, slide_bg)]
    log.info("illumination: %s", job["light"])
    models = [m["model"] for m in meta["ensemble"]] if "ensemble" in meta else None
    check_job(output, job | {"model": models or meta.get("model_name")})
    parts = committed_parts(output)
    for p in commit.remove_uncommitted(output, PARTS, parts):
        log.warning("removed %s: written by an interrupted run without its marker", p)
    done = {s for p in parts for s in p["slides"]}
    todo = [(sid, uri) for sid, uri in slides if sid not in done]
    n_done = len(slides) - len(todo)
    log.info(
        "%d slides at %s: %d already done, %d to do", len(slides), input_uri, n_done, len(todo)
    )
    if todo:
        from cellmodel.cluster import ensure_ray

        ensure_ray()
        ds = ray.data.from_items(
            [{"slide_id": s, "uri": u} for s, u in todo],
            override_num_blocks=max(1, min(len(todo) // cfg.find_batch_size, 200)),
        )
        ds = ds.map_batches(
            find_batch,
            batch_size=cfg.find_batch_size,
            batch_format="numpy",
            fn_kwargs={
                "finder": cfg.finder.to_dict(),
                "crop_size": CROP_SIZE,
                "train_rbc_px": train_rbc,
                "slide_rbc_px": slide_rbc,
                "mask_neighbours": cfg.mask_neighbours,
                "framing": cfg.framing,
                "train_background": train_bg,
                "slide_background": slide_bg,
                "finder_rbc_px": finder_rbc,
                # measured values hold for the archive's image size; set ones for every slide
                "archive_size": None
                if cfg.slide_rbc_diameter_px or cfg.slide_background_rgb
                else (job["scale"].get("archive_size") or job["light"].get("archive_size")),
            },
        )
        ds = ds.map_batches(
            Classifier,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "batch_size": cfg.batch_size,
                "backend": cfg.backend,
                "tta": cfg.tta,
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=_actor_gpus(cfg),
        )
        fault = None if fault_after_parts is None else (fault_after_parts, fault_mode)
        _collect(ds, output, classes, cfg, parts, len(todo), progress and tqdm, fault)
    summary = summarize(output)
    summary.update(
        n_new=len(todo),
        n_skipped=len(slides) - len(todo),
        seconds=round(time.perf_counter() - t0, 2),
        checkpoint=checkpoint,
        train_rbc_diameter_px=train_rbc,
        scale_from=scale_from,
        scale=job["scale"],
        light=job["light"],
    )
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2).encode())
    from cellmodel.infer.report import write_report

    write_report(output, summary, low_confidence=cfg.low_confidence)
    return summary


def ensemble_meta(checkpoints: list[str], cfg: SlidesConfig) -> dict:
    """The first checkpoint's metadata, once every other one agrees with it on what the job
    needs from a checkpoint: the classes, the input size and preprocessing, and the
    training pixel scale and illumination the windows are cut and relit to (where the
    settings use them). Checked before any slide is read; ``SlidesError`` names the member
    that differs and how."""
    from cellmodel.infer.ensemble import member_differences
    from cellmodel.models.checkpoint import read_checkpoint_meta

    if not checkpoints:
        raise SlidesError("no checkpoint given; pass one, or several for an ensemble")
    if len(set(checkpoints)) < len(checkpoints):
        raise SlidesError(
            f"a checkpoint is named twice in {checkpoints}; an ensemble's members are distinct"
        )
    metas = [read_checkpoint_meta(c) for c in checkpoints]
    first = metas[0]

    def reads(m: dict) -> dict:
        return {
            "training red-cell diameter": training_scale(m, cfg)[0],
            "training background level": training_light(m, cfg)[0],
        }

    want = reads(first)
    for uri, m in zip(checkpoints[1:], metas[1:]):
        got = reads(m)
        diff = member_differences(first["classes"], first["preprocessing"], m["classes"],
                                  m["preprocessing"])  # fmt: skip
        diff += [
            f"{k} {got[k]} instead of {want[k]}"
            for k in want
            if not _measured_alike(got[k], want[k])
        ]
        if diff:
            raise SlidesError(
                f"{uri} cannot join an ensemble with {checkpoints[0]}: {'; '.join(diff)}. "
                "Ensemble checkpoints trained on the same data with the same input settings "
                "(a seed ensemble), or classify with each one alone"
            )
    if len(metas) == 1:
        return first
    members = [
        {"checkpoint": c, "model": m.get("model_name"), "weights_sha256": m.get("weights_sha256")}
        for c, m in zip(checkpoints, metas)
    ]
    # Members measured alike (within the tolerances) read slides at their mean level and scale.
    data = dict(first.get("data") or {})
    for key in ("background_rgb", "rbc_diameter_px"):
        got = [(m.get("data") or {}).get(key) for m in metas]
        if all(v is not None for v in got) and any(v != got[0] for v in got):
            mean = np.mean(np.asarray(got, dtype=float), axis=0)
            data[key] = [round(float(v), 2) for v in mean] if mean.ndim else round(float(mean), 2)
    return first | {"data": data, "ensemble": members}


# How far apart two members' recorded training measurements may be and still read slides
# alike: the background level is the median of a sample of crops (two ingests of the same
# crops differ by about half a level) and the red-cell diameter an estimate from a sample of
# slides. 3 levels of 255 is about 1 % brightness, 3 % of scale is within the training's
# own zoom jitter; members further apart were trained on different data.
BACKGROUND_TOLERANCE = 3.0  # grey levels, per channel
DIAMETER_TOLERANCE = 0.03  # relative


def _measured_alike(a, b) -> bool:
    """Two recorded measurements within tolerance: background levels (R, G, B) or
    red-cell diameters (px); neither recorded also counts as alike."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)):
        return max(abs(float(x) - float(y)) for x, y in zip(a, b)) <= BACKGROUND_TOLERANCE
    return abs(float(a) - float(b)) <= DIAMETER_TOLERANCE * max(float(a), float(b))


def learned_weights_digest(uri: str) -> str:
    """The SHA-256 of the learned finder's weights file, read and checked once here so that a
    missing or foreign file fails before any slide is read (a ``SlidesError``)."""
    from cellmodel.infer.learned_finder import check

    try:
        return check(uri)
    except (FileNotFoundError, ValueError) as e:
        raise SlidesError(f"finder.weights: {e}") from None


def archive_sample(slides: list[tuple[str, str]], sample: int) -> list:
    """Up to ``sample`` of ``slides`` (``(slide_id, uri)``), drawn by a fixed seed (the same
    slides on a rerun) and decoded once: what the archive's pixel scale and illumination are
    measured on. An unreadable slide, and a grey one (its plasma has no stain colour to
    measure the archive's by), is an 8x8 black placeholder, which neither measures nor
    counts towards the archive's image size (the job reports the slide itself)."""
    from PIL import Image

    from cellmodel.data.light import has_colour
    from cellmodel.data.transforms import ImageDecodeError, decode_image

    idx = np.arange(len(slides))
    if len(slides) > sample:
        idx = np.sort(np.random.default_rng(0).choice(len(slides), sample, replace=False))
    out = []
    for i in idx:
        try:
            img = decode_image(storage.read_bytes(slides[i][1]))
        except (ImageDecodeError, OSError):
            img = None
        out.append(img if img is not None and has_colour(img) else Image.new("RGB", (8, 8)))
    return out


def commonest_size(images: list) -> tuple[tuple[int, int] | None, list]:
    """The commonest image size among ``images`` (width x height with the longer side
    first, so a portrait shot counts with its landscape twin; the unreadable ones, 8x8
    placeholders, left out) and the images of that size; ``(None, images)`` when none is
    readable."""
    sizes = [tuple(sorted(im.size, reverse=True)) for im in images if im.size != (8, 8)]
    if not sizes:
        return None, images
    size = max(set(sizes), key=lambda s: (sizes.count(s), s))
    return size, [im for im in images if sorted(im.size) == sorted(size)]


def finder_scale(finder: FinderConfig) -> float | None:
    """The red-cell diameter (px) of the slides the finder was made for: a learned weights
    file's own record, else ``finder.rbc_diameter_px``; None (the setting) turns it off."""
    if finder.rbc_diameter_px is None:
        return None
    if finder.method == "learned":
        from cellmodel.infer.learned_finder import read_meta

        if v := read_meta(str(finder.weights)).get("rbc_diameter_px"):
            return float(v)
    return float(finder.rbc_diameter_px)


def archive_rbc_diameter(
    slides: list[tuple[str, str]], sample: int, images: list | None = None
) -> tuple[float | None, int]:
    """``(median red-cell diameter, slides measured)`` over :func:`archive_sample`
    (``images``: that sample, already decoded) (``cellmodel.data.scale``); None when no
    slide has enough red cells (each slide is then measured alone)."""
    from cellmodel.data.scale import estimate_dataset_scale

    images = archive_sample(slides, sample) if images is None else images
    est = estimate_dataset_scale(images, n=max(1, len(images)))
    return est.get("rbc_diameter_px"), est["measured"]


def archive_background(
    slides: list[tuple[str, str]], sample: int, images: list | None = None
) -> tuple[list | None, int]:
    """``(median background level R, G, B, slides measured)`` over :func:`archive_sample`
    (``cellmodel.data.light``); None when no slide could be measured (each slide is then
    measured alone)."""
    from cellmodel.data.light import estimate_dataset_background

    images = archive_sample(slides, sample) if images is None else images
    est = estimate_dataset_background(images, n=max(1, len(images)))
    return est["background_rgb"], est["background_images"]


def training_light(meta: dict, cfg: SlidesConfig) -> tuple[list | None, str]:
    """``(training crops' background level R, G, B or None, where it came from)``."""
    if cfg.light == "off":
        return None, "light is off"
    v = (meta.get("data") or {}).get("background_rgb")
    if v:
        return [float(x) for x in v], "checkpoint"
    if cfg.train_background_rgb:
        return [float(x) for x in cfg.train_background_rgb], "train_background_rgb setting"
    return None, "unknown: neither the checkpoint nor the settings give it; windows as cut"


def training_scale(meta: dict, cfg: SlidesConfig) -> tuple[float | None, str]:
    """``(training red-cell diameter in px or None, where it came from)``."""
    if not cfg.rescale:
        return None, "rescale is off"
    v = (meta.get("data") or {}).get("rbc_diameter_px")
    if v:
        return float(v), "checkpoint"
    if cfg.train_rbc_diameter_px:
        return float(cfg.train_rbc_diameter_px), "train_rbc_diameter_px setting"
    return None, "unknown: neither the checkpoint nor the settings give it; no rescale"


def _collect(ds, output, classes, cfg, parts, total, tqdm_cls, fault=None) -> None:
    """Group the classified rows per slide and write complete slides part by part.

    ``fault``: ``(after_parts, mode)``, see ``run_slides``.
    """
    pending: dict[str, list[dict]] = {}
    written = 0  # parts committed by this run
    group_slides: list[dict] = []
    group_cells: list[dict] = []
    bar = tqdm_cls(total=total, unit="slide", desc="slides") if tqdm_cls else None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["slide_id"])):
            row = {k: _plain(v[i]) for k, v in batch.items()}
            rows = pending.setdefault(row["slide_id"], [])
            rows.append(row)
            if len(rows) > max(row["n_cells"], 1):
                raise RuntimeError(f"slide {row['slide_id']} came back more than once")
            if len(rows) < max(row["n_cells"], 1):
                continue
            del pending[row["slide_id"]]
            cells = sorted((r for r in rows if r["cell_index"] >= 0), key=lambda r: r["cell_index"])
            group_slides.append(summarize_slide(rows[0], cells, classes, cfg.low_confidence))
            group_cells.extend(cells)
            if bar:
                bar.update(1)
            if len(group_slides) >= cfg.slides_per_part:
                _flush(output, group_slides, group_cells, classes, parts, cfg, fault, written)
                written += 1
    if group_slides:
        _flush(output, group_slides, group_cells, classes, parts, cfg, fault, written)
    if bar:
        bar.close()
    if pending:
        raise RuntimeError(f"{len(pending)} slides came back incomplete: {sorted(pending)[:5]}")


def _plain(v):
    # numpy scalars to Python values (Parquet/JSON friendly); arrays stay arrays.
    return v.item() if isinstance(v, np.generic) else v


def _flush(output, group_slides, group_cells, classes, parts, cfg, fault, written) -> None:
    """Commit one part; ``written`` parts are committed by this run so far."""
    if cfg.overlays:
        from cellmodel.infer.report import write_overlays

        write_overlays(output, group_slides, group_cells, classes, cfg.low_confidence)
    # The fault (tests) hits the first part past its count, right after the cells file.
    hit = fault is not None and written >= fault[0]
    stop = commit.Fault(after_files=1, mode=fault[1]) if hit else None
    parts.append(write_part(output, group_slides, group_cells, classes, fault=stop))
    name, n_slides, n_cells = parts[-1]["part"], len(group_slides), len(group_cells)
    log.info("committed %s (%d slides, %d cells)", name, n_slides, n_cells)
    group_slides.clear()
    group_cells.clear()
