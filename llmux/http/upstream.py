"""A small HTTP/1.1 client for the hot path: llmux to a backend on this box, on trio.

Why not httpcore: per request and per event it runs h11's state machine on top of its own
pool, connection and stream objects; measured side by side on one machine (benchmarks in
`benchmarks/upstream_client.py`), this client costs a fraction of that per request and per
streamed event. It does only what a proxy to a local backend needs:

- one request per connection at a time, connections kept per port and reused (expired after
  `KEEPALIVE_EXPIRY_SECS`, and dropped when the backend has closed them meanwhile);
- response bodies framed by Content-Length, by chunked transfer coding, or by the connection's
  end (that connection is then not reused); no body for HEAD, 1xx, 204 and 304;
- each read's payload is handed on at once, whole or in part, never held back to batch it.

Anything it does not understand (a bad status line, a malformed chunk, a head over
`MAX_HEAD_BYTES`) is an `UpstreamProtocolError`: the proxy answers 502, or cuts the answer
if its head was already sent. httpx stays the client of the control plane.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

MAX_HEAD_BYTES = 64 * 1024
RECEIVE_BYTES = 64 * 1024
KEEPALIVE_EXPIRY_SECS = 4.0  # backends such as uvicorn close idle connections after 5 s
MAX_IDLE_PER_PORT = 512
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamProtocolError(Exception):
    """The backend's answer is not HTTP/1.1 this client can read."""


class UpstreamConnectError(OSError):
    """The backend could not be reached (refused, or no answer to the connection)."""


class UpstreamClosed(Exception):
    """The backend closed the connection before its answer was complete."""


@dataclass
class _Connection:
    stream: trio.SocketStream
    buffer: bytearray = field(default_factory=bytearray)
    idle_since: float = 0.0

    def peer_has_closed(self) -> bool:
        """Whether the backend closed (or sent something unasked) while it sat in the pool:
        an idle connection that is readable has either."""
        try:
            return self.stream.socket.is_readable()
        except OSError:
            return True

    async def fill(self) -> bool:
        """Read once more into the buffer; False at the end of the stream."""
        data = await self.stream.receive_some(RECEIVE_BYTES)
        if not data:
            return False
        self.buffer += data
        return True


class UpstreamResponse:
    """A response whose head has been read; `body()` yields its payload as it comes."""

    def __init__(
        self,
        connection: _Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        framing: str,
        length: int,
        reusable: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection
        self._framing = framing  # "none", "length", "chunked" or "close"
        self._left = length  # bytes left: of the body (length) or of the current chunk
        self._reusable = reusable
        self.complete = framing == "none"

    async def body(self) -> AsyncIterator[bytes]:
        if self._framing == "length":
            async for piece in self._length_body():
                yield piece
        elif self._framing == "chunked":
            async for piece in self._chunked_body():
                yield piece
        elif self._framing == "close":
            async for piece in self._close_body():
                yield piece

    async def _length_body(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while self._left:
            if not connection.buffer and not await connection.fill():
                raise UpstreamClosed(f"the backend closed with {self._left} body bytes unsent")
            piece = bytes(connection.buffer[: self._left])
            del connection.buffer[: len(piece)]
            self._left -= len(piece)
            yield piece
        self.complete = True

    async def _close_body(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.buffer:
                piece = bytes(connection.buffer)
                connection.buffer.clear()
                yield piece
            if not await connection.fill():
                self.complete = True
                return

    async def _chunked_body(self) -> AsyncIterator[bytes]:
        """Decode the chunked coding; what one read brought is yielded as one piece."""
        connection = self._connection
        buffer = connection.buffer
        while True:
            out = bytearray()
            finished = self._decode_chunks(buffer, out)
            if out:
                yield bytes(out)
            if finished:
                self.complete = True
                return
            if not await connection.fill():
                raise UpstreamClosed("the backend closed in the middle of a chunked body")

    def _decode_chunks(self, buffer: bytearray, out: bytearray) -> bool:
        """Move every payload byte the buffer holds into `out`; True once the last chunk and
        the trailers are in. `self._left` is what the chunk being read still lacks (-2 while
        its closing CRLF is awaited)."""
        while True:
            if self._left > 0:
                take = min(self._left, len(buffer))
                out += buffer[:take]
                del buffer[:take]
                self._left -= take
                if self._left:
                    return False
                self._left = -2
            if self._left == -2:
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise UpstreamProtocolError("a chunk does not end with CRLF")
                del buffer[:2]
                self._left = 0
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("a chunk size line is too long")
                return False
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise UpstreamProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise UpstreamProtocolError("negative chunk size")
            if size == 0:  # the last chunk: then trailer lines, up to an empty one
                trailers_end = buffer.find(b"\r\n\r\n", end)
                if trailers_end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise UpstreamProtocolError("trailers too long")
                    return False
                del buffer[: trailers_end + 4]  # trailers are dropped, as before
                return True
            del buffer[: end + 2]
            self._left = size

    @property
    def reusable(self) -> bool:
        return self._reusable and self.complete and not self._connection.buffer


class UpstreamPool:
    """Keep-alive connections to backends on 127.0.0.1, by port."""

    def __init__(self, connect_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._idle: dict[int, deque[_Connection]] = {}

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                await connection.stream.aclose()
        self._idle.clear()

    async def request(
        self, port: int, head: bytes, body: bytes, *, method: bytes
    ) -> tuple[_Connection, UpstreamResponse]:
        """Send one request; return once the response head is read. The caller hands the
        connection back with `release` (or closes it) when the body is done."""
        connection = self._pooled(port)
        if connection is not None:
            try:
                await connection.stream.send_all(head + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The backend closed it as it was taken, and the request could not be written:
                # it never reached the backend, so it goes once more on a new connection. (A
                # backend that closes after the request is in gets no second copy: a 502.)
                connection.stream.socket.close()
            else:
                try:
                    return connection, await _read_head(connection, method)
                except BaseException:
                    connection.stream.socket.close()
                    raise
        connection = await self._connect(port)
        try:
            await connection.stream.send_all(head + body)
            return connection, await _read_head(connection, method)
        except BaseException:
            await connection.stream.aclose()
            raise

    def release(self, port: int, connection: _Connection, response: UpstreamResponse) -> bool:
        """Put the connection back if its answer was read to the end; False if it must close."""
        idle = self._idle.setdefault(port, deque())
        if not response.reusable or len(idle) >= MAX_IDLE_PER_PORT:
            return False
        connection.idle_since = trio.current_time()
        idle.append(connection)
        return True

    def _pooled(self, port: int) -> _Connection | None:
        idle = self._idle.get(port)
        now = trio.current_time()
        while idle:
            connection = idle.pop()  # the most recently used: least likely to be expired
            if now - connection.idle_since < KEEPALIVE_EXPIRY_SECS and not (
                connection.peer_has_closed()
            ):
                return connection
            connection.stream.socket.close()
        return None

    async def _connect(self, port: int) -> _Connection:
        sock = trio.socket.socket()  # one loopback address: no resolving, no happy eyeballs
        try:
            with trio.fail_after(self._connect_timeout):
                await sock.connect(("127.0.0.1", port))
        except trio.TooSlowError:
            sock.close()
            raise UpstreamConnectError(
                errno.ETIMEDOUT, f"no answer to a connection within {self._connect_timeout:g}s"
            ) from None
        except OSError as exc:
            sock.close()
            raise UpstreamConnectError(exc.errno, exc.strerror or str(exc)) from None
        return _Connection(trio.SocketStream(sock))  # TCP_NODELAY is set by SocketStream


async def _read_head(connection: _Connection, method: bytes) -> UpstreamResponse:
    while True:  # 1xx answers (100 Continue) come before the real one, and are skipped
        buffer = connection.buffer
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise UpstreamProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
            if not await connection.fill():
                raise UpstreamClosed("the backend closed before it answered")
            end = buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        status, version = _status_of(lines[0])
        if 100 <= status < 200 and status != 101:
            continue
        return _response(connection, status, version, lines[1:], method)


def _status_of(line: bytes) -> tuple[int, bytes]:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamProtocolError(f"bad status line {line[:40]!r}")
    return int(parts[1]), parts[0]


def _response(
    connection: _Connection, status: int, version: bytes, lines: list[bytes], method: bytes
) -> UpstreamResponse:
    headers = []
    length = -1
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise UpstreamProtocolError(f"bad header line {line[:40]!r}")
        value = value.strip()
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise UpstreamProtocolError(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif lower == b"transfer-encoding":
            if value.lower() != b"chunked":  # a coding under it would reach the client unsaid
                raise UpstreamProtocolError(f"unsupported Transfer-Encoding {value[:30]!r}")
            chunked = True
        elif lower == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                close = False
        headers.append((name, value))
    if status == 101:
        raise UpstreamProtocolError("the backend switched protocols")
    if method == b"HEAD" or status in NO_BODY_STATUSES:
        framing, length = "none", 0
    elif chunked:
        framing, length = "chunked", 0
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    elif length >= 0:
        framing = "length" if length else "none"
    else:
        framing, close = "close", True
    return UpstreamResponse(connection, status, headers, framing, length, reusable=not close)
