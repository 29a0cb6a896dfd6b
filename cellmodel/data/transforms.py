"""Decode image bytes and turn them into model input, reading the model's preprocessing config.

Training, evaluation, serving and the slide job all call these, so preprocessing cannot drift.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

# The image files every reader accepts (crop folders, slide folders, evaluation folders).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# A 640x480 slide is 0.3 MP; anything past 50 MP is not a blood-cell image and may be a bomb.
MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """Bytes that cannot be used as an image. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/... bytes to an RGB image, fully loaded.

    Raises ``ImageDecodeError`` with reason ``empty``, ``too_large``, ``not_an_image`` or
    ``truncated``; the dimensions are checked from the header before any pixel is decoded.
    """
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    "too_large",
                    f"the image is {w}x{h} pixels, over the limit of {max_pixels} pixels; "
                    "send a single-cell crop or a slide image",
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", f"the image is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            "not_an_image", "the data is not an image in a known format (JPEG, PNG, ...)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("truncated", f"the image is truncated or corrupt: {e}") from e
    return to_rgb(img)


# Bit depths cameras write into 16-bit containers; a grey image is scaled by the smallest
# that holds its brightest pixel (a 12-bit camera's 4095 becomes 255), and an image
# brighter than 16 bits by its brightest pixel.
_CAMERA_BITS = (8, 10, 12, 14, 16)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. Pillow's own conversion clips grey images of more than 8 bits
    (16-bit PNG or TIFF from a scientific camera, 32-bit integer or float TIFF) to white or
    black; those are scaled to 0-255 instead: integers by the camera bit depth (8, 10, 12,
    14 or 16) that holds their brightest pixel, floats by 1 when they lie in [0, 1] and as
    integers otherwise."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        a = a - min(float(a.min()), 0.0)  # signed data: its floor at 0
        top = float(a.max())
        if img.mode == "F" and top <= 1.0:
            full = 1.0
        else:
            full = next((2.0**b - 1 for b in _CAMERA_BITS if top <= 2.0**b - 1), top)
        grey = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def _pre(cfg) -> Mapping:
    return cfg.preprocessing() if hasattr(cfg, "preprocessing") else cfg


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def nucleus_stain(rgb: np.ndarray) -> np.ndarray:
    """How like a nucleus each pixel of an RGB array (H, W, 3) is stained, in [0, 1]: blue
    above green by 30 levels or less is 0, by 90 or more is 1 (Giemsa and Wright stains)."""
    return np.clip((rgb[..., 2] - rgb[..., 1] - 30.0) / 60.0, 0.0, 1.0)


def frame_of(pre: Mapping) -> float:
    """The ``frame`` of a ``preprocessing()`` dict; 0 (the whole picture) for checkpoints
    written before it existed."""
    return float(pre.get("frame") or 0.0)


def cell_centre(
    img: Image.Image, near: tuple[float, float, float] | None = None
) -> tuple[float, float] | None:
    """Where the white cell's nucleus is in a picture of one cell: (x, y) in pixels, or None
    when nothing in it is stained like a nucleus. ``near`` (x, y, radius): a caller that
    knows where its cell is (the slide job, from its finder's box) has the nucleus looked for
    within ``radius`` of (x, y) only, and (x, y) when nothing there is stained, so that
    another cell in the picture is never taken for it.

    A nucleus is the bluest thing on a Giemsa- or Wright-stained smear (blue well above
    green, as :func:`cellmodel.infer.finder.stain_map` measures it). The stain is read at
    half resolution, the black fill of rotated copies left out, and blurred by a Gaussian
    of 1/54 of the picture's width, so that the lobes of one nucleus make one peak and a
    platelet, a tenth of its size, a much weaker one; the peak is the centre.
    """
    from scipy import ndimage as ndi

    img = to_rgb(img)
    w, h = img.size
    half = np.asarray(img.reduce(2) if min(w, h) >= 64 else img, dtype=np.float32)
    f = w / half.shape[1]
    valid = half.sum(-1) > 45  # black fill and its JPEG ringing are no slide
    stain = nucleus_stain(half) * valid
    blur = ndi.gaussian_filter(stain, max(1.0, half.shape[1] / 27.0))
    if near is not None:
        nx, ny, r = (v / f for v in near)
        yy, xx = np.ogrid[: blur.shape[0], : blur.shape[1]]
        blur = blur * (((xx + 0.5 - nx) ** 2 + (yy + 0.5 - ny) ** 2) <= r * r)
    if float(blur.max()) <= 0.0:
        return None if near is None else (near[0], near[1])
    y, x = np.unravel_index(int(np.argmax(blur)), blur.shape)
    return (x + 0.5) * f, (y + 0.5) * f


def frame_cell(
    img: Image.Image,
    frame: float,
    aspect: float,
    near: tuple[float, float, float] | None = None,
) -> Image.Image:
    """The window of ``img`` around its white cell (:func:`cell_centre`, ``near`` as there)
    that a model with ``frame`` set reads: ``frame`` of the picture's width wide, ``aspect``
    (height / width) as its input, moved inside the picture where the cell lies near an
    edge. A picture without a stained nucleus gives its central window. ``frame`` 0:
    ``img`` itself."""
    if not frame:
        return img
    w, h = img.size
    ww, wh = frame * w, frame * w * aspect
    if wh > h:  # taller than the picture: as tall as it, narrower
        ww, wh = h / aspect, float(h)
    cx, cy = cell_centre(img, near) or (w / 2, h / 2)
    x0 = min(max(cx - ww / 2, 0.0), w - ww)
    y0 = min(max(cy - wh / 2, 0.0), h - wh)
    return img.crop((round(x0), round(y0), round(x0 + ww), round(y0 + wh)))


def _framed(img: Image.Image, pre: Mapping, near=None) -> Image.Image:
    _, h, w = pre["input_size"]
    return frame_cell(img, frame_of(pre), h / w, near)


def to_array(img: Image.Image, cfg, near: tuple[float, float, float] | None = None) -> np.ndarray:
    """Resize to the model's input size and normalise: float32 (3, H, W). A model with
    ``frame`` set reads the window around the white cell instead (:func:`frame_cell`;
    ``near``: where the cell is, when the caller knows).

    ``cfg`` is a ``ModelConfig`` or its ``preprocessing()`` dict (e.g. from a checkpoint).
    """
    pre = _pre(cfg)
    img = _framed(img, pre, near)
    _, h, w = pre["input_size"]
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[pre.get("interpolation", "bilinear")])
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def bytes_to_array(data: bytes, cfg, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return to_array(decode_image(data, max_pixels=max_pixels), cfg)


def stack_bytes(items: Sequence[bytes], cfg) -> np.ndarray:
    """A (N, 3, H, W) float32 batch from encoded images; raises on the first bad one."""
    pre = _pre(cfg)
    out = np.empty((len(items), *pre["input_size"]), dtype=np.float32)
    for i, b in enumerate(items):
        out[i] = bytes_to_array(b, pre)
    return out


def to_uint8(img: Image.Image, cfg) -> np.ndarray:
    """Resized to the model's input size but not normalised: uint8 (3, H, W), a quarter of
    the float32 bytes; ``normalize`` finishes the job where the tensor is used."""
    pre = _pre(cfg)
    img = _framed(img, pre)
    _, h, w = pre["input_size"]
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[pre.get("interpolation", "bilinear")])
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def stack_bytes_uint8(items: Sequence[bytes], cfg) -> np.ndarray:
    """A (N, 3, H, W) uint8 batch from encoded images; raises on the first bad one."""
    pre = _pre(cfg)
    out = np.empty((len(items), *pre["input_size"]), dtype=np.uint8)
    for i, b in enumerate(items):
        out[i] = to_uint8(decode_image(b), pre)
    return out


def normalize(x, cfg):
    """uint8 (N, 3, H, W) torch tensor -> float32 model input, on the tensor's own device."""
    import torch

    pre = _pre(cfg)
    mean = torch.tensor(pre["mean"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std
