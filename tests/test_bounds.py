"""Every phase has a bound, end to end: a client that reads nothing, a backend that says nothing
(before its answer or in the middle of it), too many connections, and a body whose model is
refused before the rest of it is read."""

from __future__ import annotations

import json
import socket
from functools import partial

import httpx
import pytest
import trio

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    one_process_only,
    raw_exchange,
    write_config,
)


async def _in_flight(client: httpx.AsyncClient, model: str) -> int:
    models = (await client.get("/v1/models")).json()["data"]
    return next(m["llmux"]["in_flight"] for m in models if m["id"] == model)


async def test_a_client_that_reads_nothing_is_cut_and_its_slot_freed(fakes, tmp_path):
    # A 20 MB answer: far more than the socket buffers between llmux and a client that reads
    # nothing, so llmux's writes stop making progress.
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.0000001)
    path = write_config(
        tmp_path,
        fake_model_block(a) + fake_model_block(b),
        server={"client_send_timeout_secs": 1},
    )
    async with llmux_running(path) as (server, client):
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        sleeper = trio.socket.socket()
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sleeper.connect((host, int(port)))
        body = json.dumps(chat("a", max_tokens=2_000_000)).encode()
        await sleeper.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        with trio.fail_after(30):
            while await _in_flight(client, "a") == 0:
                await trio.sleep(0.05)
            while await _in_flight(client, "a") != 0:  # the slot comes back once it is cut
                await trio.sleep(0.1)
        # And a switch away from `a` (which drains it) goes through.
        with trio.fail_after(15):
            assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200
        metrics = (await client.get("/metrics")).text
        sleeper.close()
    assert metric_value(metrics, "llmux_client_send_timeouts_total", model="a") == 1
    assert metric_value(metrics, "llmux_requests_total", model="a", status="499") == 1


async def test_a_backend_silent_before_its_first_byte_gets_504(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=1.0)  # answers after max_tokens s
    path = write_config(tmp_path, fake_model_block(a, first_byte_timeout_secs=0.5))
    async with llmux_running(path) as (_, client):
        began = trio.current_time()
        response = await client.post("/v1/chat/completions", json=chat("a", max_tokens=5))
        took = trio.current_time() - began
        assert response.status_code == 504 and response.json()["error"]["code"] == "backend_timeout"
        assert took < 4
        assert await _in_flight(client, "a") == 0
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "llmux_backend_timeouts_total", model="a", phase="first_byte") == 1


async def test_a_backend_silent_mid_stream_is_cut_as_a_truncated_answer(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=2.0)
    path = write_config(tmp_path, fake_model_block(a, idle_timeout_secs=0.5))
    async with llmux_running(path) as (_, client):
        with pytest.raises(httpx.RemoteProtocolError):  # no final chunk: not a clean end
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=5)
            ) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    pass
        assert await _in_flight(client, "a") == 0
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "llmux_backend_timeouts_total", model="a", phase="idle") == 1


@one_process_only("max_connections is split over the workers")
async def test_connections_beyond_the_limit_get_503_then_close(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), server={"max_connections": 3})
    async with llmux_running(path) as (server, client):
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(3)]
        await trio.sleep(0.2)
        answer = await raw_exchange(server.url, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", wait=5)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"retry-after: 1" in head and b"connection: close" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        await idle.pop().aclose()  # reaped within a second (hypercorn alone would wait 75 s)
        await trio.sleep(1.5)
        answer = await raw_exchange(
            server.url, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.2)
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "llmux_connections_refused_total") == 1


@one_process_only("a full queue is answered once the body is in")
async def test_a_full_queue_answers_before_the_rest_of_the_body_arrives(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a, wake=f"sleep 3; {a.ctl('wake')}"),
        server={"max_queue_per_model": 1},
    )
    async with llmux_running(path) as (server, client), trio.open_nursery() as nursery:
        nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat("a")))
        await trio.sleep(0.3)  # it waits in the queue while `a` wakes
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
        )
        await stream.send_all(head + b'{"model": "a", "messages": [')  # and no more
        answer = await _first_answer(stream)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"queue_full" in answer and b"retry-after" in answer
        await stream.aclose()
        unknown = await trio.open_tcp_stream(host, int(port))
        await unknown.send_all(head + b'{"model": "nope", "messages": [')
        answer = await _first_answer(unknown)
        assert answer.startswith(b"HTTP/1.1 404 ") and b"model_not_found" in answer
        await unknown.aclose()


async def _first_answer(stream: trio.SocketStream) -> bytes:
    """An answer's head and JSON body, which must come within 2 s."""
    answer = b""
    with trio.fail_after(2):
        while not answer.endswith(b"}}"):
            answer += await stream.receive_some(65536)
    return answer


async def test_a_body_naming_two_models_is_refused(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        response = await client.post(
            "/v1/chat/completions",
            content=b'{"model": "a", "messages": [], "model": "b"}',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400 and "more than once" in response.json()["error"]["message"]
    assert a.state()["served"] == b.state()["served"] == 0
