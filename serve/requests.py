"""Turning HTTP requests into image bytes, with every client mistake mapped to a 4xx error.

Nothing here knows about Ray: the ingress calls these helpers, and the tests reach them
through real HTTP.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.formparsers import MultiPartException, MultiPartParser

from cellmodel.data.transforms import ImageDecodeError
from serve.images import UnsupportedFormat, identify


class ApiError(Exception):
    """A client error: HTTP status, a machine-readable reason and a sentence saying what to do."""

    def __init__(
        self, status: int, reason: str, message: str, *, headers: dict | None = None, **details
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}
        self.details = details

    def response(self) -> JSONResponse:
        body = {"error": {"reason": self.reason, "message": self.message, **self.details}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def unavailable(reason: str, message: str, retry_after_s: int) -> ApiError:
    """A 503 that tells the client when to try again: overload, timeout, no model replica."""
    return ApiError(
        503,
        reason,
        f"{message}; retry after {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
        retry_after_s=retry_after_s,
    )


# HTTP status per ImageDecodeError.reason; a pixel bomb is "too large", the rest unusable content.
DECODE_STATUS = {"empty": 400, "too_large": 413, "not_an_image": 422, "truncated": 422}


def decode_error(
    e: ImageDecodeError | UnsupportedFormat, index: int | None = None, name: str | None = None
) -> ApiError:
    where = "" if index is None else f"image {index}" + (f" ({name})" if name else "") + ": "
    details = {} if index is None else {"index": index, "filename": name}
    if isinstance(e, UnsupportedFormat):
        return ApiError(415, "unsupported_format", where + str(e), format=e.format, **details)
    return ApiError(DECODE_STATUS.get(e.reason, 422), e.reason, where + str(e), **details)


@dataclass
class Image:
    data: bytes
    filename: str | None = None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes.

    A declared Content-Length is checked before anything is read; a chunked body is counted
    as it streams, so an oversized upload never sits in memory whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(
                400, "bad_content_length", f"Content-Length {declared!r} is not a number"
            ) from None
        if n > limit:
            raise _too_big(limit, n)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(limit: int, n: int | None = None) -> ApiError:
    got = f" ({n} bytes)" if n is not None else ""
    return ApiError(
        413,
        "body_too_large",
        f"the request body{got} is over the limit of {limit} bytes; send fewer or smaller images "
        "per request",
        limit_bytes=limit,
    )


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# Raw bodies sent without saying they are images: no Content-Type (Python's requests with
# data=bytes), a generic binary type (SDKs, object-store clients). The bytes decide, as for
# image/*: an image in an accepted format is classified, anything else is refused by the
# decoder (422 not_an_image).
_RAW_BINARY = ("", "application/octet-stream", "binary/octet-stream")
# curl --data-binary and wget --post-file label any body this way unless told otherwise: an
# image body is taken by its bytes; a real form is refused (415) with what to send instead.
_FORM = "application/x-www-form-urlencoded"


def _unsupported(mt: str, hint: str = "") -> ApiError:
    accepted = (
        'an image/* body (e.g. image/jpeg), multipart/form-data, or application/json {"image": '
        'base64} / {"images": [base64, ...]}'
    )
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {mt or '(none)'!r} is not accepted; send {accepted}{hint}",
    )


async def read_images(request: Request, limit: int) -> list[Image]:
    """The images of a request: a raw ``image/*`` body, multipart file parts (in order), or
    JSON ``{"images": [base64, ...]}`` / ``{"image": base64}``. A raw body without a Content-Type,
    as ``application/octet-stream``, or as a form (curl's default) whose bytes are an image
    is read as one raw image."""
    mt = media_type(request)
    if not (
        mt.startswith("image/")
        or mt in _RAW_BINARY
        or mt == _FORM
        or mt == "multipart/form-data"
        or mt == "application/json"
    ):
        raise _unsupported(mt)
    body = await read_body(request, limit)
    if not mt and body.lstrip()[:1] == b"{":  # JSON sent without its type
        return _json_images(body)
    if mt.startswith("image/") or mt in _RAW_BINARY:
        return [Image(body)]
    if mt == _FORM:
        if body and identify(body) is not None:  # any format: the decoder applies the list
            return [Image(body)]
        raise _unsupported(
            mt, " (with curl: --data-binary @cell.jpg -H 'Content-Type: image/jpeg')"
        )
    if mt == "application/json":
        return _json_images(body)
    return await _multipart_images(request, body)


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _multipart_images(request: Request, body: bytes) -> list[Image]:
    parser = MultiPartParser(request.headers, _replay(body), max_files=10_000, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(
            400, "bad_multipart", f"the multipart body cannot be parsed: {e.message}"
        ) from e
    images = []
    for _, value in form.multi_items():
        if not isinstance(value, str):  # an UploadFile; plain text fields are ignored
            images.append(Image(await value.read(), value.filename))
            await value.close()
    return images


def _json_images(body: bytes) -> list[Image]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from e
    items = doc.get("images") if isinstance(doc, dict) else None
    names = [f"images[{i}]" for i in range(len(items))] if isinstance(items, list) else []
    if items is None and isinstance(doc, dict) and isinstance(doc.get("image"), str):
        items, names = [doc["image"]], ["image"]  # one image, as most JSON APIs take it
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(
            400,
            "bad_json",
            'expected a JSON object {"images": [base64 string, ...]} or {"image": base64 string}',
        )
    out = []
    for i, (s, name) in enumerate(zip(items, names, strict=True)):
        try:
            out.append(Image(decode_base64(s), name))
        except (binascii.Error, ValueError) as e:
            why = str(e) if isinstance(e, DataUrlError) else "not valid base64"
            raise ApiError(400, "bad_base64", f"{name} is {why}", index=i) from None
    return out


class DataUrlError(ValueError):
    """A ``data:`` URL that does not carry base64 data."""


def decode_base64(s: str) -> bytes:
    """The bytes of a base64 image string as clients write it: standard or URL-safe
    alphabet, with or without padding, wrapped in lines (the ``base64`` command wraps at 76
    characters), or a browser's data URL (``data:image/png;base64,...``). Any other
    character is an error (``binascii.Error``)."""
    if s[:5].lower() == "data:":
        head, comma, s = s.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise DataUrlError(
                "a data URL without base64 data; send data:image/...;base64,<base64>"
            )
    s = "".join(s.split()).replace("-", "+").replace("_", "/").rstrip("=")
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
