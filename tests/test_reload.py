"""Config reload (SIGHUP, --watch-config): models added, removed, changed; no request lost."""

from __future__ import annotations

import os
import signal

import httpx
import trio

from tests.conftest import PYTHON, chat, fake_model_block, llmux_running, write_config


async def _states(client: httpx.AsyncClient) -> dict[str, str]:
    return {m["id"]: m["llmux"]["state"] for m in (await client.get("/v1/models")).json()["data"]}


async def test_removed_active_model_finishes_its_stream_then_sleeps(fakes, tmp_path):
    a, b, c = fakes.start("a", "b", "c", wake_delay=0.05, token_interval=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (server, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        streamed = b""
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=20)
        ) as response:
            async for chunk in response.aiter_bytes():
                if not streamed:
                    write_config(tmp_path, fake_model_block(b) + fake_model_block(c))
                    assert await server.reload()
                    gone = await client.post("/v1/chat/completions", json=chat("a"))
                    assert gone.status_code == 404
                streamed += chunk
        assert streamed.count(b'"content"') == 20 and streamed.endswith(b"[DONE]\n\n")
        response = await client.post("/v1/chat/completions", json=chat("c"))
        assert response.status_code == 200
        assert set(await _states(client)) == {"b", "c"}
        metrics = (await client.get("/metrics")).text
    assert a.state()["sleeps"] == 1 and a.state()["slept_while_busy"] == 0
    assert c.state()["rejected_while_asleep"] == 0
    assert 'llmux_model_state{model="a"' not in metrics


async def test_queued_requests_for_a_removed_model_get_404_at_once(fakes, tmp_path):
    (a,) = fakes.start("a")
    slow = fake_model_block(a, wake=f"sleep 1.5; {a.ctl('wake')}")
    (b,) = fakes.start("b")
    path = write_config(tmp_path, slow + fake_model_block(b))
    async with llmux_running(path) as (server, client):
        async with trio.open_nursery() as nursery:
            results = []

            async def wait_for_a() -> None:
                results.append(await client.post("/v1/chat/completions", json=chat("a")))

            nursery.start_soon(wait_for_a)
            await trio.sleep(0.3)
            write_config(tmp_path, fake_model_block(b))
            began = trio.current_time()
            assert await server.reload()
        assert trio.current_time() - began < 0.5
        assert results[0].status_code == 404
        assert results[0].json()["error"]["code"] == "model_not_found"
        # a finished waking meanwhile; it is put to sleep before anything else may wake.
        response = await client.post("/v1/chat/completions", json=chat("b"))
        assert response.status_code == 200
    assert a.state()["state"] == "asleep"


async def test_invalid_new_config_is_rejected_and_the_old_one_stays(fakes, tmp_path, caplog):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        path.write_text(path.read_text() + "\nbogus_key = 1\n")
        assert not await server.reload()
        path.write_text("[models.a\n")
        assert not await server.reload()
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200
    rejected = [r for r in caplog.records if getattr(r, "event", None) == "config_rejected"]
    assert len(rejected) == 2 and "bogus_key" in rejected[0].fields["error"]


async def test_moved_backend_of_an_awake_model_is_slept_and_woken_at_its_new_port(fakes, tmp_path):
    old, new = fakes.start("a", "a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(old))
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        write_config(tmp_path, fake_model_block(new))
        assert await server.reload()
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200
    assert old.state()["state"] == "asleep" and old.state()["sleeps"] == 1
    assert new.state()["wakes"] == 1 and new.state()["rejected_while_asleep"] == 0


async def test_changed_timeouts_apply_in_place(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        write_config(tmp_path, fake_model_block(a, alive_interval_secs=77))
        assert await server.reload()
        assert server.app.fleet.models["a"].config.alive_interval_secs == 77
        assert (await _states(client))["a"] == "active"
    assert a.state()["wakes"] == 1


async def test_sighup_and_watch_config_reload_a_real_process(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    process = await trio.lowlevel.open_process(
        [PYTHON, "-m", "llmux", "serve", "-c", str(path), "--port", "0", "--watch-config"],
        stderr=-1,
    )
    try:
        url = await _read_url(process)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 404
            write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
            os.kill(process.pid, signal.SIGHUP)
            with trio.fail_after(5):
                while (
                    await client.post("/v1/chat/completions", json=chat("b"))
                ).status_code != 200:
                    await trio.sleep(0.1)
            write_config(tmp_path, fake_model_block(a))  # no signal: --watch-config notices
            with trio.fail_after(5):
                while "b" in await _states(client):
                    await trio.sleep(0.1)
    finally:
        process.terminate()
        with trio.fail_after(10):
            assert await process.wait() == 0


async def _read_url(process: trio.Process) -> str:
    buffer = b""
    with trio.fail_after(20):
        while b"llmux listening on" not in buffer:
            buffer += await process.stderr.receive_some(4096)
    line = buffer.split(b"llmux listening on ", 1)[1].split(b"\n", 1)[0]
    return line.decode().split()[0]


async def test_reload_applies_a_new_capacity_and_refuses_to_regroup(fakes, tmp_path, caplog):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    blocks = fake_model_block(a, memory_gb=40) + fake_model_block(b, memory_gb=40)

    def groups(capacity: int, gpu1: str = "") -> str:
        moved = f'[groups.gpu1]\nmodels = ["{gpu1}"]\n' if gpu1 else ""
        members = ", ".join(f'"{m}"' for m in "ab" if m != gpu1)
        return f"[groups.gpu0]\ncapacity = {capacity}\nmodels = [{members}]\n{moved}"

    path = write_config(tmp_path, groups(40) + blocks)
    async with llmux_running(path) as (server, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        await client.post("/v1/chat/completions", json=chat("b", max_tokens=1))
        assert await _states(client) == {"a": "asleep", "b": "active"}
        write_config(tmp_path, groups(80) + blocks)
        assert await server.reload()
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        assert await _states(client) == {"a": "active", "b": "active"}  # both fit now
        write_config(tmp_path, groups(80, gpu1="b") + blocks)
        assert not await server.reload()
        status = (await client.get("/llmux/status")).json()
    assert "groups were added or removed: restart llmux" in caplog.text
    assert list(status["groups"]) == ["gpu0"] and status["groups"]["gpu0"]["capacity"] == 80
    assert a.state()["sleeps"] == 1 and b.state()["sleeps"] == 0


async def test_models_are_dated_when_configured_and_keep_their_date_while_unchanged(
    fakes, tmp_path
):
    """`created` in /v1/models: when the config holding the model was loaded; a reload dates
    only the models it adds or changes (an unchanged one is the same model served the same
    way)."""
    import time

    a, b, c = fakes.start("a", "b", "c")
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    before = int(time.time())
    async with llmux_running(path) as (server, client):

        async def created() -> dict[str, int]:
            models = (await client.get("/v1/models")).json()["data"]
            return {m["id"]: m["created"] for m in models}

        first = await created()
        assert set(first) == {"a", "b"}
        assert before <= first["a"] == first["b"] <= int(time.time())
        await trio.sleep(1.1)  # `created` counts whole seconds
        changed_b = fake_model_block(b, alive=f"true; {b.ctl('alive')}")
        write_config(tmp_path, fake_model_block(a) + changed_b + fake_model_block(c))
        assert await server.reload()
        second = await created()
    assert second["a"] == first["a"], "unchanged: the date it was first configured"
    assert second["b"] == second["c"] > first["a"], "changed or added: the reload's date"
