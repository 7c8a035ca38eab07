"""A reload that changes how llmux starts a model's server, or puts it to sleep, takes effect
whatever the model is doing then: the matrix of (port, cmd, kind, sleep_level changed) x (the
model asleep, awake, waking at the reload), through llmux with `cmd` servers that are fake vLLMs
started as subprocesses (they lose their weights at a level-2 sleep, as vLLM does).

After each reload: the new config serves, no answer comes from discarded weights, no server of
the old config survives, and the fakes never show two servers holding memory at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

from llmux.core.states import ModelState
from tests.conftest import (
    LLMUX,
    chat,
    clean,
    free_port,
    llmux_running,
    model_block,
    process_running,
    write_config,
)

WAKE_DELAY = 0.2  # long enough to reload while a wake is under way
# A broken wake fails in seconds, not in the default ten minutes.
DEFAULTS = {"wake_timeout_secs": 10, "first_byte_timeout_secs": 5}


def fake_vllm(name: str) -> str:
    """A fake vLLM that llmux starts awake; `name` tells which command line answered."""
    return (
        f"exec {LLMUX} fake-backend --awake --api vllm --name {name} --port ${{PORT}} "
        f"--wake-delay {WAKE_DELAY} --sleep-delay 0.05 --token-interval 0.001"
    )


OLD = {"kind": "vllm", "cmd": fake_vllm("a"), "sleep_level": 2}


def changed(change: str, port: int, other_port: int) -> tuple[int, dict[str, Any], str]:
    """The new config's port and keys, and the name its server answers with."""
    if change == "port":
        return other_port, OLD, "a"
    if change == "cmd":
        return port, {**OLD, "cmd": fake_vllm("a-new")}, "a-new"
    if change == "kind":
        return port, {"cmd": OLD["cmd"]}, "a"  # the same command, now a plain server
    assert change == "sleep_level"
    return port, {**OLD, "sleep_level": 1}, "a"


@dataclass
class Watch:
    """The fakes' own truth, polled all along: two servers holding memory at once (not asleep),
    or a request answered asleep or from discarded weights (the counters of `clean`)."""

    ports: list[int]
    trouble: list[str] = field(default_factory=list)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                states = {}
                for port in self.ports:
                    try:
                        response = await http.get(f"http://127.0.0.1:{port}/fake/state")
                    except httpx.HTTPError:
                        continue  # nothing listens there now
                    states[port] = response.json()
                holding = [f"{s['name']} {s['state']}" for s in states.values()]
                if sum(s["state"] != "asleep" for s in states.values()) > 1:
                    self.trouble.append(f"two servers hold memory: {holding}")
                self.trouble += [
                    f"{s['name']} counted {s}" for s in states.values() if not clean(s)
                ]
                await trio.sleep(0.02)


async def answer(client: httpx.AsyncClient, model: str) -> str:
    """The name of the fake server that answered a chat for `model`."""
    response = await client.post("/v1/chat/completions", json=chat(model, max_tokens=2))
    assert response.status_code == 200, response.text
    return response.json()["system_fingerprint"]


def started_pids(caplog: pytest.LogCaptureFixture, model: str) -> list[int]:
    return [
        record.fields["pid"]
        for record in caplog.records
        if getattr(record, "event", None) == "server_started" and record.fields["model"] == model
    ]


async def until_gone(pid: int) -> None:
    with trio.fail_after(5):
        while process_running(pid):
            await trio.sleep(0.02)


@pytest.mark.parametrize("state", ["asleep", "awake", "waking"])
@pytest.mark.parametrize("change", ["port", "cmd", "kind", "sleep_level"])
async def test_a_reload_of_a_started_server_takes_effect(change, state, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llmux.servers")
    port, other_port, b_port = free_port(), free_port(), free_port()
    new_port, new_keys, new_name = changed(change, port, other_port)
    b = model_block("b", b_port, kind="vllm", cmd=fake_vllm("b"))

    def config(a_port: int, keys: dict[str, Any]) -> None:
        write_config(tmp_path, model_block("a", a_port, **keys) + b, defaults=DEFAULTS)

    config(port, OLD)
    watch = Watch([port, other_port, b_port])
    answers: list[str] = []
    async with llmux_running(tmp_path / "config.toml") as (server, client):
        fleet = server.app.fleet

        async def ask_a() -> None:
            answers.append(await answer(client, "a"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            assert await answer(client, "a") == "a"
            (first_pid,) = started_pids(caplog, "a")
            if state != "awake":
                await fleet.put_to_sleep("a")  # at level 2: its weights are gone
            config(new_port, new_keys)
            if state == "waking":
                nursery.start_soon(ask_a)
                with trio.fail_after(5):
                    while fleet.models["a"].state is not ModelState.WAKING:
                        await trio.sleep(0.005)
            assert await server.reload()
            if state == "awake" or (state == "asleep" and change != "sleep_level"):
                # Retired, or asleep and never to be woken as it runs: stopped at once, with no
                # request needed to free its memory.
                await until_gone(first_pid)
            await ask_a()
            # The new server shares its group: b takes its place, then it takes b's.
            assert await answer(client, "b") == "b"
            await ask_a()
            nursery.cancel_scope.cancel()
        assert answers == [new_name] * len(answers)
        async with httpx.AsyncClient() as http:
            new_state = (await http.get(f"http://127.0.0.1:{new_port}/fake/state")).json()
        assert new_state["name"] == new_name and new_state["state"] == "awake"
        *old_pids, current = started_pids(caplog, "a")
        assert fleet.servers.pid("a") == current
        assert [pid for pid in old_pids if process_running(pid)] == [], "an old server survives"
    assert watch.trouble == []


@pytest.mark.parametrize("state", ["asleep", "awake"])
async def test_the_server_of_a_removed_model_is_stopped(state, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llmux.servers")
    a = model_block("a", free_port(), kind="vllm", cmd=fake_vllm("a"))
    b = model_block("b", free_port(), kind="vllm", cmd=fake_vllm("b"))
    path = write_config(tmp_path, a + b, defaults=DEFAULTS)
    async with llmux_running(path) as (server, client):
        assert await answer(client, "a") == "a"
        if state == "asleep":
            await server.app.fleet.put_to_sleep("a")
        (pid,) = started_pids(caplog, "a")
        write_config(tmp_path, b, defaults=DEFAULTS)
        assert await server.reload()
        await until_gone(pid)
        assert await answer(client, "b") == "b"
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 404


async def test_a_server_whose_sleep_a_reload_overtook_is_stopped_once_it_sleeps(tmp_path, caplog):
    """A reload that moves a model while its level-1 sleep runs retires that record; once the
    sleep ends and the record is done with, the old server (holding its weights in host RAM)
    is stopped at once, not left until the model's next wake."""
    caplog.set_level(logging.INFO, logger="llmux.servers")
    port, new_port, b_port = free_port(), free_port(), free_port()
    slow = fake_vllm("a").replace("--sleep-delay 0.05", "--sleep-delay 1.0")
    b = model_block("b", b_port, kind="vllm", cmd=fake_vllm("b"))

    def config(a_port: int) -> None:
        a = model_block("a", a_port, kind="vllm", cmd=slow, sleep_level=1)
        write_config(tmp_path, a + b, defaults=DEFAULTS)

    config(port)
    async with llmux_running(tmp_path / "config.toml") as (server, client):
        fleet = server.app.fleet
        assert await answer(client, "a") == "a"
        (pid,) = started_pids(caplog, "a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, client, "b")  # a is put to sleep for b: 1 s
            with trio.fail_after(5):
                while fleet.models["a"].state is not ModelState.SLEEPING:
                    await trio.sleep(0.005)
            config(new_port)
            assert await server.reload()
        await until_gone(pid)  # no request for a needed
