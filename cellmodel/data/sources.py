"""Find and load the cells of an ingest source: a crop folder or BCCD-style slides.

Each valid cell becomes an ``Item``: its crop (encoded, at the dataset's crop size), class
and source id (the unit a train/val split must not cut through). Anything unusable becomes
a ``Skip`` with a reason code, so the ingest can report it and carry on.

Classes are data: a crop folder's class folders, a slide folder's ``labels.csv`` categories,
or the list the user gives (``classes``); anything else is skipped as ``class_not_listed``.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from cellmodel import storage
from cellmodel.data.transforms import IMAGE_EXTS, ImageDecodeError, decode_image
from cellmodel.data.voc import CROP_SIZE, AnnotationError, crop_around, parse_voc, read_labels_csv

LAYOUTS = ("auto", "crops", "slides")
_SLIDE_RE = re.compile(r"(\d+)$")


class SourceError(ValueError):
    """The ingest source is missing or has no recognisable layout."""


@dataclass
class Item:
    key: str  # path relative to the source root, for reports and row ids
    label_name: str
    source_id: str
    image: bytes  # encoded crop at the dataset's crop size


@dataclass
class Skip:
    item: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"item": self.item, "reason": self.reason, "detail": self.detail}


@dataclass
class Source:
    uri: str
    layout: str
    source_known: bool
    grouping: str
    tasks: list[tuple[str, Callable[[], Item | Skip | list[Item | Skip]]]] = field(
        default_factory=list
    )
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # found (or given), sorted

    def load(self, workers: int = 4) -> Iterator[Item | Skip]:
        """Load every candidate (I/O and decoding in a thread pool), in a stable order."""
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for result in pool.map(lambda t: t[1](), self.tasks):
                yield from result if isinstance(result, list) else [result]


def class_name(name: str) -> str:
    """The canonical spelling of a class: upper case, no surrounding blanks."""
    return name.strip().upper()


def stored_size(crop_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size crops are stored at: the ``crop_size`` window resized by ``scale``."""
    return max(1, round(crop_size[0] * scale)), max(1, round(crop_size[1] * scale))


def _encode(crop, scale: float) -> bytes:
    if scale != 1.0:
        crop = crop.resize(stored_size(crop.size, scale), Image.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _as_crop(data: bytes, crop_size: tuple[int, int] = CROP_SIZE, scale: float = 1.0) -> bytes:
    """Validated crop bytes; re-cut (not rescaled) to ``crop_size`` when the file has another
    size, then resized by ``scale``."""
    img = decode_image(data)
    jpeg_or_png = data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
    if img.size == tuple(crop_size) and jpeg_or_png and scale == 1.0:
        return data
    crop = crop_around(img, (img.size[0] / 2, img.size[1] / 2), tuple(crop_size))
    return _encode(crop, scale)


def detect_layout(uri: str) -> str:
    try:
        fs, root = storage.get_fs(uri)
        found, isdir = fs.exists(root), fs.isdir(root)
    except Exception as e:  # credentials, unreachable endpoint, unknown protocol
        raise SourceError(f"cannot access source {uri}: {type(e).__name__}: {e}") from e
    if not found:
        raise SourceError(f"source {uri} does not exist; give a crop folder or a slide folder")
    if not isdir:
        raise SourceError(f"source {uri} is a file; give a folder (crop folders or slides)")
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    if "Annotations" in names or "labels.csv" in names:
        return "slides"
    return "crops"


@dataclass
class ClassFolder:
    """One ``<root>/<CLASS>/`` folder: its name as written, and the files below it."""

    name: str
    path: str
    images: list[str]  # paths with an image extension (``IMAGE_EXTS``), sorted
    others: list[str]  # every other file, sorted


def class_folders(fs, root: str) -> list[ClassFolder]:
    """The class folders directly under ``root``, sorted by name, hidden ones (``.name``)
    ignored; each with every file below it (recursively), split by extension.

    The one walker of class-folder trees: ingest's crop folders and evaluation's data."""
    out = []
    for e in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        name = posixpath.basename(e["name"].rstrip("/"))
        if e["type"] != "directory" or name.startswith("."):
            continue
        files = sorted(fs.find(e["name"]))
        is_image = [f.lower().endswith(IMAGE_EXTS) for f in files]
        out.append(ClassFolder(name, e["name"],
                               images=[f for f, i in zip(files, is_image) if i],
                               others=[f for f, i in zip(files, is_image) if not i]))  # fmt: skip
    return out


def crop_folder(
    uri: str,
    classes: list[str] | None = None,
    crop_size: tuple[int, int] = CROP_SIZE,
    scale: float = 1.0,
) -> Source:
    """``<uri>/<CLASS>/*.jpeg``: each file is one cell and, as names do not identify the
    source cell, its own source (``source_known`` false) until ingest groups the copies.

    Every class folder is a class, unless ``classes`` lists the ones to keep."""
    fs, root = storage.get_fs(uri)
    src = Source(str(uri), "crops", source_known=False, grouping="file")
    wanted = {class_name(c) for c in classes} if classes else None
    found = set()
    for folder in class_folders(fs, root):
        cls = class_name(folder.name)
        if wanted is not None and cls not in wanted:
            n = len(folder.images) + len(folder.others)
            src.skipped.append(Skip(folder.name + "/", "class_not_listed",
                                    f"folder of {n} files; classes asked for: {sorted(wanted)}"))  # fmt: skip
            continue
        found.add(cls)
        for f in folder.others:
            rel = posixpath.relpath(f, root)
            src.skipped.append(Skip(rel, "not_an_image_file", "unknown file extension"))
        if not folder.images:
            src.skipped.append(Skip(folder.name + "/", "empty_class_folder", "no image files"))
        for f in folder.images:
            rel = posixpath.relpath(f, root)
            src.tasks.append((rel, _crop_task(fs, f, rel, cls, crop_size, scale)))
    for cls in sorted(wanted or ()):
        if cls not in found:
            src.skipped.append(Skip(cls + "/", "missing_class_folder", "no folder for this class"))
    src.classes = sorted(found)
    return src


def _crop_task(fs, path: str, rel: str, cls: str, crop_size: tuple[int, int], scale: float):
    def run() -> Item | Skip:
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
            data = _as_crop(data, crop_size, scale)
        except ImageDecodeError as e:
            return Skip(rel, e.reason, str(e))
        except OSError as e:
            return Skip(rel, "unreadable", str(e))
        # The file is the finest grouping we can vouch for (see docs/ingest.md).
        return Item(rel, cls, f"{cls}/{posixpath.splitext(posixpath.basename(rel))[0]}", data)

    return run


def slide_folder(
    uri: str,
    classes: list[str] | None = None,
    crop_size: tuple[int, int] = CROP_SIZE,
    scale: float = 1.0,
) -> Source:
    """BCCD layout: ``JPEGImages/*.jpg``, ``Annotations/*.xml``, ``labels.csv``.

    The slide is the source. A slide is skipped (and reported) when it is unlabelled,
    multi-labelled, of a class not trained, without a WBC box, or its files are bad.
    With several WBC boxes but one label, the largest box is used (and noted).
    """
    fs, root = storage.get_fs(uri)
    src = Source(str(uri), "slides", source_known=True, grouping="slide")
    labels_path = posixpath.join(root, "labels.csv")
    if not fs.exists(labels_path):
        raise SourceError(f"slide source {uri} has no labels.csv (columns Image,Category)")
    labels = read_labels_csv(fs.cat_file(labels_path))
    img_dir = posixpath.join(root, "JPEGImages")
    ann_dir = posixpath.join(root, "Annotations")
    images = {}
    if fs.exists(img_dir):
        for p in fs.find(img_dir):
            stem, ext = posixpath.splitext(posixpath.basename(p))
            m = _SLIDE_RE.search(stem)
            if ext.lower() in IMAGE_EXTS and m:
                images[int(m.group(1))] = p
    numbers = sorted(set(images) | set(labels))
    wanted = {class_name(c) for c in classes} if classes else None
    found = set()
    for n in numbers:
        name = f"BloodImage_{n:05d}"
        cats = labels.get(n)
        if n not in images:
            src.skipped.append(Skip(name, "missing_image", "listed in labels.csv, no image file"))
            continue
        if not cats:
            src.skipped.append(Skip(name, "unlabelled", "no category in labels.csv"))
            continue
        if len(set(cats)) > 1:
            src.skipped.append(Skip(name, "multi_labelled", ", ".join(cats)))
            continue
        cls = class_name(cats[0])
        if wanted is not None and cls not in wanted:
            src.skipped.append(Skip(name, "class_not_listed", cats[0]))
            continue
        found.add(cls)
        xml = posixpath.join(ann_dir, posixpath.splitext(posixpath.basename(images[n]))[0] + ".xml")
        src.tasks.append(
            (name, _slide_task(fs, images[n], xml, name, cls, src.notes, crop_size, scale))
        )
    src.classes = sorted(found)
    return src


def _slide_task(
    fs, img_path: str, xml_path: str, name: str, cls: str, notes: list[str], crop_size, scale
):
    def run() -> Item | Skip:
        try:
            xml = fs.cat_file(xml_path)
        except FileNotFoundError:
            return Skip(name, "missing_annotation", posixpath.basename(xml_path))
        try:
            _, boxes = parse_voc(xml)
        except AnnotationError as e:
            return Skip(name, "malformed_annotation", str(e))
        try:
            img = decode_image(fs.cat_file(img_path))
        except ImageDecodeError as e:
            return Skip(name, e.reason, str(e))
        except OSError as e:
            return Skip(name, "unreadable", str(e))
        wbc = [b for b in boxes if b.name.upper() == "WBC"]
        if not wbc:
            return Skip(name, "no_wbc_box", "the annotation has no WBC box")
        w, h = img.size
        inside = [b for b in wbc if 0 <= b.center[0] < w and 0 <= b.center[1] < h]
        inside = [b for b in inside if b.xmax > b.xmin and b.ymax > b.ymin]
        if not inside:
            return Skip(name, "box_outside_image", f"WBC box(es) not within the {w}x{h} image")
        box = max(inside, key=lambda b: (b.xmax - b.xmin) * (b.ymax - b.ymin))
        if len(inside) > 1:
            notes.append(f"{name}: {len(inside)} WBC boxes and one label; used the largest")
        crop = crop_around(img, box.center, tuple(crop_size))
        return Item(name, cls, name, _encode(crop, scale))

    return run


def open_source(
    uri: str,
    layout: str = "auto",
    classes: list[str] | None = None,
    crop_size: tuple[int, int] = CROP_SIZE,
    scale: float = 1.0,
) -> Source:
    """The ``Source`` at ``uri``; ``layout`` is ``auto``, ``crops`` or ``slides``. Crops are
    cut as ``crop_size`` windows and stored resized by ``scale``."""
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    detected = detect_layout(uri)
    layout = detected if layout == "auto" else layout
    make = slide_folder if layout == "slides" else crop_folder
    return make(uri, classes, tuple(crop_size), float(scale))
