"""llmux's HTTP/1.1 client to backends, against real sockets: a scripted server answers each
request with bytes exactly as given, in the pieces given, so that framing, keep-alive and every
failure are seen as a backend would cause them."""

from __future__ import annotations

import errno
import itertools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.http import upstream
from llmux.http.upstream import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
)

REQUEST = b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\n\r\n"


class ScriptedBackend:
    """Answers the n-th request with `answers[n]`: a list of byte pieces, sent with a pause
    between them; `None` as a piece closes the connection there."""

    def __init__(self, answers: list[list[bytes | None]]) -> None:
        self.answers = answers
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while self.answers:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buffer = rest[length:]
                for piece in self.answers.pop(0):
                    if piece is None:
                        return
                    await stream.send_all(piece)
                    await trio.sleep(0.01)


async def exchange(pool: UpstreamPool, port: int, method: bytes = b"POST") -> tuple[int, bytes]:
    connection, response = await pool.request(port, REQUEST, b"{}", method=method)
    body = b"".join([piece async for piece in response.body()])
    if not pool.release(port, connection, response):
        connection.stream.socket.close()
    return response.status, body


def run_with(answers, scenario):
    async def main():
        backend = ScriptedBackend(answers)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            pool = UpstreamPool(5.0)
            try:
                await scenario(pool, backend)
            finally:
                await pool.aclose()
                nursery.cancel_scope.cancel()
        return backend

    return trio.run(main)


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: 1\r\n\r\n"
)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, len(CHUNKED) - 1), unique=True, max_size=6))
def test_a_chunked_body_is_decoded_however_it_is_cut(cuts):
    """Cut at any byte: the same payload, nothing held back, and the connection reused."""
    points = [0, *sorted(cuts), len(CHUNKED)]
    pieces = [CHUNKED[a:b] for a, b in itertools.pairwise(points)]
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def scenario(pool, backend):
        assert await exchange(pool, backend.port) == (200, b"hello world")
        assert await exchange(pool, backend.port) == (200, b"ok")
        assert backend.connections == 1

    run_with([pieces, [ok]], scenario)


def test_each_read_is_passed_on_at_once_not_batched():
    """A stream's events arrive one by one: each is yielded before the next is sent."""
    events = [b"data: %d\n\n" % i for i in range(3)]
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    pieces = [head, *[b"%x\r\n%s\r\n" % (len(e), e) for e in events], b"0\r\n\r\n"]

    async def scenario(pool, backend):
        connection, response = await pool.request(backend.port, REQUEST, b"{}", method=b"POST")
        got = [piece async for piece in response.body()]
        assert got == events
        assert pool.release(backend.port, connection, response)

    run_with([pieces], scenario)


@pytest.mark.parametrize(
    ("answer", "expected", "reused"),
    [
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", b"cde"], b"abcde", True),
        ([b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nab"], b"ab", False),
        ([b"HTTP/1.1 200 OK\r\n\r\nuntil the end", None], b"until the end", False),
        ([b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nab"], b"ab", False),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], b"", True),
        (
            [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx"],
            b"x",
            True,
        ),
    ],
)
def test_bodies_framed_every_way_and_reuse_only_when_safe(answer, expected, reused):
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def scenario(pool, backend):
        status, body = await exchange(pool, backend.port)
        assert body == expected and status in (200, 204)
        assert await exchange(pool, backend.port) == (200, b"ok")
        assert backend.connections == (1 if reused else 2)

    run_with([answer, [ok]], scenario)


def test_a_head_request_reads_no_body():
    answers = [
        [b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    ]

    async def scenario(pool, backend):
        assert await exchange(pool, backend.port, method=b"HEAD") == (200, b"")
        assert await exchange(pool, backend.port) == (200, b"ok")
        assert backend.connections == 1

    run_with(answers, scenario)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ([b"SPDY/3 200 OK\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 2x0 OK\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 200 OK\r\n" + b"x: " + b"y" * 70000 + b"\r\n\r\n"], UpstreamProtocolError),
        ([b"HTTP/1.1 20", None], UpstreamClosed),
        ([None], UpstreamClosed),
    ],
)
def test_a_head_it_cannot_read_is_an_error(answer, error):
    async def scenario(pool, backend):
        with pytest.raises(error):
            await pool.request(backend.port, REQUEST, b"{}", method=b"POST")

    run_with([answer], scenario)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "body", "error"),
    [
        (CHUNKED_HEAD, b"zz\r\nab\r\n", UpstreamProtocolError),
        (CHUNKED_HEAD, b"2\r\nabXY", UpstreamProtocolError),
        (CHUNKED_HEAD, b"5\r\nab", UpstreamClosed),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", b"abc", UpstreamClosed),  # short
    ],
)
def test_a_broken_body_is_an_error_mid_answer_and_its_connection_is_not_reused(head, body, error):
    async def scenario(pool, backend):
        connection, response = await pool.request(backend.port, REQUEST, b"{}", method=b"POST")
        with pytest.raises(error):
            async for _ in response.body():
                pass
        assert not pool.release(backend.port, connection, response)
        connection.stream.socket.close()

    run_with([[head, body, None]], scenario)


def test_a_connection_the_backend_closed_while_idle_is_not_used():
    """The backend closes a kept-alive connection (its own idle timeout): the next request
    goes on a new connection instead of failing."""
    answers = [
        [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na", None],  # then it closes
        [b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"],
    ]

    async def scenario(pool, backend):
        assert await exchange(pool, backend.port) == (200, b"a")
        assert len(pool._idle[backend.port]) == 1  # kept: its end had not come yet
        await trio.sleep(0.1)
        assert await exchange(pool, backend.port) == (200, b"b")
        assert backend.connections == 2

    run_with(answers, scenario)


def test_an_expired_connection_is_not_used(monkeypatch):
    monkeypatch.setattr(upstream, "KEEPALIVE_EXPIRY_SECS", 0.05)
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async def scenario(pool, backend):
        assert await exchange(pool, backend.port) == (200, b"ok")
        await trio.sleep(0.1)
        assert await exchange(pool, backend.port) == (200, b"ok")
        assert backend.connections == 2

    run_with([[ok], [ok]], scenario)


def test_a_refused_connection_says_so():
    async def main():
        with trio.socket.socket() as probe:
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        pool = UpstreamPool(5.0)
        with pytest.raises(UpstreamConnectError) as caught:
            await pool.request(port, REQUEST, b"{}", method=b"POST")
        assert caught.value.errno == errno.ECONNREFUSED

    trio.run(main)


def test_the_request_goes_out_byte_for_byte():
    async def scenario(pool, backend):
        await exchange(pool, backend.port)
        assert backend.requests == [REQUEST + b"{}"]

    run_with([[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]], scenario)
