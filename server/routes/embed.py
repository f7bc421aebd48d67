"""POST /v1/embed: images -> vectors (multipart `files`, or JSON with base64 images)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.bodies import BINARY, Upload, read_image_body, request_body
from server.errors import ERROR_RESPONSES, ApiError, ErrorItem
from server.pipeline import error_for
from server.schemas import EmbedJSON, EmbedResponse, EmbedResult
from server.state import Resources, get_resources

router = APIRouter(prefix="/v1", tags=["embed"], responses=ERROR_RESPONSES)

_BODY = request_body({"files": {"type": "array", "items": BINARY}}, ["files"], EmbedJSON)


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    body = await read_image_body(
        request, EmbedJSON, lambda j: j.images, file_fields=("files", "file"), max_images=max_images
    )
    if not body.uploads:
        raise ApiError(422, "no_images", "no images in the request: send one or more `files` parts")
    return body.uploads


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed one or more images",
    description="One result per image, in order. An image that cannot be decoded gets an `error` "
    "(reason, message) instead of an `embedding`; when every image fails the request answers the "
    "first failure's status (413 too large, 415 not an image, 422 unreadable/truncated).",
    openapi_extra=_BODY,
)
async def embed_images(request: Request, res: Annotated[Resources, Depends(get_resources)]) -> EmbedResponse:
    uploads = await read_uploads(request, res.settings.max_images_per_request)
    results = await res.pipeline.embed(uploads)
    errors = [r for r in results if isinstance(r, ErrorItem)]
    if len(errors) == len(results):
        api_error = error_for(errors[0])
        api_error.errors = errors
        raise api_error
    out = []
    for i, r in enumerate(results):
        if isinstance(r, ErrorItem):
            out.append(EmbedResult(index=i, filename=r.filename, error=r))
        else:
            out.append(
                EmbedResult(
                    index=i, filename=r.upload.filename, embedding=r.vector.tolist(), width=r.width, height=r.height
                )
            )
    spec = res.spec
    return EmbedResponse(model=spec.name, model_version=spec.version, dim=spec.embedding_dim, results=out)
