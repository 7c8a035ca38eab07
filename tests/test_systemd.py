"""systemd: the notify protocol against a real datagram socket, and the unit file lint."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from llmux.runtime.systemd import Notifier, raise_open_files_limit
from tests.conftest import PYTHON, chat, fake_model_block, write_config

ROOT = Path(__file__).parents[1]


async def test_notify_protocol_from_a_real_process(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    process = await trio.lowlevel.open_process(
        [PYTHON, "-m", "llmux", "serve", "-c", str(path), "--port", "0"], env=env, stderr=-1
    )
    messages: list[str] = []

    async def receive_until(text: str) -> None:
        with trio.fail_after(10):
            while not any(text in m for m in messages):
                await trio.lowlevel.wait_readable(listener)
                messages.append(listener.recv(4096).decode())

    try:
        await receive_until("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=idle" in ready
        url = await _read_url(process)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        await receive_until("STATUS=active: a")
        assert "STATUS=switching idle -> a" in messages
        watchdog_before = messages.count("WATCHDOG=1")
        await trio.sleep(0.5)
        while True:  # read what queued meanwhile
            try:
                messages.append(listener.recv(4096).decode())
            except BlockingIOError:
                break
        assert messages.count("WATCHDOG=1") >= watchdog_before + 3, "pings every 0.1 s"
        process.send_signal(signal.SIGTERM)
        await receive_until("STOPPING=1")
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        listener.close()


async def _read_url(process: trio.Process) -> str:
    buffer = b""
    with trio.fail_after(20):
        while b"llmux listening on" not in buffer:
            buffer += await process.stderr.receive_some(4096)
    return buffer.split(b"llmux listening on ", 1)[1].split()[0].decode()


def test_abstract_socket_names_and_watchdog_ownership():
    notifier = Notifier({"NOTIFY_SOCKET": "@llmux/notify", "WATCHDOG_USEC": "3000000"})
    assert notifier.address == "\0llmux/notify" and notifier.watchdog_interval == 1.5
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # someone else's watchdog
    assert not Notifier({}).enabled


def test_open_files_soft_limit_is_raised_to_hard():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files_limit() == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_unit_keeps_what_llmux_relies_on():
    unit = (ROOT / "deploy" / "llmux.service").read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "KillMode=mixed",
    ):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert stop > 30 + 5, "the stop timeout must outlast the drain bound (shutdown_timeout_secs)"
    assert int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1)) >= 65536
    # Documentation= names this project's README where the install steps put it.
    documentation = re.search(r"^Documentation=file://(\S+)$", unit, re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"install -Dm 644 README.md {documentation}" in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists: point it at an executable here.
    fake_binary = tmp_path / "llmux"
    fake_binary.write_text("#!/bin/sh\n")
    fake_binary.chmod(0o755)
    unit = (ROOT / "deploy" / "llmux.service").read_text()
    copy = tmp_path / "llmux.service"
    copy.write_text(unit.replace("/usr/local/bin/llmux", str(fake_binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_groups_example_vllm_unit_passes_systemd_analyze_verify(tmp_path):
    unit = (ROOT / "examples" / "groups" / "vllm@.service").read_text()
    env = tmp_path / "a.env"
    env.write_text("MODEL=m\nPORT=8001\nARGS=\n")
    copy = tmp_path / "vllm@.service"
    copy.write_text(unit.replace("/etc/llmux/vllm/%i.env", str(tmp_path / "%i.env")))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"{copy}:vllm@a.service"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
