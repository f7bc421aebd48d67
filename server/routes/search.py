"""POST /v1/search: nearest indexed items to an uploaded image, a vector, or an indexed item.

Options (multipart form fields, or JSON): `offset` (pages: offset + k <= max_k), `min_score`,
`filter` (metadata equality, path prefix / glob: index/filters.py, applied inside the FAISS scan)
and `exclude` (with `id`: the item itself is left out).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from index.filters import ItemFilter, matching_ids
from index.selectors import IdSet
from server.bodies import BINARY, read_image_body, request_body
from server.errors import ERROR_RESPONSES, ApiError
from server.items_view import neighbour_out
from server.schemas import SearchFilter, SearchJSON, SearchResponse
from server.state import Resources, get_resources

router = APIRouter(prefix="/v1", tags=["search"], responses=ERROR_RESPONSES)

_BODY = request_body(
    {
        "file": BINARY,
        "k": {"type": "integer", "minimum": 1, "default": 10},
        "offset": {"type": "integer", "minimum": 0, "default": 0},
        "min_score": {"type": "number", "minimum": -1, "maximum": 1},
        "filter": {"type": "string", "description": "a SearchFilter as JSON text, e.g. "
                   '{"metadata": {"label": "cat"}, "path_prefix": "holidays/"}'},
    },
    ["file"],
    SearchJSON,
)


def _form_number(fields: dict[str, str], name: str, kind: type[int] | type[float]) -> int | float | None:
    text = fields.get(name)
    if text is None or text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name} must be a number, got {text[:40]!r}") from None


def _form_filter(text: str | None) -> SearchFilter | None:
    if text is None or not text.strip():
        return None
    try:
        return SearchFilter.model_validate_json(text)
    except ValidationError as e:
        raise ApiError(422, "invalid_filter", f"filter: {e.errors(include_url=False)[0]['msg']}") from None


def _check_page(k: int, offset: int, min_score: float | None, max_k: int) -> None:
    if offset < 0 or offset + k > max_k:
        raise ApiError(422, "invalid_request", f"offset + k must be between 1 and {max_k} (max_k), got {offset} + {k}")
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise ApiError(422, "invalid_request", f"min_score must be between -1 and 1, got {min_score}")


def _allowed(res: Resources, flt: SearchFilter | None) -> IdSet | None:
    if flt is None:
        return None
    try:
        item_filter = ItemFilter.build(flt.metadata, flt.path_prefix, flt.path_glob)
    except ValueError as e:
        raise ApiError(422, "invalid_filter", str(e)) from None
    return None if item_filter is None else matching_ids(res.index.directory, item_filter)


def _parse_k(text: str | None, max_k: int) -> int:
    if text is None or text == "":
        return 10
    try:
        return _check_k(int(text), max_k)
    except ValueError:
        raise ApiError(422, "invalid_request", f"k must be an integer, got {text[:40]!r}") from None


def _check_k(k: int, max_k: int) -> int:
    if not 1 <= k <= max_k:
        raise ApiError(422, "invalid_request", f"k must be between 1 and {max_k}, got {k}")
    return k


def _query_vector(values: list[float], dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (dim,):
        raise ApiError(422, "invalid_vector", f"the vector has {v.size} values; the index holds {dim}-d vectors")
    norm = float(np.linalg.norm(v)) if np.all(np.isfinite(v)) else float("nan")
    if not np.isfinite(norm) or norm == 0.0:
        raise ApiError(422, "invalid_vector", "the vector must be finite and non-zero")
    return (v / norm).astype(np.float32)


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Nearest neighbours of an image, a vector or an indexed item",
    description="Multipart: `file` (an image), `k`, and the options `offset`, `min_score`, `filter` (JSON "
    "text) as form fields. JSON: exactly one of `image` (base64), `vector` (l2-normalised here) or `id`, "
    "`k`, and the options (`exclude` with `id`). Scores are cosine similarities, best first (ties by id). "
    "Pages: `offset` + `k` <= max_k; a filter is applied inside the index scan, so a page is full "
    "whenever enough items pass it.",
    openapi_extra=_BODY,
)
async def search(request: Request, res: Annotated[Resources, Depends(get_resources)]) -> SearchResponse:
    settings = res.settings
    body = await read_image_body(request, SearchJSON, lambda q: [] if q.image is None else [q.image])
    q = body.json_body
    exclude: list[int] | None = None
    if q is None:  # multipart: `file`, `k` and the options as form fields
        upload = body.one()
        k = _parse_k(body.fields.get("k"), settings.max_k)
        offset = int(_form_number(body.fields, "offset", int) or 0)
        min_score = _form_number(body.fields, "min_score", float)
        flt = _form_filter(body.fields.get("filter"))
        if body.fields.get("exclude", "").lower() in ("1", "true", "on"):
            raise ApiError(422, "invalid_request", "exclude leaves out the item searched by: it needs `id` (JSON)")
        _check_page(k, offset, min_score, settings.max_k)
        query, what = (await res.pipeline.embed_one(upload)).vector, "image"
    else:
        k, offset, min_score, flt = _check_k(q.k, settings.max_k), q.offset, q.min_score, q.filter
        _check_page(k, offset, min_score, settings.max_k)
        if q.exclude and q.id is None:
            raise ApiError(422, "invalid_request", "exclude leaves out the item searched by: it needs `id`")
        if body.uploads:
            query, what = (await res.pipeline.embed_one(body.uploads[0])).vector, "image"
        elif q.vector is not None:
            query, what = _query_vector(q.vector, res.spec.embedding_dim), "vector"
        else:
            assert q.id is not None
            stored = await run_in_threadpool(res.index.vector, q.id)
            if stored is None:
                raise ApiError(404, "not_found", f"no item with id {q.id}")
            query, what = np.asarray(stored, dtype=np.float32), "id"
            exclude = [q.id] if q.exclude else None
    allowed = await run_in_threadpool(_allowed, res, flt)
    (hits,) = await run_in_threadpool(
        lambda: res.index.search(query.reshape(1, -1), k, allowed_ids=allowed, offset=offset, min_score=min_score,
                                 exclude_ids=exclude)
    )
    full = len(hits) == k and offset + k < settings.max_k
    return SearchResponse(k=k, query=what, neighbours=[neighbour_out(h) for h in hits], offset=offset,
                          next_offset=offset + k if full else None)
