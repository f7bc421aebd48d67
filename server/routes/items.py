"""/v1/items: add an image (stored under the index directory), read, delete, thumbnail.

Writes are serialised by one lock (so an upload file and its index row change together) and are
durable per the commit policy (server/committer.py) before they are acknowledged.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from embed.decode import DecodeError
from server.auth import require_write_key
from server.bodies import BINARY, Upload, check_metadata, parse_metadata, read_image_body, request_body
from server.errors import ERROR_RESPONSES, ApiError
from server.items_view import item_out
from server.schemas import Deleted, Item, ItemCreated, ItemJSON
from server.state import Resources, get_resources

router = APIRouter(prefix="/v1/items", tags=["items"], responses=ERROR_RESPONSES)

ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="the item's id")]
Res = Annotated[Resources, Depends(get_resources)]

_BODY = request_body(
    {"file": BINARY, "metadata": {"type": "string", "description": "a JSON object, stored with the item"}},
    ["file"],
    ItemJSON,
)


async def _read_item(request: Request) -> tuple[Upload, dict[str, Any]]:
    body = await read_image_body(request, ItemJSON, lambda item: [item.image])
    if body.json_body is None:  # multipart: `file` and the `metadata` field (JSON text)
        return body.one(), parse_metadata(body.fields.get("metadata"))
    return body.one(), check_metadata(body.json_body.metadata)


async def _durable(res: Resources) -> None:
    """Wait for the commit policy; a failed commit is a 503 (the write may not survive a crash)."""
    try:
        await res.committer.wrote()
    except Exception as e:
        raise ApiError(503, "commit_failed", f"the change could not be written to disk: {e}",
                       headers={"Retry-After": "5"}) from e


def _resolve(res: Resources, path: str) -> str:
    """An indexed path as a file name. Uploads are stored absolute; folder items relative to the
    indexed folder: under `images_dir` when set (the folder is elsewhere on this machine than where
    `index build` read it, e.g. another container's mount), else under the index's recorded root."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    root = res.settings.images_dir or res.index.meta.get("root") or res.settings.index_dir
    return str(Path(root) / p)


@router.post(
    "",
    response_model=ItemCreated,
    status_code=201,
    summary="Add an image to the index",
    description="Multipart: `file` and optional `metadata` (a JSON object as text); or JSON with a "
    "base64 `image` and `metadata`. The image's bytes are kept under the index directory.",
    dependencies=[Depends(require_write_key)],
    openapi_extra=_BODY,
)
async def add_item(request: Request, res: Res) -> ItemCreated:
    upload, metadata = await _read_item(request)
    embedded = await res.pipeline.embed_one(upload)
    assert upload.data is not None
    data = upload.data
    sha = hashlib.sha256(data).hexdigest()
    async with res.write_lock:
        duplicates = [r.id for r in await run_in_threadpool(res.index.find_by_sha256, sha)]
        path = await run_in_threadpool(res.uploads.save, data, sha, upload.filename)
        record = {
            "path": str(path),
            "size": len(data),
            "mtime": os.stat(path).st_mtime,
            "sha256": sha,
            "width": embedded.width,
            "height": embedded.height,
            "added_at": time.time(),
            "metadata": {**metadata, **({"filename": upload.filename} if upload.filename else {})},
        }
        (item_id,) = await run_in_threadpool(res.index.add, embedded.vector.reshape(1, -1), [record])
    await _durable(res)
    # another process serving this index may have removed the same bytes' file meanwhile
    await run_in_threadpool(res.uploads.ensure, str(path), data)
    stored = await run_in_threadpool(res.index.get, item_id)
    if stored is None:  # deleted by a concurrent request already
        raise ApiError(404, "not_found", f"item {item_id} was deleted while it was being added")
    return ItemCreated(item=item_out(stored), duplicate_of=duplicates)


@router.get("/{item_id}", response_model=Item, summary="One indexed item")
async def get_item(item_id: ItemId, res: Res) -> Item:
    record = await run_in_threadpool(res.index.get, item_id)
    if record is None:
        raise ApiError(404, "not_found", f"no item with id {item_id}")
    return item_out(record)


@router.delete(
    "/{item_id}",
    response_model=Deleted,
    summary="Remove an item from the index (and its uploaded file, if it was uploaded)",
    dependencies=[Depends(require_write_key)],
)
async def delete_item(item_id: ItemId, res: Res) -> Deleted:
    async with res.write_lock:
        record = await run_in_threadpool(res.index.get, item_id)
        if record is None:
            raise ApiError(404, "not_found", f"no item with id {item_id}")
        removed = await run_in_threadpool(res.index.remove, [item_id])
    await _durable(res)  # even when nothing was removed: the write transaction is open until a commit
    if not removed:  # another process deleted it between our read and our write
        raise ApiError(404, "not_found", f"no item with id {item_id}")
    # the uploaded file goes only after the removal is durable, and only if no committed item uses it.
    # Writes acknowledged before their commit (commit_interval_ms > 0) in another worker would not
    # be seen here: with several workers that policy keeps the file (an orphan, never a missing file).
    settings = res.settings
    if res.uploads.owns(record.path) and (settings.commit_interval_ms == 0 or settings.workers == 1):
        async with res.write_lock:
            await run_in_threadpool(res.uploads.discard_unused, record.path,
                                    lambda p: res.index.get_by_path(p) is not None)
    return Deleted(id=item_id, deleted=True)


@router.get(
    "/{item_id}/thumbnail",
    response_class=Response,
    summary="A small JPEG of an indexed item",
    responses={200: {"content": {"image/jpeg": {"schema": BINARY}}, "description": "JPEG thumbnail"}},
)
async def thumbnail(item_id: ItemId, res: Res) -> Response:
    record = await run_in_threadpool(res.index.get, item_id)
    if record is None:
        raise ApiError(404, "not_found", f"no item with id {item_id}")
    try:
        jpeg = await run_in_threadpool(res.thumbnails.get, _resolve(res, record.path))
    except FileNotFoundError:
        raise ApiError(404, "file_missing", f"the file of item {item_id} is no longer on disk") from None
    except OSError as e:
        raise ApiError(404, "file_missing", f"the file of item {item_id} cannot be read: {e.strerror}") from None
    except DecodeError as e:
        raise ApiError(422, e.reason, f"the file of item {item_id} cannot be decoded: {e}") from None
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})
