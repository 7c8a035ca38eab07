"""llmux's accept loop: hypercorn's HTTP protocol on each connection, inside llmux's own bounds.

Why not `hypercorn.trio.serve`: it binds its own sockets and hands every connection straight to
its protocol, which leaves no place for three things llmux needs:
- serving on a socket bound earlier (instance.py binds it before any hook runs);
- `max_connections`: beyond it a new connection gets a 503 with Retry-After and is closed, instead
  of growing without bound until the process runs out of descriptors;
- `client_send_timeout_secs`: hypercorn writes to a connection under a cancel shield, so a client
  that stops reading would block its request, and the model slot the request holds (and with it
  every drain of that model), forever. Each connection's stream is wrapped here: a write that makes
  no progress for that long closes the connection; hypercorn then tells the app that the client is
  gone, and the app releases the slot and counts the cut (see `current_connection`).

And one repair: under trio, hypercorn keeps a connection that the client closed while idle for a
full keep-alive timeout (its idle timer is never stopped), which would count it against
`max_connections` for 75 s. A connection whose peer has closed is reaped here after a short grace.

And one refusal: each connection speaks HTTP/1.1 only, where hypercorn would switch a plain one to
HTTP/2 (h2c) on `Upgrade: h2c` or on the HTTP/2 preface. llmux's bounds are built for HTTP/1.1
(`max_connections` counts connections, which HTTP/2 multiplexes; `client_send_timeout_secs`
watches socket writes, which HTTP/2 flow control can stall per stream), and an upgrade passed on
by a front tunnels past the front's rules (docs/security.md, "Protocol"). So `Upgrade: h2c`
is ignored (RFC 9110 §7.8 lets a server) and the preface gets HTTP/2's own refusal, GOAWAY with
HTTP_1_1_REQUIRED, then the connection closes. A request that does not parse as HTTP/1.1 gets its
400 (or 431) in OpenAI's shape, not hypercorn's empty one.

This is the only module that uses hypercorn's internals (TCPServer, H11Protocol, WorkerContext,
ASGIWrapper); pyproject.toml pins hypercorn's minor version for it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState

from llmux.config import ServerConfig
from llmux.errors import HeadersTooLarge, InvalidRequest, error_body
from llmux.http.watchdog import Watchdog
from llmux.observe.logs import log_event
from llmux.observe.metrics import Metrics

log = logging.getLogger("llmux.listener")

SEND_PIECE_BYTES = 16 * 1024  # progress is measured per piece: a reading client keeps going
PEER_CLOSED_GRACE_SECS = 1.0  # after the client closed: time for the app to finish its bookkeeping
REFUSAL_WAIT_SECS = 1.0  # how long a refused connection may take to send its head, then to read
MAX_REFUSALS_AT_ONCE = 128  # beyond it, connections over the limit are closed without an answer


def hypercorn_config(server: ServerConfig) -> HypercornConfig:
    """hypercorn's settings for llmux's listener (in this process or in a worker)."""
    config = HypercornConfig()
    # One timer bounds both an idle keep-alive connection and a request head that trickles in
    # (hypercorn counts a connection as idle until the whole head has arrived). Keep it longer
    # than clients' pool expiry (often 5 s) to avoid the close race.
    config.keep_alive_timeout = server.request_head_timeout_secs
    config.h11_max_incomplete_size = server.max_header_bytes
    config.graceful_timeout = 1.0  # llmux drains before the listener closes; this is a backstop
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


@dataclass(frozen=True)
class ConnectionBounds:
    max_connections: int
    client_send_timeout: float


@dataclass
class ConnectionInfo:
    """What the listener knows of the connection a request came on (read by the app)."""

    send_timed_out: bool = False
    peer_closed: trio.Event = field(default_factory=trio.Event)


# Set in each connection's task; hypercorn starts the app's task from it, so the app sees it.
current_connection: ContextVar[ConnectionInfo | None] = ContextVar("llmux_connection", default=None)


class BoundedStream:
    """A socket stream whose writes give up, and close it, after `timeout` seconds without
    progress (a `Watch` of the listener's watchdog: no cancel scope per write), and which notes
    when the peer has closed. It has no `do_handshake`: hypercorn takes that to mean plain
    TCP."""

    def __init__(
        self, stream: trio.SocketStream, timeout: float, info: ConnectionInfo, watchdog: Watchdog
    ) -> None:
        self._stream = stream
        self._timeout = timeout
        self._info = info
        self._watchdog = watchdog
        self.watch = watchdog.watch(timeout, self._cut)

    def _cut(self) -> None:
        """A write made no progress for `timeout`: close the socket under it (trio wakes the
        blocked write with ClosedResourceError)."""
        self._info.send_timed_out = True
        self._stream.socket.close()

    def forget(self) -> None:
        self._watchdog.forget(self.watch)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= SEND_PIECE_BYTES:  # nearly always: one SSE event, one small answer
            await self._send_piece(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), SEND_PIECE_BYTES):
            await self._send_piece(view[start : start + SEND_PIECE_BYTES])

    async def _send_piece(self, piece: bytes | bytearray | memoryview) -> None:
        self.watch.begin()
        try:
            await self._stream.send_all(piece)
        except trio.ClosedResourceError:
            if self._info.send_timed_out:
                raise trio.BrokenResourceError(
                    f"the client took nothing for {self._timeout:g}s"
                ) from None
            raise
        finally:
            self.watch.end()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        if not data:
            self._info.peer_closed.set()
        return data

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _http2_frame(kind: int, payload: bytes) -> bytes:
    """An HTTP/2 frame on the connection's stream 0, without flags (RFC 9113 §4.1)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4) + payload


_SETTINGS, _GOAWAY, _HTTP_1_1_REQUIRED = 0x4, 0x7, 0xD
# The server's preface (an empty SETTINGS), then GOAWAY: no stream was taken, use HTTP/1.1.
HTTP2_REFUSAL = _http2_frame(_SETTINGS, b"") + _http2_frame(
    _GOAWAY,
    bytes(4) + _HTTP_1_1_REQUIRED.to_bytes(4, "big") + b"llmux speaks HTTP/1.1 only",
)


class Http11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its ways into HTTP/2 (see above)."""

    async def _check_protocol(self, event: h11.Request) -> None:
        """Switch to nothing: `Upgrade: h2c` is ignored; the preface is refused below."""

    async def _create_stream(self, request: h11.Request) -> None:
        if request.method == b"PRI" and request.target == b"*":  # the HTTP/2 preface's start
            await self.send(RawData(data=HTTP2_REFUSAL))
            await self.send(Closed())
            return
        await super()._create_stream(request)

    async def _send_error_response(self, status_code: int) -> None:
        """A request that does not parse: its error in OpenAI's shape, then close."""
        if status_code == 431:
            error: InvalidRequest | HeadersTooLarge = HeadersTooLarge(
                "the request head is larger than server.max_header_bytes"
            )
        else:
            error = InvalidRequest(
                "the request is not valid HTTP/1.1: its request line or a header does not "
                "parse (a request target holds printable ASCII only, without spaces)"
            )
        body = error.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


class Http11Server(TCPServer):
    """hypercorn's TCPServer serving `Http11Protocol` only. Its `run` builds a ProtocolWrapper,
    which would switch the connection to HTTP/2 when the client asks; the wrapper is handed our
    protocol in place of its own as `run` sets it (TCPServer has no setting for that)."""

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._wrapper

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        w = wrapper
        w.protocol = Http11Protocol(
            w.app, w.config, w.context, w.task_group, w.state, w.ssl, w.client, w.server, w.send
        )
        self._wrapper = wrapper


class Listener:
    """Accepts connections on a bound socket and serves each with hypercorn's HTTP/1.1."""

    def __init__(
        self,
        app: ASGIFramework,
        config: HypercornConfig,
        bounds: ConnectionBounds,
        metrics: Metrics,
    ) -> None:
        self._app = ASGIWrapper(app)
        self._config = config
        self._bounds = bounds
        self._metrics = metrics
        self._context = WorkerContext(None)
        self._watchdog = Watchdog()  # bounds stalled writes to clients
        self._open = 0
        self._refusing = 0
        self._refused = 0

    async def serve(
        self,
        sock: socket.socket,
        shutdown_trigger: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_trigger` returns; then stop accepting, close idle connections,
        give busy ones `graceful_timeout` and cancel what is left."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        host, port = sock.getsockname()[:2]
        async with trio.open_nursery() as watching:
            watching.start_soon(self._watchdog.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners, self._handle, [listener],
                            handler_nursery=connections,
                        )
                    )  # fmt: skip
                    task_status.started(f"http://{_url_host(host)}:{port}")
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
                await self._context.terminated.set()  # idle keep-alive connections close now
                graceful = self._config.graceful_timeout
                connections.cancel_scope.deadline = trio.current_time() + graceful
            watching.cancel_scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._open >= self._bounds.max_connections:
            await self._refuse(stream)
            return
        self._open += 1
        self._metrics.connections_open.set(self._open)
        info = ConnectionInfo()
        current_connection.set(info)
        bounded = BoundedStream(stream, self._bounds.client_send_timeout, info, self._watchdog)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reap_when_closed, info, nursery.cancel_scope)
                await Http11Server(
                    self._app, self._config, self._context, ConnectionState({}), bounded
                )
                nursery.cancel_scope.cancel()
        finally:
            bounded.forget()
            self._open -= 1
            self._metrics.connections_open.set(self._open)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer 503 (after the request head, so the client reads it) and close."""
        self._metrics.connections_refused.inc()
        self._refused += 1
        if self._refused == 1:  # say it once, not once per connection of a flood
            log_event(
                log, "connection_refused", "server.max_connections reached: new connections "
                "get 503 until some close", logging.WARNING,
                max_connections=self._bounds.max_connections,
            )  # fmt: skip
        if self._refusing >= MAX_REFUSALS_AT_ONCE:
            return  # the serve loop closes the stream
        self._refusing += 1
        try:
            await _answer_busy(stream, self._bounds.max_connections)
        finally:
            self._refusing -= 1


async def _reap_when_closed(info: ConnectionInfo, connection: trio.CancelScope) -> None:
    await info.peer_closed.wait()
    await trio.sleep(PEER_CLOSED_GRACE_SECS)
    connection.cancel()


async def _answer_busy(stream: trio.SocketStream, limit: int) -> None:
    body = error_body(
        f"llmux has server.max_connections ({limit}) connections open; retry shortly",
        "server_error",
        "too_many_connections",
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    try:
        with trio.move_on_after(REFUSAL_WAIT_SECS):
            seen = b""
            while b"\r\n\r\n" not in seen and len(seen) < 16384:
                chunk = await stream.receive_some(16384)
                if not chunk:
                    break
                seen += chunk
        with trio.move_on_after(REFUSAL_WAIT_SECS):
            await stream.send_all(head.encode() + body)
            await stream.send_eof()
            while await stream.receive_some(65536):  # let the client finish, then read us
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
