"""Crash and restart: hooks a killed llmux left running are stopped, then the backends' real
state is adopted. And a graceful stop with many open streams."""

from __future__ import annotations

import signal
import subprocess

import httpx
import trio

from llmux.runtime.hook_registry import HookRegistry
from llmux.runtime.state_dir import open_state_dir
from tests.conftest import LlmuxProcess, chat, fake_model_block, process_running, write_config


async def test_registry_stops_recorded_groups_but_not_recycled_ids(tmp_path):
    survivor = subprocess.Popen(["sleep", "60"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state = open_state_dir(tmp_path / "state")
        crashed = HookRegistry(state, tmp_path / "config.toml")
        crashed.add(survivor.pid)
        crashed.add(stranger.pid)
        # The stranger's id looks recycled: its recorded start time is not its own.
        text = crashed.path.read_text().replace(f"{stranger.pid} ", f"{stranger.pid} 1")
        crashed.path.write_text(text)
        restarted = HookRegistry(state, tmp_path / "config.toml")
        assert await restarted.stop_survivors() == [survivor.pid]
        assert survivor.wait(timeout=5) == -signal.SIGTERM
        assert stranger.poll() is None
        assert not restarted.path.exists()  # nothing left to stop: no record
    finally:
        for proc in (survivor, stranger):
            proc.kill()
            proc.wait()


async def test_sigkill_mid_switch_then_restart_reconciles(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    pidfile = tmp_path / "wake-b.pid"
    blocks = fake_model_block(a) + fake_model_block(
        b, wake=f"echo $$ > {pidfile}; sleep 30; {b.ctl('wake')}"
    )
    path = write_config(tmp_path, blocks, server={"state_dir": str(tmp_path / "state")})
    first = await trio.to_thread.run_sync(LlmuxProcess, path)
    second = None
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
            assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.post("/v1/chat/completions", json=chat("b")))
                with trio.fail_after(10):
                    while not pidfile.exists():
                        await trio.sleep(0.05)
                first.proc.kill()  # mid-switch: a is asleep, b's wake hook is running
                nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(first.proc.wait)
        hook_pid = int(pidfile.read_text())
        assert process_running(hook_pid), "the hook survived the crash (its own process group)"

        second = await trio.to_thread.run_sync(LlmuxProcess, path)
        assert not process_running(hook_pid), "the restarted llmux stopped the surviving hook"
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
            status = (await client.get("/llmux/status")).json()
            awake = {f.name for f in (a, b) if f.state()["state"] == "awake"}
            believed = {n for n, m in status["models"].items() if m["state"] == "active"}
            assert awake == believed and len(awake) <= 1
            assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop(signal.SIGKILL)


async def test_sigterm_with_100_open_streams(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=0.02)
    path = write_config(tmp_path, fake_model_block(a), server={"shutdown_timeout_secs": 20})
    llmux = await trio.to_thread.run_sync(LlmuxProcess, path)
    try:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=llmux.url, timeout=30, limits=limits) as client:
            await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
            complete = 0
            started = trio.Event()
            opened = 0

            async def stream() -> None:
                nonlocal complete, opened
                body = b""
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=100)
                ) as response:
                    opened += 1
                    if opened == 100:
                        started.set()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                if body.count(b'"content"') == 100 and body.endswith(b"[DONE]\n\n"):
                    complete += 1

            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(stream)
                with trio.fail_after(20):
                    await started.wait()
                llmux.proc.send_signal(signal.SIGTERM)
                await trio.sleep(0.2)
                refused = await client.post("/v1/chat/completions", json=chat("a"))
                assert refused.status_code == 503
            assert complete == 100
        assert await trio.to_thread.run_sync(llmux.proc.wait) == 0
    finally:
        llmux.stop(signal.SIGKILL)
