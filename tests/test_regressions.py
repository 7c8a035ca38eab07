"""The six scenarios a review broke the old switcher with, end to end: real sockets, fake
backends as processes, hooks as real commands. Each promise holds now."""

from __future__ import annotations

import time
from functools import partial

import httpx
import trio

from tests.conftest import chat, fake_model_block, llmux_running, write_config


async def _model(client: httpx.AsyncClient, name: str) -> dict:
    models = (await client.get("/v1/models")).json()["data"]
    return next(m["llmux"] for m in models if m["id"] == name)


async def test_1_a_reload_mid_wake_sends_the_waiting_request_to_the_new_backend(fakes, tmp_path):
    old, new, b = fakes.start("a", "a", "b", wake_delay=0.05)
    slow = {"wake": f"sleep 0.6; {old.ctl('wake')}"}
    path = write_config(tmp_path, fake_model_block(old, **slow) + fake_model_block(b))
    async with llmux_running(path) as (server, client):
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await client.post("/v1/chat/completions", json=chat("a"))).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.3)  # it waits while the old backend's wake hook runs
            write_config(tmp_path, fake_model_block(new) + fake_model_block(b))
            assert await server.reload()
        assert answers == [200]
        assert (await _model(client, "a"))["in_flight"] == 0
        # A switch away from `a` drains it: it would hang if the count were stranded.
        with trio.fail_after(10):
            assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200
    assert new.state()["served"] == 1 and old.state()["served"] == 0
    assert old.state()["state"] == "asleep" and old.state()["rejected_while_asleep"] == 0


async def test_1_a_client_that_gives_up_across_a_reload_leaves_the_queue(fakes, tmp_path):
    old, new = fakes.start("a", "a", wake_delay=0.05)
    slow = {"wake": f"sleep 1; {old.ctl('wake')}"}
    path = write_config(
        tmp_path, fake_model_block(old, **slow), policy={"request_timeout_secs": 0.5}
    )
    async with llmux_running(path) as (server, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat("a")))
            await trio.sleep(0.3)
            write_config(
                tmp_path,
                fake_model_block(new),
                policy={"request_timeout_secs": 0.5},
            )
            assert await server.reload()
        await trio.sleep(1.8)  # the old wake ends at 1 s; a wake for nobody would follow
        assert (await _model(client, "a"))["queue_depth"] == 0
    assert new.state()["wakes"] == 0, "the new backend must not be woken for nobody"


async def test_2_an_admin_sleep_whose_hook_fails_in_one_group_stops_nothing_else(fakes, tmp_path):
    a, b, c = fakes.start("a", "b", "c", wake_delay=0.05)
    blocks = (
        '[groups.one]\nmodels = ["a"]\n[groups.two]\nmodels = ["b", "c"]\n'
        + fake_model_block(a, sleep="echo cannot >&2; exit 1", alive=None)
        + fake_model_block(b, sleep=f"sleep 1; {b.ctl('sleep')}")
        + fake_model_block(c)
    )
    admin = "0123456789abcdef0123"
    path = write_config(tmp_path, blocks, top=f'[auth]\nadmin_token = "{admin}"\n')
    async with llmux_running(path) as (_, client):
        for model in ("a", "b"):
            assert (await client.post("/v1/chat/completions", json=chat(model))).is_success
        answer = await client.post("/llmux/sleep", headers={"authorization": f"Bearer {admin}"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
        assert (await _model(client, "b"))["state"] == "asleep"
        assert (await client.post("/v1/chat/completions", json=chat("c"))).status_code == 200
        assert (await _model(client, "b"))["state"] == "asleep"
        assert (await _model(client, "a"))["state"] == "active"  # its sleep failed: it serves
    assert b.state()["state"] == "asleep" and c.state()["state"] == "awake"


async def test_3_an_alive_check_that_times_out_on_a_busy_model_keeps_it_awake(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.1)
    slow_alive = {"alive": "sleep 2", "alive_timeout_secs": 0.5, "alive_interval_secs": 0.3}
    path = write_config(tmp_path, fake_model_block(a, **slow_alive) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        await trio.sleep(0.4)  # its periodic alive check has begun (and will time out)
        streamed = b""
        async with trio.open_nursery() as nursery:

            async def switch_meanwhile() -> None:
                await trio.sleep(0.6)
                response = await client.post("/v1/chat/completions", json=chat("b"))
                assert response.status_code == 200

            nursery.start_soon(switch_meanwhile)
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=15)
            ) as response:
                async for chunk in response.aiter_bytes():
                    streamed += chunk
    assert streamed.count(b'"content"') == 15 and streamed.endswith(b"[DONE]\n\n")
    assert a.state()["slept_while_busy"] == 0 and a.state()["sleeps"] == 1


async def test_4_an_expired_idle_model_does_not_spin_while_a_switch_runs(fakes, tmp_path):
    a, c = fakes.start("a", "c", wake_delay=0.05)
    blocks = (
        '[groups.gpu]\ncapacity = 2\nmodels = ["a", "c"]\n'
        + fake_model_block(a, memory_gb=1, ttl_secs=0.2)
        + fake_model_block(c, memory_gb=1, wake=f"sleep 1.2; {c.ctl('wake')}")
    )
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        began_cpu, began = time.process_time(), time.monotonic()
        # `c` fits beside `a`: its 1.2 s wake runs while `a`'s idle time expires.
        assert (await client.post("/v1/chat/completions", json=chat("c"))).status_code == 200
        cpu, wall = time.process_time() - began_cpu, time.monotonic() - began
        await trio.sleep(0.5)
        assert (await _model(client, "a"))["state"] == "asleep"  # slept once the switch ended
    assert wall >= 1.2 and cpu / wall < 0.5, f"{cpu:.2f}s of CPU in {wall:.2f}s: a spin"


NAN_ONCE = """
import math
from llmux.policy import CallAt, FifoPolicy

class NanOnce:
    def __init__(self):
        self.calls = 0

    def decide(self, event, snapshot):
        self.calls += 1
        if self.calls == 1:
            return CallAt(math.nan)
        return FifoPolicy().decide(event, snapshot)
"""


async def test_5_a_policy_answer_of_nan_is_ignored_not_fatal(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    (tmp_path / "nan.py").write_text(NAN_ONCE)
    path = write_config(tmp_path, fake_model_block(a), policy={"name": "./nan.py:NanOnce"})
    async with llmux_running(path) as (_, client):
        # Its one decision is CallAt(nan): logged and ignored; asked again a second later, the
        # policy answers as FIFO does, and the lone request is served.
        with trio.fail_after(5):
            response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_6_a_reload_that_removes_a_model_still_to_be_preloaded_is_survived(fakes, tmp_path):
    a, b, c = fakes.start("a", "b", "c", wake_delay=0.05)
    blocks = (
        '[groups.gpu]\ncapacity = 2\nmodels = ["a", "b", "c"]\n'
        + fake_model_block(a, memory_gb=1, wake=f"sleep 1; {a.ctl('wake')}")
        + fake_model_block(b, memory_gb=1)
        + fake_model_block(c, memory_gb=1)
    )
    path = write_config(tmp_path, 'preload = ["a", "b"]\n' + blocks)
    async with llmux_running(path) as (server, client):
        await trio.sleep(0.3)  # a's preload wake runs; b is still to come
        write_config(
            tmp_path,
            '[groups.gpu]\ncapacity = 2\nmodels = ["a", "c"]\n'
            + fake_model_block(a, memory_gb=1, wake=f"sleep 1; {a.ctl('wake')}")
            + fake_model_block(c, memory_gb=1),
        )
        assert await server.reload()
        assert (await client.post("/v1/chat/completions", json=chat("c"))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        gone = await client.post("/v1/chat/completions", json=chat("b"))
        assert gone.status_code == 404
    assert b.state()["wakes"] == 0, "a model removed before its preload is not woken"


async def test_6_a_refused_connection_to_a_model_a_reload_removed_is_survived(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        write_config(tmp_path, fake_model_block(b))
        assert await server.reload()
        # What the proxy reports when a request granted to `a` before the reload then finds
        # its backend refusing the connection.
        server.app.fleet.report_unreachable("a")
        assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200
    assert a.state()["state"] == "asleep"
