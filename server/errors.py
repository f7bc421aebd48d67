"""One error shape for every non-2xx answer: `{"detail": str, "reason": str, "errors": [...]}`.

`reason` is a short machine-readable word (e.g. `too_large`, `not_an_image`, `queue_full`);
`errors` lists per-image or per-field problems. Request validation errors, Starlette's own
HTTP errors (404, 405, ...) and anything unexpected are all answered in this shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from embed.decode import DecodeError

log = logging.getLogger(__name__)

# a decode failure -> the HTTP status it answers when it fails the whole request
DECODE_STATUS: dict[str, int] = {
    "too_large": 413,
    "empty": 415,
    "not_an_image": 415,
    "unreadable": 422,
    "truncated": 422,
}

HTTP_REASONS: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ErrorItem(BaseModel):
    """One problem inside a request: an image (index, filename) or a field (loc)."""

    reason: str = Field(description="machine-readable cause, e.g. not_an_image, truncated, too_large")
    message: str
    index: int | None = Field(None, description="position of the image in the request")
    filename: str | None = None
    loc: list[str | int] | None = Field(None, description="where in the request (validation errors)")


class ErrorResponse(BaseModel):
    detail: str
    reason: str
    errors: list[ErrorItem] = Field(default_factory=list)


class ApiError(Exception):
    """Raised by routes; answered as an ErrorResponse with `status`."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        errors: list[ErrorItem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.errors = errors or []
        self.headers = headers


def decode_error_item(e: DecodeError, index: int | None = None, filename: str | None = None) -> ErrorItem:
    return ErrorItem(reason=e.reason, message=getattr(e, "message", str(e)), index=index, filename=filename)


def api_error_from_decode(e: DecodeError, index: int | None = None, filename: str | None = None) -> ApiError:
    status = DECODE_STATUS.get(e.reason, 422)
    name = f" {filename!r}" if filename else ""
    return ApiError(status, e.reason, f"image{name}: {e}", errors=[decode_error_item(e, index, filename)])


# responses every route with a request body can give; attached to the routers for the OpenAPI schema
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": reason.replace("_", " ")}
    for code, reason in HTTP_REASONS.items()
    if code not in (405,)
}


def _json(status: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def error_response(exc: ApiError) -> JSONResponse:
    """The answer to an ApiError (routes raise it; server/fastpath.py answers it itself)."""
    return _json(exc.status, ErrorResponse(detail=exc.detail, reason=exc.reason, errors=exc.errors), exc.headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = HTTP_REASONS.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return _json(exc.status_code, ErrorResponse(detail=detail, reason=reason), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    items = [
        ErrorItem(
            reason=str(err.get("type", "invalid")),
            message=str(err.get("msg", "")),
            loc=[p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
        )
        for err in exc.errors()
    ]
    first = items[0] if items else None
    detail = f"invalid request: {'.'.join(map(str, first.loc or []))}: {first.message}" if first else "invalid request"
    return _json(422, ErrorResponse(detail=detail, reason="invalid_request", errors=items))


def internal_error_response() -> JSONResponse:
    """The 500 answer to an unexpected exception (logged with its traceback by whoever caught it)."""
    return _json(500, ErrorResponse(detail="internal error; see the server log", reason="internal_error"))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the exception with its traceback after this answer is sent
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
