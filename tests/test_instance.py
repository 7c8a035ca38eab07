"""One llmux per config and per port: a second one started by mistake exits 2 with one line and
harms nothing (no survivor stopped, no hook run); so does any failure to bind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmux.runtime.instance import BacklogCap, raise_backlog_cap
from tests.conftest import PYTHON, LlmuxProcess, chat, fake_model_block, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _second(config, port: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "llmux", "serve", "-c", str(config), "--port", str(port)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_llmux_on_the_same_config_harms_nothing(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    alive_marker = tmp_path / "alive-ran"
    config = write_config(
        tmp_path,
        fake_model_block(
            a,
            wake=f"sleep 2; {a.ctl('wake')}",
            alive=f"echo x >> {alive_marker}; {a.ctl('alive')}",
        ),
    )
    first = LlmuxProcess(config)
    try:
        answers: list[int] = []
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    first.url + "/v1/chat/completions", json=chat("a"), timeout=30
                ).status_code
            )
        )
        client.start()  # the first instance's wake hook runs for 2 s
        time.sleep(0.7)
        alive_runs = alive_marker.read_text().count("x") if alive_marker.exists() else 0
        second = _second(config)
        # The first's wake hook still runs, and its hooks never overlap: any alive run now is
        # the second instance's.
        after = alive_marker.read_text().count("x") if alive_marker.exists() else 0
        assert after == alive_runs, "the second instance ran an alive hook"
        assert second.returncode == 2
        line = _one_line(second)
        assert line.startswith("llmux: another llmux (pid ") and str(config) in line, line
        assert f"pid {first.proc.pid}" in line
        client.join(timeout=30)
        assert answers == [200], "the first instance's wake hook was disturbed"
        assert "hook_survivor_stopped" not in first.log
    finally:
        assert first.stop() == 0
    # The lock dies with its holder: the next start is fine.
    again = LlmuxProcess(config)
    assert again.stop() == 0


def test_a_second_llmux_on_the_same_port_exits_with_one_line(fakes, tmp_path):
    (a,) = fakes.start("a")
    port = _free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first = LlmuxProcess(write_config(one, fake_model_block(a)), "--port", str(port))
    try:
        second = _second(write_config(two, fake_model_block(a)), port)
    finally:
        first.stop()
    assert second.returncode == 2
    assert (
        _one_line(second) == f"llmux: port {port} is in use by another llmux (pid {first.proc.pid})"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "203.0.113.7", "no-such-host.invalid"])
def test_any_bind_failure_is_one_line_and_exit_2(fakes, tmp_path, host):
    (a,) = fakes.start("a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, f'host = "{host}"\n' + fake_model_block(a))
        result = _second(config, port)
    assert result.returncode == 2
    line = _one_line(result)
    if host == "127.0.0.1":
        assert line == (
            f"llmux: cannot listen on 127.0.0.1:{port}: the port is in use by another program; "
            f"`ss -ltnp 'sport = :{port}'` shows which, or listen on another one with --port"
        )
    else:
        assert line.startswith(f"llmux: cannot listen on {host}:{port}: "), line
    assert a.state()["wakes"] == 0


def _listen_queue_size(port: int) -> int:
    """The backlog the kernel gives a listening socket: `ss` shows it as Send-Q."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize("backlog", [None, 300])
def test_the_listen_queue_fits_a_burst_of_new_streams(fakes, tmp_path, backlog):
    """hypercorn's default of 100 dropped the SYNs of a burst of new streams (clients then
    waited 1-3 s to retry): llmux listens with server.listen_backlog, 2048 unless set."""
    (a,) = fakes.start("a")
    server = {"listen_backlog": backlog} if backlog else None
    llmux = LlmuxProcess(write_config(tmp_path, fake_model_block(a), server=server))
    try:
        port = int(llmux.url.rsplit(":", 1)[1])
        cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert _listen_queue_size(port) == min(backlog or 2048, cap)
    finally:
        assert llmux.stop() == 0


def test_the_kernel_cap_on_listen_queues_is_raised_never_lowered(tmp_path):
    cap = tmp_path / "somaxconn"  # stands in for /proc/sys/net/core/somaxconn
    cap.write_text("128\n")
    assert raise_backlog_cap(2048, cap) == BacklogCap(128, 2048)
    assert cap.read_text() == "2048\n"
    cap.write_text("4096\n")
    assert raise_backlog_cap(2048, cap) == BacklogCap(4096, 4096)
    assert cap.read_text() == "4096\n"
    cap.write_text("128\n")
    cap.chmod(0o444)
    if os.geteuid() != 0:  # root writes through a read-only mode
        outcome = raise_backlog_cap(2048, cap)
        assert outcome == BacklogCap(128, 128) and outcome.limits(2048)
    assert raise_backlog_cap(2048, tmp_path / "absent") == BacklogCap(None, None)
