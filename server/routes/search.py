"""POST /v1/search: nearest indexed items to an uploaded image, a vector, or an indexed item."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.bodies import BINARY, read_image_body, request_body
from server.errors import ERROR_RESPONSES, ApiError
from server.items_view import neighbour_out
from server.schemas import SearchJSON, SearchResponse
from server.state import Resources, get_resources

router = APIRouter(prefix="/v1", tags=["search"], responses=ERROR_RESPONSES)

_BODY = request_body(
    {"file": BINARY, "k": {"type": "integer", "minimum": 1, "default": 10}}, ["file"], SearchJSON
)


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
    description="Multipart: `file` (an image) and `k`. JSON: exactly one of `image` (base64), "
    "`vector` (l2-normalised here) or `id`, and `k`. Scores are cosine similarities, best first.",
    openapi_extra=_BODY,
)
async def search(request: Request, res: Annotated[Resources, Depends(get_resources)]) -> SearchResponse:
    settings = res.settings
    body = await read_image_body(request, SearchJSON, lambda q: [] if q.image is None else [q.image])
    q = body.json_body
    if q is None:  # multipart: `file` and `k`
        upload = body.one()
        k = _parse_k(body.fields.get("k"), settings.max_k)
        query, what = (await res.pipeline.embed_one(upload)).vector, "image"
    else:
        k = _check_k(q.k, settings.max_k)
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
    (hits,) = await run_in_threadpool(res.index.search, query.reshape(1, -1), k)
    return SearchResponse(k=k, query=what, neighbours=[neighbour_out(h) for h in hits])
