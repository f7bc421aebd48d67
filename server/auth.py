"""API key for writes: `X-API-Key: KEY` or `Authorization: Bearer KEY`, required only when configured.

A server that others can reach must have one: `open_writes_refusal` says why a non-loopback bind
without a key may not start (unless `allow_open_writes` says so explicitly); loopback binds keep
working without a key, as on a laptop.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError
from server.settings import Settings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

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


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the usual names for them; anything else (0.0.0.0, ::, a name) is not."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def open_writes_refusal(settings: Settings) -> str | None:
    """Why this server may not start (one line), or None: writes must not be open to the network."""
    if settings.api_key is not None or settings.allow_open_writes or is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} without an API key: anyone who reaches it could add and "
        "delete items. Set SIMSEARCH_API_KEY (writes then need it), or listen on 127.0.0.1, or set "
        "SIMSEARCH_ALLOW_OPEN_WRITES=1 to open writes on purpose"
    )
