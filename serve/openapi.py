"""What the OpenAPI document says about each route: request bodies and every answer.

The routes read their bodies themselves (raw image, multipart or JSON, under a size limit),
so FastAPI cannot infer the bodies; they are declared here, with the JSON schema of every
status a route can answer. Generated clients, API gateways and schemathesis read them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve.images import MEDIA_TYPES

# -- responses ----------------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str = Field(description="model architecture, e.g. xception_bilstm")
    version: str = Field(description="first 12 hex digits of the weights' sha256")


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="the most probable class")
    class_index: int = Field(ge=0)
    probability: float = Field(ge=0, le=1, description="probability of that class")
    probabilities: dict[str, float] = Field(description="probability per class")
    warnings: list[str] = Field(
        default_factory=list,
        description="why this answer may be unreliable, as codes (empty: nothing noticed): "
        "grayscale (the image has no colour; the model reads the stain's colours), "
        "low_resolution (under half the model's input on a side: enlarged more than twice)",
    )


class ClassifyResult(Prediction):
    model: ModelRef


class BatchItem(Prediction):
    index: int = Field(ge=0, description="position of the image in the request")
    filename: str | None = Field(description="file name of the part, or images[i] for JSON")


class BatchResult(BaseModel):
    results: list[BatchItem]
    model: ModelRef


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    reason: str = Field(description="machine-readable cause, see docs/serving.md")
    message: str = Field(description="what went wrong and what to do")
    index: int | None = Field(None, description="the refused image of a batch")
    filename: str | None = Field(None, description="its file name")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


class NotReady(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    reason: str


class Ready(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    model: ModelRef


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before sending the request again",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def error_response(text: str, **extra) -> dict:
    return {"model": ErrorBody, "description": text, **extra}


def classify_responses(ok: type[BaseModel]) -> dict:
    """Every status a classify route answers, with its schema."""
    return {
        200: {"model": ok, "description": "the classification"},
        400: error_response(
            "a malformed request: empty image, bad multipart/JSON/base64, wrong count"
        ),
        413: error_response(
            "too large: body, image pixels, the request's pixel budget, image count"
        ),
        415: error_response("a content type or image format that is not accepted"),
        422: error_response(
            "bytes that are not a readable image (not an image, truncated, corrupt)"
        ),
        503: error_response(
            "overloaded or no model replica available: retry after Retry-After seconds (JSON "
            "from the service; plain text when the Serve proxy itself refuses a flood)",
            headers=RETRY_AFTER,
            content={"text/plain": {"schema": {"type": "string"}}},
        ),
    }


# -- request bodies -----------------------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary", "minLength": 1}
# Standard base64 (RFC 4648 section 4) with padding, as Python's strict decoder accepts it.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


_BASE64 = {"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN, "minLength": 4}
_PART_TYPES = ", ".join(MEDIA_TYPES.values())


def _raw_images() -> dict:
    raw = {mt: {"schema": _BINARY} for mt in MEDIA_TYPES.values()}
    return raw | {"application/octet-stream": {"schema": _BINARY}}


def single_body() -> dict:
    """``/v1/classify``: one raw image, a multipart form with one file part, or JSON."""
    return {
        "requestBody": {
            "required": True,
            "description": "one image: a raw body (any image/* type or "
            "application/octet-stream; also read without a Content-Type, or under a form's "
            "type when its bytes are an image; the bytes must be JPEG, PNG, TIFF, BMP or "
            "WebP), a multipart form with exactly one file part, or JSON "
            '{"image": base64} (base64 as the batch route reads it)',
            "content": {
                **_raw_images(),
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": _BINARY},
                        "required": ["file"],
                    },
                    "encoding": {"file": {"contentType": _PART_TYPES}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": _BASE64},
                        "required": ["image"],
                    }
                },
            },
        }
    }


def batch_body(max_images: int) -> dict:
    """``/v1/classify/batch``: multipart file parts, or JSON with base64 images."""
    return {
        "requestBody": {
            "required": True,
            "description": f"1 to {max_images} images: multipart file parts (any field name; "
            'results in part order), or JSON {"images": [base64, ...]} (also accepted: a data '
            "URL data:image/...;base64,..., line breaks, the URL-safe alphabet, no padding)",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": _BINARY,
                                "minItems": 1,
                                "maxItems": max_images,
                            }
                        },
                        "required": ["files"],
                    },
                    "encoding": {"files": {"contentType": _PART_TYPES}},
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": _BASE64,
                                "minItems": 1,
                                "maxItems": max_images,
                            }
                        },
                        "required": ["images"],
                    }
                },
            },
        }
    }
