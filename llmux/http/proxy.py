"""Forward one request's bytes to a backend and hand back its streamed response.

This module knows nothing of models, switching or ASGI: it builds the upstream request, filters
hop-by-hop headers both ways, and maps transport failures to `BackendUnavailable`.

The target goes upstream byte for byte as the route table matched it: the URL is built from its
parts, never parsed from a string, so nothing resolves `..` or re-splits the path on the way.

Requests go through llmux's own small HTTP/1.1 client (upstream.py): see there for why, and
`python -m benchmarks.upstream_client` for what it saves against httpx and httpcore.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from llmux.errors import BackendTimeout, BackendUnavailable
from llmux.http.auth import CREDENTIAL_HEADERS
from llmux.http.upstream import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
)

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


class BackendConnectFailed(BackendUnavailable):
    """The backend refused the connection: it may have died, so its model's alive check runs."""


class UpstreamClient:
    def __init__(self) -> None:
        self._pool = UpstreamPool(BACKEND_CONNECT_TIMEOUT_SECS)

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
    ) -> AsyncIterator[UpstreamResponse]:
        """Send the request (headers already filtered by `forwarded_request_headers`) to the
        backend on `port` and yield the response with its body unread; the connection goes
        back to the pool if the body was read to its end, else it is closed. BackendTimeout
        when the response head takes longer than `first_byte_timeout`."""
        where = f"http://127.0.0.1:{port}"
        verb = method.encode()
        head = b"".join(
            [
                b"%s %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % (verb, target, port),
                *[b"%s: %s\r\n" % (name, value) for name, value in headers],
                b"content-length: %d\r\nconnection: keep-alive\r\n\r\n" % len(body),
            ]
        )
        try:
            with trio.fail_after(first_byte_timeout):
                connection, response = await self._pool.request(port, head, body, method=verb)
        except trio.TooSlowError:
            raise BackendTimeout(
                f"backend at {where} sent nothing within {first_byte_timeout:g}s "
                "(first_byte_timeout_secs)"
            ) from None
        except UpstreamConnectError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise BackendUnavailable(f"backend at {where} failed: {exc.strerror}") from None
            raise BackendConnectFailed(
                f"backend at {where} refused the connection: {exc.strerror}"
            ) from None
        except (OSError, trio.BrokenResourceError, UpstreamProtocolError, UpstreamClosed) as exc:
            raise BackendUnavailable(f"backend at {where} failed: {exc!r}") from None
        try:
            yield response
        finally:
            if not self._pool.release(port, connection, response):
                connection.stream.socket.close()


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
