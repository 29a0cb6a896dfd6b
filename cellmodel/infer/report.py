"""What a person looks at after a slide run: overlay pictures and ``report.md``.

- :func:`draw_overlay`: the slide with a box per white cell, coloured by class, its class
  and confidence written above it; low-confidence cells get a dashed yellow box and a
  ``?``; a header line names the slide, its differential and its flags.
- :func:`write_overlays`: one PNG per slide at ``<output>/overlays/<slide_id>.png``,
  written by the slide job (``--overlays``) just before each part is committed (a rerun
  rewrites those of uncommitted slides, so they stay in step with the results).
- :func:`write_report`: ``<output>/report.md``: totals and differential, flagged slides,
  a per-slide table and a grid of overlays (flagged slides first).
"""

from __future__ import annotations

import time
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cellmodel import storage

OVERLAYS = "overlays"
REPORT_FILE = "report.md"
HEADER_PX = 26
COLOURS = {
    "EOSINOPHIL": (214, 82, 20),
    "LYMPHOCYTE": (25, 100, 220),
    "MONOCYTE": (20, 150, 60),
    "NEUTROPHIL": (140, 30, 160),
}
PALETTE = [(200, 40, 40), (40, 140, 140), (120, 90, 20), (90, 90, 90)]
LOW_COLOUR = (250, 210, 0)


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def colour(cls: str, classes: list[str]) -> tuple[int, int, int]:
    if cls in COLOURS:
        return COLOURS[cls]
    return PALETTE[classes.index(cls) % len(PALETTE)] if cls in classes else PALETTE[-1]


def short(cls: str) -> str:
    return {"EOSINOPHIL": "EOS", "LYMPHOCYTE": "LYM", "MONOCYTE": "MON", "NEUTROPHIL": "NEU"}.get(
        cls, cls[:4]
    )


def overlay_path(output: str, slide_id: str) -> str:
    """Where the overlay of ``slide_id`` goes (its id plus ``.png``: unique per slide)."""
    return storage.join(output, OVERLAYS, f"{slide_id}.png")


def _dashed_rect(draw: ImageDraw.ImageDraw, box, fill, width: int = 3, dash: int = 8) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, fixed in (
        (x0, x1, True, y0),
        (x0, x1, True, y1),
        (y0, y1, False, x0),
        (y0, y1, False, x1),
    ):
        p = a
        while p < b:
            q = min(p + dash, b)
            seg = (p, fixed, q, fixed) if horizontal else (fixed, p, fixed, q)
            draw.line(seg, fill=fill, width=width)
            p += 2 * dash


def draw_overlay(
    img: Image.Image,
    slide_id: str,
    cells: list[dict],
    classes: list[str],
    low_confidence: float = 0.5,
    flags: list[str] | tuple = (),
) -> Image.Image:
    """The slide with its cells drawn on it, under a one-line header (see module doc).

    ``cells``: dicts with ``xmin``, ``ymin``, ``xmax``, ``ymax`` (slide pixels) and
    ``probs`` (one probability per class).
    """
    img = img.convert("RGB")
    w, h = img.size
    canvas = Image.new("RGB", (w, h + HEADER_PX), (255, 255, 255))
    canvas.paste(img, (0, HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    counts = {c: 0 for c in classes}
    for c in cells:
        p = np.asarray(c["probs"], np.float32)
        j = int(np.argmax(p))
        cls, conf = classes[j], float(p[j])
        counts[cls] += 1
        box = (c["xmin"], c["ymin"] + HEADER_PX, c["xmax"] - 1, c["ymax"] + HEADER_PX - 1)
        col = colour(cls, classes)
        low = conf < low_confidence
        if low:
            draw.rectangle(box, outline=col, width=3)
            _dashed_rect(draw, box, LOW_COLOUR, width=3)
        else:
            draw.rectangle(box, outline=col, width=3)
        label = f"{'? ' if low else ''}{cls} {conf:.2f}"
        tw = draw.textlength(label, font=font)
        ty = box[1] - 18 if box[1] - 18 >= HEADER_PX else box[1] + 2
        tx = min(max(0, box[0]), max(0, w - tw - 6))
        draw.rectangle((tx, ty, tx + tw + 6, ty + 17), fill=LOW_COLOUR if low else col)
        draw.text((tx + 3, ty + 1), label, fill=(0, 0, 0) if low else (255, 255, 255), font=font)
    diff = ", ".join(f"{short(c)} {n}" for c, n in counts.items())
    head = f"{slide_id}: {len(cells)} white cell{'s' if len(cells) != 1 else ''} ({diff})"
    if flags:
        head += "  FLAGS: " + ", ".join(flags)
    draw.text((6, 5), head, fill=(160, 0, 0) if flags else (0, 0, 0), font=font)
    return canvas


def write_overlays(
    output: str, slides: list[dict], cells: list[dict], classes: list[str], low: float
) -> list[str]:
    """One overlay PNG per readable slide of a part; their URIs."""
    import io

    from cellmodel.data.transforms import decode_image

    by_slide: dict[str, list[dict]] = {}
    for c in cells:
        by_slide.setdefault(c["slide_id"], []).append(c)
    written = []
    for s in slides:
        if s["status"] != "ok":
            continue
        img = decode_image(storage.read_bytes(s["uri"]))
        pic = draw_overlay(
            img, s["slide_id"], by_slide.get(s["slide_id"], []), classes, low, s["flags"]
        )
        buf = io.BytesIO()
        pic.save(buf, "PNG", optimize=False)
        uri = overlay_path(output, s["slide_id"])
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)
    return written


def _rgb(v, signed: bool = False) -> str:
    return "RGB " + ", ".join(f"{x:+.1f}" if signed else f"{x:.1f}" for x in v)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _checkpoint_line(checkpoint) -> str:
    if isinstance(checkpoint, str):
        return f"- checkpoint: `{checkpoint}`"
    names = ", ".join(f"`{c}`" for c in checkpoint)
    return f"- checkpoints: an ensemble of {len(checkpoint)} (mean of their probabilities): {names}"


def write_report(
    output: str,
    summary: dict,
    *,
    low_confidence: float = 0.5,
    max_rows: int = 500,
    max_grid: int = 48,
    columns: int = 4,
) -> str:
    """Write ``<output>/report.md`` from the committed results; returns its URI."""
    from cellmodel.infer.slides import read_results

    cells, slides = read_results(output)
    lines = ["# Slide report", ""]
    lines += [
        f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{output}`",
        _checkpoint_line(summary.get("checkpoint", "?")),
        f"- {summary.get('n_slides', 0)} slides, {summary.get('n_cells', 0)} white cells; "
        f"{summary.get('n_no_white_cell', 0)} slides without a white cell, "
        f"{summary.get('n_low_confidence', 0)} with low-confidence cells "
        f"(top probability < {low_confidence}), {summary.get('n_errors', 0)} "
        "unreadable or without colour",
    ]
    if summary.get("train_rbc_diameter_px"):
        scale = summary.get("scale") or {}
        slides_d = (
            f"slides' diameter {scale['slide_rbc_diameter_px']:.1f} px, from the {scale['slide_from']}"
            if scale.get("slide_rbc_diameter_px") and scale.get("slide_from")
            else "each slide's own diameter measured on it"
        )
        lines.append(
            f"- pixel scale: cells cut at the training scale (training red-cell diameter "
            f"{summary['train_rbc_diameter_px']:.1f} px, from the {summary.get('scale_from')}; "
            f"{slides_d})"
        )
    else:
        lines.append(f"- pixel scale: no rescale ({summary.get('scale_from', 'not recorded')})")
    light = summary.get("light") or {}
    if light.get("train_background_rgb"):
        slide = f"the {light['slide_from']}" if light.get("slide_from") else "each slide's own"
        lines.append(
            f"- illumination: windows shifted to the training crops' background level "
            f"({_rgb(light['train_background_rgb'])}, from the {light.get('from')}; slides' "
            f"level from {slide}"
            + (f": shift {_rgb(light['offset'], signed=True)}" if light.get("offset") else "")
            + ")"
        )
    elif light:
        lines.append(f"- illumination: windows as cut ({light.get('from')})")
    lines += ["", "## Differential, all slides", "", "| class | cells | share |", "|---|---:|---:|"]
    counts = summary.get("counts", {})
    total = sum(counts.values())
    for c, n in counts.items():
        lines.append(f"| {c} | {n} | {_pct(n / total) if total else '-'} |")
    if slides.empty:
        lines += ["", "No slide has been committed yet."]
        return _save(output, lines)
    classes = [c.removeprefix("count_") for c in slides.columns if c.startswith("count_")]
    slides = slides.sort_values("slide_id").reset_index(drop=True)
    drawn = _overlays_written(output)  # a slide's name links to its picture where there is one

    def name(slide_id: str) -> str:
        return _link(slide_id) if slide_id in drawn else slide_id

    flagged = slides[[len(f) > 0 for f in slides["flags"]]]
    lines += ["", f"## Flagged slides ({len(flagged)})", ""]
    if len(flagged):
        lines += [
            "| slide | flags | cells | low-confidence cells | note |",
            "|---|---|---:|---:|---|",
        ]
        for r in flagged.head(max_rows).itertuples():
            note = (r.message or r.reason or "").replace("|", "/")[:80]
            lines.append(
                f"| {name(r.slide_id)} | {', '.join(r.flags)} | {r.n_cells} | "
                f"{r.n_low_confidence} | {note} |"
            )
        if len(flagged) > max_rows:
            lines.append(f"| ... {len(flagged) - max_rows} more | | | | |")
    else:
        lines.append("None.")
    lines += ["", "## Per slide", ""]
    head = "| slide | cells | " + " | ".join(short(c.upper()) for c in classes)
    lines += [head + " | top class | mean confidence | flags |"]
    lines += ["|---|---:|" + "---:|" * len(classes) + "---|---:|---|"]
    for r in slides.head(max_rows).itertuples():
        d = r._asdict()
        cnt = " | ".join(str(d[f"count_{c}"]) for c in classes)
        conf = (
            "-"
            if r.mean_confidence != r.mean_confidence or r.mean_confidence is None
            else (f"{r.mean_confidence:.2f}")
        )
        top = r.top_class if isinstance(r.top_class, str) and r.top_class else "-"
        lines.append(
            f"| {name(r.slide_id)} | {r.n_cells} | {cnt} | {top} | {conf} | {', '.join(r.flags)} |"
        )
    if len(slides) > max_rows:
        lines.append(f"\n{len(slides) - max_rows} more slides: see `slides/*.parquet`.")
    # The overlay grid: flagged slides first, then the others, as far as max_grid.
    ok = slides[slides.status == "ok"]
    order = list(flagged[flagged.status == "ok"].slide_id) + [
        s for s in ok.slide_id if s not in set(flagged.slide_id)
    ]
    shown = [s for s in order if s in drawn][:max_grid]
    if shown:
        lines += ["", f"## Overlays ({len(shown)} of {len(ok)} slides; flagged first)", ""]
        lines.append("| " + " | ".join([" "] * columns) + " |")
        lines.append("|" + "---|" * columns)
        for i in range(0, len(shown), columns):
            row = [
                f"![{s}]({quote(OVERLAYS + '/' + s + '.png')})<br>{s}"
                for s in shown[i : i + columns]
            ]
            row += [" "] * (columns - len(row))
            lines.append("| " + " | ".join(row) + " |")
    return _save(output, lines)


def _link(slide_id: str) -> str:
    return f"[{slide_id}]({quote(OVERLAYS + '/' + slide_id + '.png')})"


def _overlays_written(output: str) -> set[str]:
    """The slide ids with an overlay under ``<output>/overlays`` (one listing, not a request
    per slide: an output on object storage may hold thousands)."""
    fs, root = storage.get_fs(storage.join(output, OVERLAYS))
    if not fs.exists(root):
        return set()
    root = root.rstrip("/") + "/"
    return {
        p.removeprefix(root).removesuffix(".png")
        for p in fs.find(root)
        if p.startswith(root) and p.endswith(".png")
    }


def _save(output: str, lines: list[str]) -> str:
    uri = storage.join(output, REPORT_FILE)
    storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri
