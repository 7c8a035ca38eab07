"""llmux as a real process: graceful SIGTERM/SIGINT shutdown, and `llmux demo` end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import PYTHON, chat, fake_model_block, write_config


class LlmuxProcess:
    """`python -m llmux ...` in its own process group, its output collected by a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "llmux", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None and text not in "".join(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def group_is_gone(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def processes():
    started: list[LlmuxProcess] = []

    def start(*args: str, **kw) -> LlmuxProcess:
        proc = LlmuxProcess(*args, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_lets_in_flight_finish_and_answers_the_rest_503(
    fakes, processes, tmp_path, signum
):
    a, b = fakes.start("a", "b", wake_delay=0.05, token_interval=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    llmux = processes("serve", "-c", str(path), "--port", "0")
    url = llmux.wait_for("llmux listening on").strip().rsplit(" ", 1)[1]
    results: dict[str, object] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))

        async def stream_a() -> None:
            text = b""
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True, max_tokens=40)
            ) as r:
                async for chunk in r.aiter_bytes():
                    text += chunk
            results["stream"] = text.decode()

        async def queued_b() -> None:
            await trio.sleep(0.3)
            results["queued"] = await client.post("/v1/chat/completions", json=chat("b"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_a)
            nursery.start_soon(queued_b)
            await trio.sleep(0.6)
            os.kill(llmux.process.pid, signum)
            await trio.sleep(0.2)
            results["new"] = await client.post("/v1/chat/completions", json=chat("a"))
    assert results["queued"].status_code == 503
    assert results["queued"].json()["error"]["code"] == "shutting_down"
    assert results["new"].status_code == 503
    assert results["stream"].count('"content"') == 40 and results["stream"].endswith("[DONE]\n\n")
    assert await trio.to_thread.run_sync(llmux.process.wait, 10) == 0
    assert b.state()["wakes"] == 0


async def test_demo_serves_switches_and_stops_cleanly_on_ctrl_c(processes, tmp_path):
    port = _free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    demo = processes("demo", "--port", str(port), env=env)
    demo.wait_for("Press Ctrl-C")
    output = "".join(demo.lines)
    assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions" in output
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for model in ("llama", "qwen", "llama"):
            response = await client.post("/v1/chat/completions", json=chat(model, max_tokens=2))
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"].startswith(f"{model}-0")
        metrics = (await client.get("/metrics")).text
    assert 'llmux_switch_total{from="llama",result="ok",to="qwen"} 1.0' in metrics
    os.kill(demo.process.pid, signal.SIGINT)
    assert await trio.to_thread.run_sync(demo.process.wait, 15) == 0
    for _ in range(40):
        if demo.group_is_gone():
            break
        await trio.sleep(0.05)
    assert demo.group_is_gone(), "a process of the demo outlived it"
    assert list(Path(scratch).iterdir()) == [], "the demo left files behind"
