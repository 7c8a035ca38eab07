"""The hook runner: real `sh -c` subprocesses, their environment, output capture and timeouts."""

from __future__ import annotations

import os
import signal
import time

import trio

from llmux.runtime.hook_registry import HookRegistry
from llmux.runtime.hooks import OUTPUT_TAIL_BYTES, run_hook
from llmux.runtime.state_dir import open_state_dir
from tests.conftest import process_running


async def _run(command: str, tmp_path, timeout: float = 10.0, **kw):
    return await run_hook(
        "wake", command, model="m1", port=8123, cwd=tmp_path, timeout=timeout, grace=1.0, **kw
    )


async def test_environment_has_llmux_variables_and_no_notify_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("USER_THING", "kept")
    result = await _run("env", tmp_path, extra_env={"LLMUX_FROM": "m0", "LLMUX_TO": "m1"})
    env = dict(line.split("=", 1) for line in result.stdout_tail.splitlines() if "=" in line)
    assert result.ok
    assert env["LLMUX_MODEL"] == "m1"
    assert env["LLMUX_PORT"] == "8123"
    assert env["LLMUX_HOOK"] == "wake"
    assert env["LLMUX_FROM"] == "m0" and env["LLMUX_TO"] == "m1"
    assert env["USER_THING"] == "kept"
    assert "NOTIFY_SOCKET" not in env


async def test_runs_in_given_folder_so_relative_scripts_work(tmp_path):
    script = tmp_path / "wake.sh"
    script.write_text("#!/bin/sh\necho from-script\n")
    script.chmod(0o755)
    result = await _run("./wake.sh", tmp_path)
    assert result.ok and result.stdout_tail.strip() == "from-script"


async def test_exit_code_and_stderr_are_reported(tmp_path):
    result = await _run("echo line1 >&2; echo line2 >&2; exit 7", tmp_path)
    assert not result.ok
    assert result.exit_code == 7 and not result.timed_out
    assert "line1" in result.describe_failure() and "code 7" in result.describe_failure()


async def test_background_child_holding_output_does_not_block(tmp_path):
    """A wake hook that starts a server with `&` is done when its shell exits."""
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    result = await _run(f"sleep 30 & echo $! > {pidfile}; echo started", tmp_path)
    try:
        assert result.ok
        assert time.monotonic() - started < 5
        assert "started" in result.stdout_tail
        assert process_running(int(pidfile.read_text())), (
            "the backgrounded server must keep running"
        )
    finally:
        os.kill(int(pidfile.read_text()), 9)


async def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result = await _run(f"sleep 60 & echo $! > {pidfile}; sleep 60", tmp_path, timeout=0.5)
    assert result.timed_out and not result.ok and result.exit_code is None
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    for _ in range(50):
        if not process_running(child):
            break
        await trio.sleep(0.05)
    assert not process_running(child), "a hook's child outlived the hook's timeout"


async def test_sigterm_ignoring_hook_is_killed_after_grace(tmp_path):
    started = time.monotonic()
    result = await _run("trap '' TERM; sleep 60", tmp_path, timeout=0.3)
    assert result.timed_out
    assert time.monotonic() - started < 4


async def test_cancellation_stops_the_hook(tmp_path):
    pidfile = tmp_path / "hook.pid"
    with trio.move_on_after(0.5):
        await _run(f"echo $$ > {pidfile}; sleep 60", tmp_path, timeout=30)
    assert not process_running(int(pidfile.read_text()))


async def test_output_capture_is_bounded(tmp_path):
    result = await _run("head -c 500000 /dev/zero | tr '\\0' x; echo END", tmp_path)
    assert result.ok
    assert len(result.stdout_tail) <= OUTPUT_TAIL_BYTES
    assert result.stdout_tail.endswith("END\n")


async def test_hook_that_cannot_start_is_a_failure_not_a_crash(tmp_path):
    result = await _run("true", tmp_path / "vanished")
    assert not result.ok and result.exit_code == 127
    assert "cannot start hook" in result.describe_failure()


async def test_hooks_are_told_their_timeout_and_the_state_folder(fakes, tmp_path):
    """Scripts follow the config's timeout and keep pid files in llmux's private folder."""
    from tests.conftest import chat, fake_model_block, llmux_running, write_config

    (a,) = fakes.start("a", wake_delay=0.05)
    seen = tmp_path / "seen.env"
    wake = f"env > {seen}; {a.ctl('wake')}"
    path = write_config(tmp_path, fake_model_block(a, wake=wake, wake_timeout_secs=42.5))
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert env["LLMUX_TIMEOUT_SECS"] == "42.5"
    assert env["LLMUX_STATE_DIR"] == os.environ["RUNTIME_DIRECTORY"]
    assert (os.stat(env["LLMUX_STATE_DIR"]).st_mode & 0o777) == 0o700


async def test_a_server_a_hook_leaves_running_writes_into_the_models_hook_log(tmp_path, caplog):
    """Not into a deleted temporary file that grows unseen: into `hook-NAME.out` in the state
    folder, where it can be read; llmux says so, and does not nag a hook that redirects."""
    state = open_state_dir(tmp_path / "state")
    registry = HookRegistry(state, tmp_path / "config.toml")
    pidfile = tmp_path / "bg.pid"

    def warnings() -> list[str]:
        held = [r for r in caplog.records if getattr(r, "event", None) == "hook_output_held"]
        return [r.getMessage() for r in held]

    chatty = "sh -c 'while :; do echo tick; sleep 0.05; done'"
    result = await _run(
        f"{chatty} & echo $! > {pidfile}; echo started", tmp_path, registry=registry
    )
    server = int(pidfile.read_text())
    group = os.getpgid(server)
    try:
        assert result.ok and "started" in result.stdout_tail
        hook_log = state.path / "hook-m1.out"
        assert os.path.samefile(f"/proc/{server}/fd/1", hook_log)
        await trio.sleep(0.2)
        assert hook_log.read_text().count("tick") > 1
        assert len(warnings()) == 1 and str(hook_log) in warnings()[0]
        redirected = "sleep 30 >/dev/null 2>&1 & echo $! >"
        assert (await _run(f"{redirected} {pidfile}", tmp_path, registry=registry)).ok
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert len(warnings()) == 1
    finally:
        os.killpg(group, signal.SIGKILL)
        state.close()
