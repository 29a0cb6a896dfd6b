"""Slides in the Pascal VOC layout (BCCD): boxes from XML, labels from ``labels.csv``, crops."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from PIL import Image

# The training geometry: crops are 320 wide and 240 high, centred on the cell.
CROP_SIZE = (320, 240)


class AnnotationError(ValueError):
    """A VOC XML file that is missing fields or not XML at all."""


@dataclass(frozen=True)
class Box:
    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @property
    def center(self) -> tuple[float, float]:
        return (self.xmin + self.xmax) / 2, (self.ymin + self.ymax) / 2

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.xmin, self.ymin, self.xmax, self.ymax)


def parse_voc(xml: bytes | str) -> tuple[tuple[int, int] | None, list[Box]]:
    """``((width, height) or None, boxes)`` from one VOC annotation."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise AnnotationError(f"malformed XML: {e}") from e
    size = None
    s = root.find("size")
    if s is not None and s.findtext("width") and s.findtext("height"):
        size = (int(float(s.findtext("width"))), int(float(s.findtext("height"))))
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise AnnotationError("an <object> lacks <name> or <bndbox>")
        try:
            coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"object {name!r} has a non-numeric or missing coordinate") from e
        boxes.append(Box(name, *coords))
    return size, boxes


def read_labels_csv(data: bytes | str) -> dict[int, list[str]]:
    """``{image number: [categories]}``; an empty category gives an empty list.

    Multi-label rows (``"NEUTROPHIL, EOSINOPHIL"``) give several names.
    """
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    out: dict[int, list[str]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        img = (row.get("Image") or "").strip()
        if not img.isdigit():
            continue
        cats = (row.get("Category") or "").replace(";", ",").split(",")
        out[int(img)] = [c.strip().upper() for c in cats if c.strip()]
    return out


def crop_around(
    img: Image.Image, center: tuple[float, float], size: tuple[int, int] = CROP_SIZE
) -> Image.Image:
    """A ``size`` (width, height) crop centred on ``center``.

    Near the border the window is shifted to stay inside the image when it can, so the
    crop shows real pixels; only an image smaller than ``size`` is padded (with edge
    colour, so the padding does not look like a dark nucleus).
    """
    w, h = size
    iw, ih = img.size
    cx, cy = center
    left = int(round(min(max(cx - w / 2, 0), max(iw - w, 0))))
    top = int(round(min(max(cy - h / 2, 0), max(ih - h, 0))))
    crop = img.crop((left, top, left + w, top + h))
    if iw < w or ih < h:
        import numpy as np

        a = np.asarray(img.crop((left, top, min(left + w, iw), min(top + h, ih))))
        a = np.pad(a, ((0, h - a.shape[0]), (0, w - a.shape[1]), (0, 0)), mode="edge")
        crop = Image.fromarray(a)
    return crop
