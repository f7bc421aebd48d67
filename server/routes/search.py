"""POST /v1/search: nearest indexed items to an uploaded image, a vector, or an indexed item.

Options (multipart form fields, or JSON): `offset` (pages: offset + k <= max_k), `min_score`,
`filter` (metadata equality, path prefix / glob: index/filters.py, applied inside the FAISS scan)
and `exclude` (with `id`: the item itself is left out). `k`, `offset`, `min_score` and `filter` may
also be given in the query string (`/v1/search?k=5`), with either body; the same option in both
places with different values, or a query parameter that is not one of them, is a 422 (never
silently ignored).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

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


QUERY_OPTIONS = ("k", "offset", "min_score", "filter")
_QUERY_PARAMETERS = [
    {"name": "k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
    {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
    {"name": "min_score", "in": "query", "required": False, "schema": {"type": "number", "minimum": -1, "maximum": 1}},
    {"name": "filter", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "a SearchFilter as JSON text"},
]


def _query_options(request: Request) -> dict[str, str]:
    """The search options given in the query string (`?k=5`), each once."""
    params = request.query_params
    unknown = sorted(set(params) - set(QUERY_OPTIONS))
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown query parameter(s) {unknown}: the query string may hold "
                       f"{', '.join(QUERY_OPTIONS)}")
    repeated = sorted(n for n in params if len(params.getlist(n)) > 1)
    if repeated:
        raise ApiError(422, "invalid_request", f"query parameter(s) {repeated} given more than once")
    return dict(params)


def _merge_form(fields: dict[str, str], query: dict[str, str]) -> dict[str, str]:
    for name, value in query.items():
        if name in fields and fields[name] != value:
            raise ApiError(422, "invalid_request", f"{name} is both a form field ({fields[name][:40]!r}) and a query "
                           f"parameter ({value[:40]!r}): give it once")
    return {**query, **fields}


def _merge_json(q: SearchJSON, query: dict[str, str]) -> SearchJSON:
    if not query:
        return q
    given: dict[str, Any] = {}
    for name, text in query.items():
        if name == "filter":
            try:
                given[name] = json.loads(text)
            except ValueError:
                raise ApiError(422, "invalid_filter", "filter: the query parameter must be JSON text") from None
        else:
            given[name] = text  # validated (and converted) by SearchJSON below
    merged = q.model_dump(exclude_unset=True)
    for name, value in given.items():
        if name in merged:
            raise ApiError(422, "invalid_request", f"{name} is both in the JSON body and a query parameter: give it once")
        merged[name] = value
    try:
        return SearchJSON.model_validate(merged)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(422, "invalid_request", f"{where}: {err['msg']}") from None


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
    openapi_extra={**_BODY, "parameters": _QUERY_PARAMETERS},
)
async def search(request: Request, res: Annotated[Resources, Depends(get_resources)]) -> SearchResponse:
    settings = res.settings
    query_options = _query_options(request)
    body = await read_image_body(request, SearchJSON, lambda q: [] if q.image is None else [q.image])
    q = body.json_body
    exclude: list[int] | None = None
    if q is None:  # multipart: `file`, `k` and the options as form fields (or in the query string)
        upload = body.one()
        fields = _merge_form(body.fields, query_options)
        k = _parse_k(fields.get("k"), settings.max_k)
        offset = int(_form_number(fields, "offset", int) or 0)
        min_score = _form_number(fields, "min_score", float)
        flt = _form_filter(fields.get("filter"))
        if fields.get("exclude", "").lower() in ("1", "true", "on"):
            raise ApiError(422, "invalid_request", "exclude leaves out the item searched by: it needs `id` (JSON)")
        _check_page(k, offset, min_score, settings.max_k)
        query, what = (await res.pipeline.embed_one(upload)).vector, "image"
    else:
        q = _merge_json(q, query_options)
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
