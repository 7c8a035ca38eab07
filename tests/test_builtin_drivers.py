"""Models without hooks: `kind` (llmux drives vLLM's, SGLang's or Ollama's own API) and `cmd`
(llmux starts the server itself), end to end against fake servers that speak those APIs and
count every request that reached them asleep or a sleep that came while they were busy."""

from __future__ import annotations

import os
import re
import signal
import time
from functools import partial

import httpx
import trio

from llmux.core import start_backoff
from llmux.runtime.hook_registry import group_runs
from tests.conftest import (
    LLMUX,
    PYTHON,
    LlmuxProcess,
    chat,
    clean,
    free_port,
    interleave,
    llmux_running,
    log_records,
    metric_value,
    model_block,
    ollama_loaded,
    process_running,
    stream_all,
    write_config,
)

FAKE_SERVER = f"exec {LLMUX} fake-backend --awake --name ${{MODEL}} --port ${{PORT}}"


def fake_vllm_cmd(*extra: str) -> str:
    return " ".join([FAKE_SERVER, "--api", "vllm", "--wake-delay", "0.1", *extra])


def cmd_block(name: str, cmd: str, **keys: object) -> str:
    """A model with no port: llmux chooses one for its `cmd`."""
    block = model_block(name, 1, cmd=cmd, **keys)
    return block.replace("port = 1\n", "")


def started_pids(log: str, model: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"started the server of {model} \(pid (\d+)", log)]


async def test_kind_vllm_drives_the_sleep_mode_api_levels_1_and_2(fakes, tmp_path):
    a, b = fakes.start("a", "b", api="vllm", awake=True, wake_delay=0.1)
    config = model_block("a", a.port, kind="vllm")
    config += model_block("b", b.port, kind="vllm", sleep_level=2)
    path = write_config(tmp_path, config)

    def awake_now() -> set[str]:
        return {f.name for f in (a, b) if f.state()["state"] == "awake"}

    # Both start awake: llmux keeps a (first in config order) and puts b to sleep (level 2).
    await interleave(path, awake_now)
    for fake in (a, b):
        assert clean(fake.state()), fake.state()
    targets = b.received()["targets"]
    assert targets["POST /sleep?level=2"] == 2
    assert targets["POST /wake_up?tags=weights"] == 2  # the level-2 sequence, weights reloaded
    assert targets["POST /collective_rpc"] == 2
    assert targets["POST /wake_up?tags=kv_cache"] == 2
    a_targets = a.received()["targets"]
    assert a_targets["POST /sleep?level=1"] == 2
    assert a_targets["POST /wake_up"] == 1 and "POST /collective_rpc" not in a_targets


async def test_a_vllm_wakes_the_way_it_slept_even_after_a_reload_and_a_restart(fakes, tmp_path):
    """/is_sleeping does not say the level: llmux's own record does. A server put to sleep at
    level 2 has lost its weights, whatever sleep_level says when it is woken."""
    (a,) = fakes.start("a", api="vllm", awake=True, wake_delay=0.05)
    state = {"state_dir": "state"}  # this test's own record, whatever other tests left
    path = write_config(
        tmp_path, model_block("a", a.port, kind="vllm", sleep_level=2), server=state
    )
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        await server.app.fleet.put_to_sleep("a")
    assert a.received()["targets"]["POST /sleep?level=2"] == 1
    write_config(tmp_path, model_block("a", a.port, kind="vllm", sleep_level=1), server=state)
    async with llmux_running(path) as (server, client):  # a new llmux, with the new level
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
    assert clean(a.state()), a.state()
    assert a.received()["targets"]["POST /collective_rpc"] == 1


async def test_a_vllm_asleep_at_a_level_llmux_does_not_know_is_woken_the_level_2_way(
    fakes, tmp_path
):
    """Someone else put it to sleep: reload_weights is harmless after a level-1 sleep, and its
    absence after a level-2 sleep makes it answer garbage."""
    (a,) = fakes.start("a", api="vllm", awake=True, wake_delay=0.05)
    httpx.post(a.url + "/sleep?level=2", timeout=5)
    path = write_config(tmp_path, model_block("a", a.port, kind="vllm"), server={"state_dir": "s"})
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
    assert clean(a.state()), a.state()
    assert a.received()["targets"]["POST /collective_rpc"] == 1


async def test_kind_vllm_waits_for_a_server_still_loading(fakes, tmp_path):
    """A request for a server that does not listen yet (loading after a boot) is answered once
    it is up, within the wake timeout, instead of failing at once."""
    port = free_port()
    path = write_config(tmp_path, model_block("a", port, kind="vllm"))
    async with llmux_running(path) as (_, client):
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync,
                lambda: fakes.start("a", port=port, api="vllm", awake=False, boot_secs=1.5),
            )
            response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200, response.text
        assert time.monotonic() - started >= 1.5


async def test_kind_vllm_drains_a_stream_before_the_sleep(fakes, tmp_path):
    a, b = fakes.start("a", "b", api="vllm", wake_delay=0.1, token_interval=0.05)
    path = write_config(
        tmp_path, model_block("a", a.port, kind="vllm") + model_block("b", b.port, kind="vllm")
    )
    async with llmux_running(path) as (_, client):
        async with trio.open_nursery() as nursery:
            results: dict[str, object] = {}

            async def long_stream() -> None:
                results["a"] = await stream_all(client, "a", 30)

            nursery.start_soon(long_stream)
            while a.state()["in_flight"] == 0:
                await trio.sleep(0.02)
            response = await client.post("/v1/chat/completions", json=chat("b"))
            results["b"] = response.status_code
        status, body = results["a"]
        assert status == 200 and body.endswith("data: [DONE]\n\n") and body.count("data:") == 32
        assert results["b"] == 200
    for fake in (a, b):
        assert clean(fake.state()), fake.state()


async def test_kind_sglang_releases_and_resumes_memory(fakes, tmp_path):
    a, b = fakes.start("a", "b", api="sglang", awake=True, wake_delay=0.1)
    path = write_config(
        tmp_path, model_block("a", a.port, kind="sglang") + model_block("b", b.port, kind="sglang")
    )

    def awake_now() -> set[str]:
        return {f.name for f in (a, b) if f.state()["state"] == "awake"}

    await interleave(path, awake_now)
    for fake in (a, b):
        assert clean(fake.state()), fake.state()


async def test_kind_ollama_loads_and_unloads_models_of_one_server(fakes, tmp_path):
    (ollama,) = fakes.start("a,b", api="ollama", wake_delay=0.1)
    path = write_config(
        tmp_path,
        model_block("a", ollama.port, kind="ollama") + model_block("b", ollama.port, kind="ollama"),
    )

    await interleave(path, partial(ollama_loaded, ollama.url))
    state = ollama.state()
    assert state["co_loaded"] == 0
    for model_state in state["models"].values():
        assert clean(model_state), model_state


async def test_cmd_servers_start_on_wake_stop_on_sleep_and_at_exit(tmp_path):
    path = write_config(tmp_path, cmd_block("a", FAKE_SERVER) + cmd_block("b", FAKE_SERVER))
    pids: dict[str, list[int]] = {"a": [], "b": []}
    async with llmux_running(path) as (server, client):
        ports = {m.name: m.port for m in server.app.config.models.values()}
        assert len(set(ports.values())) == 2 and 0 not in ports.values()  # chosen, distinct
        for model in ("a", "b", "a"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
            running = {n for n in ports if server.app.fleet.servers.running(n)}
            assert running == {model}, "the other server was stopped"
            pid = server.app.fleet.servers.pid(model)
            pids[model].append(pid)
            assert os.getpgid(pid) == pid, "a server runs in a process group of its own"
        assert pids["a"][0] != pids["a"][1], "a sleep stopped it; the wake started a new one"
        assert not process_running(pids["a"][0]) and not process_running(pids["b"][0])
        log_text = server.app.fleet.servers.log_path("a").read_text()
        assert log_text.count("llmux starts: exec") >= 2
    assert not process_running(pids["a"][1]), "llmux stopped the server it started as it exited"


async def test_kind_vllm_with_cmd_starts_once_then_sleeps_and_wakes_through_the_api(tmp_path):
    path = write_config(
        tmp_path,
        cmd_block("a", fake_vllm_cmd(), kind="vllm") + cmd_block("b", fake_vllm_cmd(), kind="vllm"),
    )
    async with llmux_running(path) as (server, client):
        first: dict[str, int] = {}
        for model in ("a", "b", "a", "b"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
            pid = server.app.fleet.servers.pid(model)
            first.setdefault(model, pid)
            assert pid == first[model], "started once, then woken through its API"
        backends = {m.name: m.base_url for m in server.app.config.models.values()}
        async with httpx.AsyncClient() as plain:
            sleeping = {
                name: (await plain.get(url + "/is_sleeping")).json()["is_sleeping"]
                for name, url in backends.items()
            }
            states = {
                name: (await plain.get(url + "/fake/state")).json()
                for name, url in backends.items()
            }
        assert sleeping == {"a": True, "b": False}
        for state in states.values():
            assert clean(state), state
        assert states["a"]["sleeps"] == 2 and states["a"]["wakes"] == 1


async def test_a_cmd_server_that_dies_is_known_at_once_and_restarted_on_demand(tmp_path):
    path = write_config(
        tmp_path, cmd_block("a", FAKE_SERVER), defaults={"alive_interval_secs": 300}
    )
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        pid = server.app.fleet.servers.pid("a")
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(5):  # far less than the 300 s between alive checks
            while server.app.fleet.models["a"].state != "asleep":
                await trio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_model_dead_total", model="a") == 1
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200, response.text
        assert server.app.fleet.servers.pid("a") != pid


async def test_a_cmd_that_fails_to_start_answers_503_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(start_backoff, "FIRST_SECS", 1.0)  # tests/test_start_backoff.py
    crash = "echo 'CUDA out of memory' >&2; exit 3"
    hang = f"exec {LLMUX} fake-backend --awake --boot-secs 60 --port ${{PORT}}"
    blocks = cmd_block("crash", crash) + cmd_block("hang", hang, wake_timeout_secs=2)
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (server, client):
        response = await client.post("/v1/chat/completions", json=chat("crash"))
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "exited with code 3" in message and "CUDA out of memory" in message
        # No hook ran: the step is named for what llmux did, with no exit code of a hook's.
        assert "crash could not be woken: starting its server failed: server on port" in message
        assert "hook" not in message and "code 1" not in message
        await trio.sleep(2.1)  # the back-offs after a failed wake, and a failed start
        again = await client.post("/v1/chat/completions", json=chat("crash"))
        assert again.json()["error"]["message"].count("CUDA out of memory") == 1, "this start's"
        response = await client.post("/v1/chat/completions", json=chat("hang"))
        assert response.status_code == 503
        assert "starting its server failed: server on port" in response.json()["error"]["message"]
        assert "no answer within 2s" in response.json()["error"]["message"]
        assert not server.app.fleet.servers.running("hang"), "a server not ready in time is stopped"


def test_a_restarted_llmux_stops_the_server_a_killed_one_left(tmp_path):
    path = write_config(tmp_path, cmd_block("a", FAKE_SERVER))
    first = LlmuxProcess(path)
    try:
        assert (
            httpx.post(first.url + "/v1/chat/completions", json=chat("a"), timeout=30).status_code
            == 200
        )
        (pid,) = started_pids(first.log, "a")
        assert process_running(pid)
        first.stop(signal.SIGKILL)
        assert process_running(pid), "SIGKILL gave llmux no chance to stop its server"
    finally:
        first.stop(signal.SIGKILL)
    second = LlmuxProcess(path)
    try:
        deadline = time.monotonic() + 15
        while process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_running(pid), "the survivor was stopped at start-up"
    finally:
        assert second.stop() == 0


async def test_a_server_deaf_to_sigterm_is_killed_within_the_sleep_timeout(tmp_path):
    """Stopping a `cmd` server ends within sleep_timeout_secs: SIGKILL follows SIGTERM early
    enough, and takes every process of its group."""
    deaf = "sh -c 'trap \"\" TERM; while :; do sleep 0.1; done' & " + FAKE_SERVER
    blocks = cmd_block("a", deaf, sleep_timeout_secs=2) + cmd_block("b", FAKE_SERVER)
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        group = server.app.fleet.servers.pid("a")
        response = await client.post("/v1/chat/completions", json=chat("b"))
        assert response.status_code == 200, response.text
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_hook_failures_total", model="a", hook="sleep") is None
        assert not group_runs(group), "nothing of a's group is left"


async def test_a_health_path_that_answers_plain_text_counts_as_ready(tmp_path):
    """Ready means 200, whatever the body: here an HTML directory listing."""
    server = f"exec {PYTHON} -m http.server --bind 127.0.0.1 ${{PORT}}"
    path = write_config(tmp_path, cmd_block("web", server, health_path="/", wake_timeout_secs=10))
    async with llmux_running(path) as (app, client):
        response = await client.post("/v1/chat/completions", json=chat("web"))
        # http.server refuses POST itself (501): the wake succeeded and the request reached it.
        assert response.status_code == 501, response.text
        assert app.app.fleet.models["web"].state == "active"


async def test_a_failed_engine_step_is_named_for_what_it_is_not_a_hook(nursery, tmp_path):
    """A vLLM (no hooks) whose wake_up fails: the 503 and the log say "vLLM's wake_up", not a
    "wake hook" that "exited with code 1"."""
    import logging

    import hypercorn.trio
    from hypercorn.config import Config as HypercornConfig

    from llmux.http.asgi import answer_lifespan, send_bytes

    async def vllm_that_cannot_wake(scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        answers = {"/is_sleeping": (200, b'{"is_sleeping": true}'), "/wake_up": (500, b"no GPU")}
        status, body = answers.get(scope["path"], (200, b"{}"))
        await send_bytes(send, status, body, b"application/json")

    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    (url,) = await nursery.start(
        lambda task_status: hypercorn.trio.serve(
            vllm_that_cannot_wake, config, task_status=task_status
        )
    )
    port = int(url.rsplit(":", 1)[1])
    path = write_config(tmp_path, model_block("a", port, kind="vllm"))
    with log_records("llmux") as records:
        async with llmux_running(path) as (_, client):
            response = await client.post("/v1/chat/completions", json=chat("a"))
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert f"a could not be woken: vLLM's wake_up failed: vllm on port {port}: " in message
    assert "POST /wake_up answered 500: no GPU" in message and "hook" not in message
    lines = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any(line.startswith("wake of a: vLLM's wake_up failed: ") for line in lines), lines
    assert any("wake of a failed; putting it to sleep to clean up" in line for line in lines)
    assert not [line for line in lines if "hook" in line], lines


async def test_a_wait_for_a_server_that_does_not_listen_says_so(tmp_path, monkeypatch):
    """A `kind` model whose server is not running: the wait for it is said in the log once it
    goes on, and the 503 at its timeout says that nothing listens, not only "no answer"."""
    from llmux.runtime import builtin_driver

    monkeypatch.setattr(builtin_driver, "STILL_WAITING_SECS", 0.3)
    port = free_port()  # nothing listens there
    path = write_config(tmp_path, model_block("s", port, kind="sglang", wake_timeout_secs=1.2))
    with log_records("llmux.hooks") as records:
        async with llmux_running(path) as (_, client):
            response = await client.post("/v1/chat/completions", json=chat("s"))
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert f"no answer within 1.2s (last seen: nothing listens on port {port}" in message
    waits = [r for r in records if getattr(r, "event", None) == "still_waiting"]
    assert len(waits) == 1 and "connection refused" in waits[0].getMessage()
