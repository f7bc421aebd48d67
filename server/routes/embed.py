"""POST /v1/embed: images -> vectors (multipart `files`, or JSON with base64 images).

The answer is written here rather than through FastAPI's `response_model` (which would validate and
serialise every float of every vector again): orjson writes the float32 arrays straight, with
the shortest decimal that reads back as the same float32. `Accept: application/x-npy` gets the
vectors as one NumPy `.npy` float32 [N, D] array instead, for bulk clients.
"""

from __future__ import annotations

import io
import urllib.parse
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response

from server.bodies import BINARY, Upload, read_image_body, request_body
from server.errors import ERROR_RESPONSES, ApiError, ErrorItem
from server.pipeline import Embedded, error_for
from server.schemas import EmbedJSON, EmbedResponse
from server.state import Resources, get_resources

router = APIRouter(prefix="/v1", tags=["embed"], responses=ERROR_RESPONSES)

NPY = "application/x-npy"
FAILED_HEADER = "X-Simsearch-Failed"  # .npy answers: "index=reason,..." of the images that failed
MODEL_HEADER = "X-Simsearch-Model"  # .npy answers: "<name, percent-encoded> v<version>"

_BODY = request_body({"files": {"type": "array", "items": BINARY}}, ["files"], EmbedJSON)

_DESCRIPTION = """One result per image, in order. An image that cannot be decoded gets an `error`
(reason, message) instead of an `embedding`; when every image fails the request answers the first
failure's status (413 too large, 415 not an image, 422 unreadable/truncated).

**Binary answer for bulk clients:** with `Accept: application/x-npy` the answer is a NumPy `.npy`
file holding a float32 array [N, D], row i the vector of image i (`numpy.load(io.BytesIO(body))`).
A row of NaN marks an image that failed; the header `X-Simsearch-Failed` lists them as
`index=reason` pairs (comma-separated, absent when none failed), and `X-Simsearch-Model` names the
model (`<name, percent-encoded> v<version>`). Errors are JSON whatever the `Accept` header."""

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the vectors: JSON (default), or `.npy` with `Accept: application/x-npy`",
        "content": {NPY: {"schema": BINARY}},
    }
}


FILE_FIELDS = ("files", "file")  # multipart parts that carry images


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    body = await read_image_body(request, EmbedJSON, lambda j: j.images, file_fields=FILE_FIELDS,
                                 max_images=max_images)
    return body.uploads


def wants_npy(accept: str) -> bool:
    """True when the Accept header prefers application/x-npy to JSON (by q-value; ties: JSON)."""
    npy_q = json_q = 0.0
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == NPY:
            npy_q = max(npy_q, q)
        elif media in ("application/json", "application/*", "*/*"):
            json_q = max(json_q, q)
    return npy_q > json_q


def _json_answer(res: Resources, results: list[Embedded | ErrorItem]) -> Response:
    out = []
    for i, r in enumerate(results):
        if isinstance(r, ErrorItem):
            out.append({"index": i, "filename": r.filename, "embedding": None, "width": None, "height": None,
                        "error": r.model_dump(mode="json")})
        else:
            out.append({"index": i, "filename": r.upload.filename, "embedding": r.vector, "width": r.width,
                        "height": r.height, "error": None})
    spec = res.spec
    body = {"model": spec.name, "model_version": spec.version, "dim": spec.embedding_dim, "results": out}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _npy_answer(res: Resources, results: list[Embedded | ErrorItem]) -> Response:
    spec = res.spec
    vectors = np.full((len(results), spec.embedding_dim), np.nan, dtype=np.float32)
    failed = []
    for i, r in enumerate(results):
        if isinstance(r, ErrorItem):
            failed.append(f"{i}={r.reason}")
        else:
            vectors[i] = r.vector
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    headers = {MODEL_HEADER: f"{urllib.parse.quote(spec.name, safe='')} v{spec.version}"}
    if failed:
        headers[FAILED_HEADER] = ",".join(failed)
    return Response(buf.getvalue(), media_type=NPY, headers=headers)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed one or more images",
    description=_DESCRIPTION,
    responses=_RESPONSES,
    openapi_extra=_BODY,
)
async def embed_images(request: Request, res: Annotated[Resources, Depends(get_resources)]) -> Response:
    uploads = await read_uploads(request, res.settings.max_images_per_request)
    return await answer(res, uploads, request.headers.get("accept", ""))


async def answer(res: Resources, uploads: list[Upload], accept: str) -> Response:
    """The answer to an embed request with these images; raises ApiError. Shared by the route and
    its fast path (server/fastpath.py), so the two cannot answer differently."""
    if not uploads:
        raise ApiError(422, "no_images", "no images in the request: send one or more `files` parts")
    results = await res.pipeline.embed(uploads)
    errors = [r for r in results if isinstance(r, ErrorItem)]
    if len(errors) == len(results):
        api_error = error_for(errors[0])
        api_error.errors = errors
        raise api_error
    if wants_npy(accept):
        return _npy_answer(res, results)
    return _json_answer(res, results)
