"""Image decoding for the endpoint, with the costs bounded before any pixel is decoded.

Two steps per request: ``probe`` every image (header only: the format against the
allow-list, the size against the per-image limit, the pixels the decode will cost), check the
request's total against its pixel budget, then ``load`` each one: JPEG draft-mode decoding,
EXIF orientation, RGB, resized to the model's input, as uint8 (the classifier normalises).

Nothing here knows about Ray or HTTP status codes beyond the errors it raises.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cellmodel.data.transforms import ImageDecodeError, frame_cell, to_rgb

# Formats a client may send, by Pillow's name. Microscopes and lab systems write JPEG, PNG or
# TIFF; BMP and WebP are common exports. GIF (palette, animation), ICO, PSD, PDF and the rest
# of Pillow's readers are refused: they are not cell images and each decoder is attack surface.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
}
# EXIF orientations that turn the image by a quarter: width and height swap on display.
_QUARTER_TURNS = {5, 6, 7, 8}
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class UnsupportedFormat(ValueError):
    """An image in a format Pillow reads but the allow-list does not hold."""

    def __init__(self, fmt: str, allowed: tuple[str, ...]) -> None:
        super().__init__(
            f"{fmt} images are not accepted; send one of {', '.join(allowed)} "
            f"({', '.join(MEDIA_TYPES.get(f, f) for f in allowed)})"
        )
        self.format = fmt


@dataclass
class Probed:
    """An opened (not yet decoded) image and what decoding it will cost."""

    image: Image.Image
    format: str
    size: tuple[int, int]  # as stored, from the header
    pixels: int  # pixels the decode produces (after JPEG draft reduction)


def identify(data: bytes) -> str | None:
    """Pillow's name for the format of ``data`` with every reader enabled, or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:  # noqa: BLE001 - anything unreadable is simply "not an image"
        return None


def probe(
    data: bytes,
    *,
    input_size: tuple[int, int],
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    max_pixels: int,
) -> Probed:
    """Open ``data`` reading only its header; set up JPEG draft decoding.

    ``input_size`` is the model's (width, height): a JPEG at least twice as large on both
    sides is decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (draft mode), never
    below twice the input size, so the resize that follows still averages several source
    pixels per output pixel. Raises ``ImageDecodeError`` (empty, not_an_image, too_large,
    truncated) or ``UnsupportedFormat``.
    """
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    "too_large",
                    f"the image is {w}x{h} pixels, over the limit of {max_pixels} pixels; "
                    "send a single-cell crop or a slide image",
                )
            if img.format in ("JPEG", "MPO"):  # MPO: a camera JPEG with extra pictures
                tw, th = input_size
                turned = img.getexif().get(0x0112) in _QUARTER_TURNS
                img.draft("RGB", (2 * th, 2 * tw) if turned else (2 * tw, 2 * th))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", f"the image is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        fmt = identify(data)
        if fmt is not None:
            raise UnsupportedFormat(fmt, formats) from e
        raise ImageDecodeError(
            "not_an_image",
            f"the data is not an image in an accepted format ({', '.join(formats)})",
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("truncated", f"the image header is corrupt: {e}") from e
    dw, dh = img.size  # after draft: what the decoder will produce
    return Probed(img, img.format, (w, h), dw * dh)


def load(
    p: Probed, input_size: tuple[int, int], interpolation: str = "bilinear", frame: float = 0.0
) -> np.ndarray:
    """Decode a probed image: EXIF orientation applied, RGB, framed on its white cell when
    the model reads a window (``frame``), resized to ``input_size`` (width, height) exactly as
    training does (``cellmodel.data.transforms.to_array``), as uint8 (H, W, 3)."""
    img = p.image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency notes and the like
            img.load()
            img = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("truncated", f"the image is truncated or corrupt: {e}") from e
    img = frame_cell(img, frame, input_size[1] / input_size[0])
    if img.size != tuple(input_size):
        img = img.resize(tuple(input_size), _RESAMPLE[interpolation])
    return np.asarray(img, dtype=np.uint8)
