"""Request bodies that come either as multipart uploads or as JSON with base64 images.

FastAPI declares one body type per route, so these routes read the body themselves and describe
both content types in the OpenAPI schema (`request_body`); the JSON models are validated with
pydantic and fail in the same 422 shape as every other validation error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server import multipart
from server.errors import ApiError, ErrorItem
from server.schemas import ImageB64

M = TypeVar("M", bound=BaseModel)

MAX_METADATA_BYTES = 64 * 1024
MAX_FIELDS = 64  # non-image form fields in one multipart body
MULTIPART = "multipart/form-data"
JSON = "application/json"


@dataclass
class Upload:
    """One image of a request: its bytes, or why they could not be read (bad base64)."""

    index: int
    filename: str | None
    data: bytes | None
    error: ErrorItem | None = None


@dataclass
class MultipartBody:
    uploads: list[Upload]
    fields: dict[str, str]


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def unsupported(request: Request) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"send {MULTIPART} or {JSON}, not {content_type(request) or 'no content type'!r}",
    )


def too_many(n: int, limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"{n} images in one request; the limit is {limit}")


async def read_multipart(request: Request, *, file_fields: tuple[str, ...], max_files: int) -> MultipartBody:
    """Every part named in `file_fields` is an image (a file part, or a plain field's bytes)."""
    content = request.headers.get("content-type", "")
    return parse_multipart(await request.body(), content, file_fields=file_fields, max_files=max_files)


def parse_multipart(body: bytes, content: str, *, file_fields: tuple[str, ...], max_files: int) -> MultipartBody:
    """A multipart body read whole (its Content-Type header `content`): images and fields; 400 when
    malformed, 413 when it has more than `max_files` images."""
    try:
        boundary = multipart.boundary_of(content)
        uploads: list[Upload] = []
        fields: dict[str, str] = {}
        n_fields = 0
        for part in multipart.iter_parts(body, boundary):
            if part.name in file_fields:
                uploads.append(Upload(len(uploads), part.filename, part.data))
                if len(uploads) > max_files:
                    raise too_many(len(uploads), max_files)
            elif part.filename is None:
                n_fields += 1
                if n_fields > MAX_FIELDS:
                    raise ApiError(400, "bad_request", f"more than {MAX_FIELDS} form fields")
                fields[part.name] = multipart.decode_text(part.data)
    except multipart.MultipartError as e:
        raise ApiError(400, "bad_request", f"malformed multipart body: {e}") from None
    return MultipartBody(uploads, fields)


async def read_json(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(_body_loc(e.errors(include_url=False))) from None


def _body_loc(errors: list[Any]) -> list[Any]:
    return [{**err, "loc": ("body", *err.get("loc", ()))} for err in errors]


def parse_metadata(text: str | None) -> dict[str, Any]:
    """The `metadata` form field: a JSON object, or nothing."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise ApiError(422, "invalid_metadata", f"metadata is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object, not {type(value).__name__}")
    return check_metadata(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON (no NaN/Infinity) and at most MAX_METADATA_BYTES once encoded."""
    try:
        size = len(json.dumps(value, allow_nan=False))
    except ValueError as e:
        raise ApiError(422, "invalid_metadata", f"metadata must be strict JSON: {e}") from None
    if size > MAX_METADATA_BYTES:
        raise ApiError(422, "invalid_metadata", f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return value


def decode_b64(images: list[ImageB64], max_files: int) -> list[Upload]:
    if len(images) > max_files:
        raise too_many(len(images), max_files)
    uploads = []
    for i, img in enumerate(images):
        try:
            uploads.append(Upload(i, img.filename, base64.b64decode(img.data, validate=True)))
        except (binascii.Error, ValueError) as e:
            err = ErrorItem(reason="invalid_base64", message=f"not valid base64: {e}", index=i, filename=img.filename)
            uploads.append(Upload(i, img.filename, None, err))
    return uploads


@dataclass
class ImageBody(Generic[M]):
    """A request that carries images: multipart parts, or a JSON body with base64 images.

    Multipart: `uploads` are the file parts, `fields` the other form fields, `json_body` None.
    JSON: `json_body` is the validated model, `uploads` the images `read_image_body` took from it.
    """

    uploads: list[Upload]
    fields: dict[str, str]
    json_body: M | None

    def one(self, part: str = "file") -> Upload:
        """The request's only image; 422 when it has none."""
        if len(self.uploads) != 1:
            raise ApiError(422, "no_images", f"send exactly one image in the `{part}` part")
        return self.uploads[0]


async def read_image_body(
    request: Request,
    json_model: type[M],
    json_images: Callable[[M], list[ImageB64]],
    *,
    file_fields: tuple[str, ...] = ("file",),
    max_images: int = 1,
) -> ImageBody[M]:
    """The images of an embed, search or add-item request, however they were sent.

    Multipart: every part named in `file_fields` is an image. JSON: validated as `json_model`, whose
    base64 images `json_images` picks out (none, for a search by vector or id). More than
    `max_images` images is a 413; any other content type a 415.
    """
    kind = content_type(request)
    if kind == MULTIPART:
        form = await read_multipart(request, file_fields=file_fields, max_files=max_images)
        return ImageBody(form.uploads, form.fields, None)
    if kind == JSON:
        body = await read_json(request, json_model)
        return ImageBody(decode_b64(json_images(body), max_images), {}, body)
    raise unsupported(request)


def request_body(
    multipart_properties: dict[str, Any], required: list[str], json_model: type[BaseModel]
) -> dict[str, Any]:
    """`openapi_extra` for a route that takes multipart or JSON (see `openapi.register`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                MULTIPART: {
                    "schema": {
                        "type": "object",
                        "properties": multipart_properties,
                        "required": required,
                    }
                },
                JSON: {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
            },
        }
    }


BINARY = {"type": "string", "format": "binary"}
