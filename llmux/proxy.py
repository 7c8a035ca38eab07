"""Forward one request's bytes to a backend and hand back its streamed response.

This module knows nothing of models, switching or ASGI: it builds the upstream request, filters
hop-by-hop headers both ways, and maps transport failures to `BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx
import trio

from llmux.errors import BackendUnavailable

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those the proxy
# recomputes itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# hypercorn adds its own Date and Server; passing the backend's would duplicate them. The body is
# passed on raw (still encoded), so the backend's Content-Length stays true.
DROPPED_RESPONSE_HEADERS = (HOP_BY_HOP - {b"content-length"}) | {b"date", b"server"}
BACKEND_CONNECT_TIMEOUT_SECS = 5.0
# Backends such as uvicorn close idle connections after 5 s; expire ours first to avoid the race.
KEEPALIVE_EXPIRY_SECS = 4.0


class BackendConnectFailed(BackendUnavailable):
    """The backend refused the connection: it may have died, so its model's alive check runs."""


class UpstreamClient:
    def __init__(self) -> None:
        # No read timeout: a long generation may legitimately take minutes between bytes. No pool
        # limit: every stream llmux carries needs its own connection.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=BACKEND_CONNECT_TIMEOUT_SECS),
            limits=httpx.Limits(
                max_connections=None,
                max_keepalive_connections=512,
                keepalive_expiry=KEEPALIVE_EXPIRY_SECS,
            ),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def open(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> AsyncIterator[httpx.Response]:
        """Send the request and yield the response with its body unread; always closes it."""
        request = self._client.build_request(
            method, base_url + target, headers=forwarded_request_headers(headers), content=body
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise BackendConnectFailed(
                f"backend at {base_url} refused the connection: {exc}"
            ) from None
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"backend at {base_url} failed: {exc!r}") from None
        try:
            yield response
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()


def forwarded_request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
    if not any(name.lower() == b"accept-encoding" for name, _ in out):
        # httpx would otherwise ask for gzip on the client's behalf, and the raw bytes we pass on
        # would be compressed for a client that never said it could decode them.
        out.append((b"accept-encoding", b"identity"))
    return out


def forwarded_response_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in response.headers.raw
        if name.lower() not in DROPPED_RESPONSE_HEADERS
    ]
