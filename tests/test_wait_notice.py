"""A stream that waits for its model says so (`[server] stream_wait_notice`), end to end: real
sockets, fake backends as processes, hooks as subprocesses."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from llmux.core.waiting import WaitView
from llmux.http import wait_notice
from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    raw_exchange,
    raw_post,
    write_config,
)

ON = {"stream_wait_notice": True}
WAKE_SECS = 1.2  # longer than WAIT_NOTICE_AFTER_SECS: the wait is told


def _streamed(model: str, tokens: int = 3) -> bytes:
    return raw_post(
        "/v1/chat/completions", json.dumps(chat(model, stream=True, max_tokens=tokens)).encode()
    )


def _comments(answer: bytes) -> list[str]:
    return [line[2:] for line in answer.decode().splitlines() if line.startswith(": ")]


async def test_the_openai_sdk_streams_through_a_slow_wake(fakes, tmp_path):
    import openai

    (a,) = fakes.start("a", wake_delay=WAKE_SECS)
    path = write_config(tmp_path, fake_model_block(a), server=ON)
    async with llmux_running(path) as (server, _):

        def use_sdk() -> tuple[str | None, list[str]]:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
            streamed = client.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
            )
            pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
            return streamed.response.headers.get("x-accel-buffering"), pieces

        head_by, pieces = await trio.to_thread.run_sync(use_sdk)
    assert head_by == "no"  # the head was llmux's notice, not the backend's answer
    assert "".join(pieces) == "a-0 a-1 a-2 a-3 "


@pytest.mark.parametrize("workers", [1, 2])
async def test_comments_name_the_model_and_the_place_in_line(fakes, tmp_path, workers):
    (a,) = fakes.start("a", wake_delay=WAKE_SECS)
    path = write_config(tmp_path, fake_model_block(a), server=ON)
    async with llmux_running(path, workers=workers) as (server, client):
        answers: dict[str, object] = {}

        async def first() -> None:  # not a stream: it waits without a word, first in line
            answers["first"] = await client.post("/v1/chat/completions", json=chat("a"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.sleep(0.2)
            answers["stream"] = await raw_exchange(server.url, _streamed("a"), wait=10)
    stream = answers["stream"]
    assert isinstance(stream, bytes)
    head, _, body = stream.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert _comments(body)[0] == "waiting for a to wake, 2nd in line"  # no wake measured yet
    assert b"a-2" in body and b"data: [DONE]" in body
    assert answers["first"].json()["system_fingerprint"] == "a"  # not a stream: not told


async def _idle_cutting_proxy(
    target: int, idle: float, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A TCP proxy that cuts a connection on which nothing passed for `idle` seconds, as load
    balancers and client libraries with idle timeouts do."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listener.socket.getsockname()[1])

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", target) as upstream:
            last = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    nonlocal last
                    while data := await source.receive_some(65536):
                        last = trio.current_time()
                        await sink.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
                while trio.current_time() < last + idle:
                    await trio.sleep_until(last + idle)
                nursery.cancel_scope.cancel()

    await trio.serve_listeners(handle, [listener])


@pytest.mark.parametrize("notice", [True, False])
async def test_a_proxy_with_an_idle_timeout_keeps_a_told_stream(
    fakes, tmp_path, monkeypatch, notice
):
    # The ratio of a 5 s idle timeout to notices every 3 s, shortened (in this process: one).
    monkeypatch.setattr(wait_notice, "WAIT_NOTICE_AFTER_SECS", 0.3)
    monkeypatch.setattr(wait_notice, "WAIT_NOTICE_EVERY_SECS", 0.5)
    (a,) = fakes.start("a", wake_delay=1.5)
    path = write_config(tmp_path, fake_model_block(a), server={"stream_wait_notice": notice})
    async with llmux_running(path, workers=1) as (server, _), trio.open_nursery() as nursery:
        port = int(server.url.rsplit(":", 1)[1])
        proxy = await nursery.start(_idle_cutting_proxy, port, 0.8)
        answer = await raw_exchange(f"http://127.0.0.1:{proxy}", _streamed("a"), wait=10)
        nursery.cancel_scope.cancel()
    assert (b"data: [DONE]" in answer) is notice, answer


async def test_failures_after_the_head_are_error_events_counted_as_themselves(
    fakes, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(wait_notice, "WAIT_NOTICE_AFTER_SECS", 0.2)  # (in this process: one)
    a, b = fakes.start("a", "b")
    models = fake_model_block(a, wake="sleep 0.5; exit 3")  # the wake fails
    # b's wake "succeeds" without waking it: the backend answers 503 (model asleep).
    models += fake_model_block(b, wake="sleep 0.5", alive=None)
    path = write_config(tmp_path, models, server=ON)
    # In this process: its access log is read here.
    async with llmux_running(path, workers=1) as (server, client):
        backend_failed = await raw_exchange(server.url, _streamed("b"), wait=10)
        wake_failed = await raw_exchange(server.url, _streamed("a"), wait=10)
        metrics = (await client.get("/metrics")).text
    for answer, model, code in ((wake_failed, "a", "model_unavailable"),
                                (backend_failed, "b", "model_asleep")):  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert _comments(answer)[0] == f"waiting for {model} to wake, 1st in line"
        events = [line for line in answer.decode().splitlines() if line.startswith("data: ")]
        assert len(events) == 1, answer  # the error, and no [DONE] after it
        assert json.loads(events[0][6:])["error"]["code"] == code
        assert metric_value(metrics, "llmux_requests_total", model=model, status="503") == 1
        assert metric_value(metrics, "llmux_requests_total", model=model, status="200") is None
    requests = [r.fields for r in caplog.records if getattr(r, "event", None) == "request"]
    assert sorted((r["model"], r["status"]) for r in requests) == [("a", 503), ("b", 503)]


def test_the_words_of_a_notice():
    def said(model: str = "qwen", position: int = 1, **view: object) -> str:
        defaults: dict = {"awake": False, "cold": False, "seconds": None}
        return wait_notice.notice_text(WaitView(model, position, **{**defaults, **view}))

    assert said(position=2, seconds=6.6) == "waiting for qwen to wake, 2nd in line, about 7 s"
    assert said(position=11) == "waiting for qwen to wake, 11th in line"  # nothing measured
    assert said(position=23, seconds=0.4) == "waiting for qwen to wake, 23rd in line"  # late
    assert said(cold=True, seconds=40) == "waiting for qwen to start, 1st in line, about 40 s"
    assert said(position=3, awake=True) == "waiting for a free slot on qwen, 3rd in line"
    assert said("two\nlines") == "waiting for two lines to wake, 1st in line"  # one SSE line
