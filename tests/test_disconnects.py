"""Clients that go away: out of the queue at once, switches for nobody called off, streams closed"""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.conftest import chat, fake_model_block, llmux_running, metric_value, write_config


async def _metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    return metric_value((await client.get("/metrics")).text, name, **labels)


async def _post_then_leave(url: str, model: str) -> None:
    """A client that waits for an answer until its task is cancelled, then closes its socket."""
    async with httpx.AsyncClient(base_url=url) as leaving:
        await leaving.post("/v1/chat/completions", json=chat(model))
        raise AssertionError("the request should still have been waiting")


async def _wait_metric(client: httpx.AsyncClient, value: float, name: str, **labels: str) -> None:
    with trio.fail_after(3):
        while await _metric(client, name, **labels) != value:
            await trio.sleep(0.02)


async def test_client_leaving_the_queue_is_removed_at_once(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=3.0)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_post_then_leave, server.url, "a")
            await _wait_metric(client, 1, "llmux_request_queue_depth", model="a")
            nursery.cancel_scope.cancel()  # the client goes away
        with trio.fail_after(1):
            while await _metric(client, "llmux_request_queue_depth", model="a") != 0:
                await trio.sleep(0.02)
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_requests_total", model="a", status="499") == 1


async def test_switch_for_a_departed_client_is_not_continued_past_the_drain(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.05)
    # FIFO starts the switch (a drains) while a's long request runs.
    path = write_config(
        tmp_path, fake_model_block(a) + fake_model_block(b), policy={"name": "fifo"}
    )
    async with llmux_running(path) as (server, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))

        async def long_a() -> None:
            response = await client.post("/v1/chat/completions", json=chat("a", max_tokens=30))
            assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_a)
            await trio.sleep(0.2)
            async with trio.open_nursery() as inner:
                inner.start_soon(_post_then_leave, server.url, "b")
                await _wait_metric(client, 1, "llmux_request_queue_depth", model="b")
                inner.cancel_scope.cancel()
            # a was draining for b; b's only client left, so a serves again.
            with trio.fail_after(1):
                while True:
                    states = {
                        m["id"]: m["llmux"]["state"]
                        for m in (await client.get("/v1/models")).json()["data"]
                    }
                    if states["a"] == "active":
                        break
                    await trio.sleep(0.02)
            started = trio.current_time()
            response = await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
            assert response.status_code == 200
            assert trio.current_time() - started < 1.0, (
                "a new request for a waited for the long one"
            )
    assert a.state()["sleeps"] == 0
    assert b.state()["wakes"] == 0


async def test_client_leaving_mid_stream_frees_the_slot_and_closes_upstream(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        async with (
            httpx.AsyncClient(base_url=server.url) as leaving,
            leaving.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=200)
            ) as response,
        ):
            chunks = 0
            async for _ in response.aiter_bytes():
                chunks += 1
                if chunks == 3:
                    assert await _metric(client, "llmux_model_in_flight", model="a") == 1
                    break
        with trio.fail_after(2):
            while await _metric(client, "llmux_model_in_flight", model="a") != 0:
                await trio.sleep(0.02)
        with trio.fail_after(2):
            while (await trio.to_thread.run_sync(a.state))["in_flight"] != 0:
                await trio.sleep(0.05)


async def test_backend_dying_mid_stream_truncates_the_answer_and_llmux_serves_on(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=100)
            ) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if received.count(b"data:") == 3:
                        await trio.to_thread.run_sync(a.process.kill)
        assert b"[DONE]" not in received
        assert await _metric(client, "llmux_model_in_flight", model="a") == 0
        assert await _metric(client, "llmux_requests_total", model="a", status="502") == 1
        response = await client.post("/v1/chat/completions", json=chat("b"))
        assert response.status_code == 200
