"""Forward one request's bytes to a backend and hand back its streamed response.

This module knows nothing of models, switching or ASGI: it builds the upstream request, filters
hop-by-hop headers both ways, and maps transport failures to `BackendUnavailable`.

The target goes upstream byte for byte as the route table matched it: the URL is built from its
parts, never parsed from a string, so nothing resolves `..` or re-splits the path on the way.

Requests go through httpcore's connection pool (httpx's own transport) directly: httpx's
request and response models, URL parsing, auth and redirect layers cost about 130 us of CPU per
request here (370 against 236, measured side by side on one machine), and a proxy that passes
bytes on needs none of them. httpx stays the client of the control plane (engines, tools).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpcore
import trio

from llmux.errors import BackendTimeout, BackendUnavailable
from llmux.http.auth import CREDENTIAL_HEADERS

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
BACKEND_HOST = b"127.0.0.1"  # every backend is a server on this box (ModelConfig.base_url)
# What httpcore raises for a connection or an exchange that failed (it has no common base).
TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.TimeoutException,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)


class BackendConnectFailed(BackendUnavailable):
    """The backend refused the connection: it may have died, so its model's alive check runs."""


class UpstreamClient:
    def __init__(self) -> None:
        # No pool limit: every stream llmux carries needs its own connection.
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=None,
            max_keepalive_connections=512,
            keepalive_expiry=KEEPALIVE_EXPIRY_SECS,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    @asynccontextmanager
    async def open(
        self,
        port: int,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        first_byte_timeout: float,
    ) -> AsyncIterator[httpcore.Response]:
        """Send the request (headers already filtered by `forwarded_request_headers`) to the
        backend on `port` and yield the response with its body unread; always closes it.
        BackendTimeout when the response head takes longer than `first_byte_timeout`."""
        where = f"http://127.0.0.1:{port}"
        head = [
            (b"host", b"127.0.0.1:%d" % port),
            *headers,
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"keep-alive"),  # llmux's own hop (the client's is dropped)
        ]
        request = httpcore.Request(
            method.encode(),
            httpcore.URL(scheme=b"http", host=BACKEND_HOST, port=port, target=target),
            headers=head,
            content=body,
            # No read timeout: a long generation may take minutes between bytes.
            extensions={"timeout": {"connect": BACKEND_CONNECT_TIMEOUT_SECS}},
        )
        try:
            with trio.fail_after(first_byte_timeout):
                response = await self._pool.handle_async_request(request)
        except trio.TooSlowError:
            raise BackendTimeout(
                f"backend at {where} sent nothing within {first_byte_timeout:g}s "
                "(first_byte_timeout_secs)"
            ) from None
        except httpcore.ConnectError as exc:
            raise BackendConnectFailed(
                f"backend at {where} refused the connection: {exc}"
            ) from None
        except TRANSPORT_ERRORS as exc:
            raise BackendUnavailable(f"backend at {where} failed: {exc!r}") from None
        try:
            yield response
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()


def forwarded_request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, strip_credentials: bool, backend_api_key: str | None
) -> list[tuple[bytes, bytes]]:
    """The client's headers as the backend gets them: without hop-by-hop headers and those the
    client's `Connection` names; without the client's credentials when llmux checked them
    (`strip_credentials`) or the backend has a key of its own, which is sent instead."""
    headers = list(headers)
    dropped = HOP_BY_HOP | connection_named(headers)
    if strip_credentials or backend_api_key is not None:
        dropped |= CREDENTIAL_HEADERS
    out = [(name, value) for name, value in headers if name.lower() not in dropped]
    if backend_api_key is not None:
        out.append((b"authorization", b"Bearer " + backend_api_key.encode()))
    if not any(name.lower() == b"accept-encoding" for name, _ in out):
        # Said outright: the bytes are passed on as they come, so they must be ones a client
        # that asked for no encoding can read.
        out.append((b"accept-encoding", b"identity"))
    return out


def forwarded_response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    dropped = DROPPED_RESPONSE_HEADERS | connection_named(raw)
    return [(name, value) for name, value in raw if name.lower() not in dropped]


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The headers a `Connection` header names: they describe this hop only (RFC 9110 §7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    named.discard(b"")
    return frozenset(named)
