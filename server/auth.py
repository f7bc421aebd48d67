"""API key for writes: `X-API-Key: KEY` or `Authorization: Bearer KEY`, required only when configured."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token")


async def require_write_key(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = api_key or (bearer.credentials if bearer is not None else None)
    if given is None:
        raise ApiError(
            401, "unauthorized", "this server requires an API key for writes: send X-API-Key or Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "wrong API key", headers={"WWW-Authenticate": "Bearer"})
