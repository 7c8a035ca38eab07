"""Shared fixtures: fake backends as processes, configs with real hook commands, llmux in-process.

Every process a test starts is stopped by the test, by its pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from llmux.config import Config, load_config
from llmux.runtime.instance import config_digest
from llmux.runtime.state_dir import state_dir_path
from llmux.server import RunningServer, running_controller, running_server, start_instance

PYTHON = sys.executable
LLMUX = shlex.join([PYTHON, "-m", "llmux"])


@dataclass
class FakeProcess:
    name: str
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        return httpx.get(self.url + "/fake/state", timeout=5).json()

    def received(self) -> dict[str, Any]:
        """What reached this backend: {"targets": {"METHOD /path?q": n}, "recent": [...]}."""
        return httpx.get(self.url + "/fake/received", timeout=5).json()

    def ctl(self, action: str) -> str:
        return f"{LLMUX} fake-ctl {action} --port {self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LlmuxProcess:
    """`llmux serve` as a child process: its URL once it listens, and its whole log (read all
    along, so that a full pipe never blocks it). Stopped by its pid."""

    def __init__(self, config: Path, *flags: str, **popen: Any) -> None:
        import threading

        self.proc = subprocess.Popen(
            [PYTHON, "-m", "llmux", "serve", "-c", str(config), "--port", "0", *flags],
            stderr=subprocess.PIPE, text=True, **popen,
        )  # fmt: skip
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"llmux listening on (http://[^\s\"]+)", line)  # text or JSON
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("llmux did not start:\n" + "".join(self.lines))
        self._reader = threading.Thread(target=self._read_rest, daemon=True)
        self._reader.start()

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        self.lines.extend(self.proc.stderr)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal it (unless it has exited) and wait; its exit status. The log is complete."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        return code


@dataclass
class FakeFleet:
    """Starts fake backends as subprocesses and stops them all at teardown."""

    started: list[FakeProcess] = field(default_factory=list)

    def start(self, *names: str, port: int = 0, **options: Any) -> list[FakeProcess]:
        procs = []
        for name in names:
            args = [PYTHON, "-m", "llmux", "fake-backend", "--name", name, "--port", str(port)]
            for key, value in options.items():
                flag = "--" + key.replace("_", "-")
                if value is True:
                    args.append(flag)
                elif value is not False:
                    args += [flag, str(value)]
            procs.append((name, subprocess.Popen(args, stdout=subprocess.PIPE, text=True)))
        fakes = []
        for name, proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if "listening on" not in line:
                proc.kill()
                raise RuntimeError(f"fake backend {name} did not start: {line!r}")
            fake = FakeProcess(name, int(line.strip().rsplit(":", 1)[1]), proc)
            self.started.append(fake)
            fakes.append(fake)
        return fakes

    def stop_all(self) -> None:
        for fake in self.started:
            fake.stop()


@contextlib.contextmanager
def log_records(logger: str) -> Iterator[list[logging.LogRecord]]:
    """The records `logger` (and its children) emit meanwhile, whatever their level."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(logger).addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger(logger).removeHandler(handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A Ctrl-C inside trio.run reaches pytest wrapped in the test's exception group, which
    pytest counts as one failed test before it runs on: raise it bare, so that one Ctrl-C stops
    the run as it does any other."""
    try:
        return (yield)
    except BaseExceptionGroup as group:
        interrupt, _ = group.split(KeyboardInterrupt)
        if interrupt is None:
            raise
        raise KeyboardInterrupt from group


@pytest.fixture(scope="session", autouse=True)
def private_state_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every llmux a test starts (in process or as a child, which inherits the environment)
    keeps its locks, hook records and logs in one folder of this test run, not in the user's
    own state folder; at the end, the run fails if one of its llmux instances wrote there."""
    real = state_dir_path(None, Path.cwd())  # where llmux would go without the line below
    started = time.time()
    folder = tmp_path_factory.mktemp("llmux-state")
    folder.chmod(0o700)
    before = os.environ.get("RUNTIME_DIRECTORY")
    os.environ["RUNTIME_DIRECTORY"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("RUNTIME_DIRECTORY", None)
    else:
        os.environ["RUNTIME_DIRECTORY"] = before
    leaked = instances_that_wrote(real, started, tmp_path_factory.getbasetemp())
    assert not leaked, f"tests ran llmux on the user's state folder {real}: {leaked}"


def instances_that_wrote(folder: Path, since: float, configs_under: Path) -> list[str]:
    """The files of `folder` that an llmux on a config under `configs_under` locked or wrote
    since `since`. Every instance takes its config's lock (`config-DIGEST.lock`) in its state
    folder: matching the digests of this run's own configs tells its leftovers apart from
    those of an llmux someone else runs on this machine meanwhile."""
    digests = set()
    for path in configs_under.rglob("*.toml"):
        with contextlib.suppress(OSError, RuntimeError):  # a test's loop of links, say
            digests.add(config_digest(path.resolve()))
    found = []
    for entry in folder.glob("*-*.*") if folder.is_dir() else ():
        digest = entry.name.rsplit(".", 1)[0].rsplit("-", 1)[-1]
        if digest in digests and entry.stat().st_mtime >= since:
            found.append(entry.name)
    return sorted(found)


@pytest.fixture
def fakes() -> Iterator[FakeFleet]:
    fleet = FakeFleet()
    try:
        yield fleet
    finally:
        fleet.stop_all()


def model_block(name: str, port: int, **keys: Any) -> str:
    lines = [f"[models.{json.dumps(name)}]", f"port = {port}"]
    for key, value in keys.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def fake_model_block(fake: FakeProcess, **overrides: Any) -> str:
    keys: dict[str, Any] = {
        "wake": fake.ctl("wake"),
        "sleep": fake.ctl("sleep"),
        "alive": fake.ctl("alive"),
    }
    keys.update(overrides)
    keys = {k: v for k, v in keys.items() if v is not None}
    return model_block(fake.name, fake.port, **keys)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_config(
    folder: Path,
    models: str,
    *,
    policy: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    top: str = "",
) -> Path:
    parts = [top]
    for table, values in (("server", server), ("policy", policy), ("defaults", defaults)):
        if values:
            parts.append(f"[{table}]")
            parts += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    parts.append(models)
    path = folder / "config.toml"
    path.write_text("\n".join(parts) + "\n")
    return path


def ephemeral_config(path: Path) -> Config:
    """Load a config and listen on an ephemeral loopback port."""
    return load_config(path).with_listen("127.0.0.1", 0)


# LLMUX_TEST_WORKERS=2: tests that use llmux_running get a controller (in this process, so that
# they still see its switcher) with that many worker processes carrying their requests.
TEST_WORKERS = int(os.environ.get("LLMUX_TEST_WORKERS", "1"))


def one_process_only(reason: str) -> pytest.MarkDecorator:
    """For a test of what differs with workers (docs/operations/running.md): skipped with them."""
    return pytest.mark.skipif(TEST_WORKERS > 1, reason=f"with workers: {reason}")


@asynccontextmanager
async def llmux_running(
    path: Path, workers: int = TEST_WORKERS
) -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    config = ephemeral_config(path)
    if workers > 1:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, workers=workers)
        )
        serving = running_controller(config, None, start_instance(config))
    else:
        serving = running_server(config)
    async with (
        serving as server,
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
    ):
        yield server, client


async def raw_exchange(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send bytes exactly as given (no client normalises the path) and read the answer until the
    server closes or `wait` seconds pass."""
    import trio

    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.move_on_after(wait):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


def raw_post(target: str, body: bytes, headers: str = "") -> bytes:
    """One HTTP/1.1 POST with `Connection: close`, target written as is."""
    return (
        f"POST {target} HTTP/1.1\r\nhost: llmux\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{headers}\r\n"
    ).encode() + body


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def stream_all(client: httpx.AsyncClient, model: str, tokens: int) -> tuple[int, str]:
    body = b""
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat(model, stream=True, max_tokens=tokens)
    ) as response:
        async for chunk in response.aiter_bytes():
            body += chunk
    return response.status_code, body.decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Read one sample from Prometheus exposition text, parsed with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for init to reap it does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ORDER = ["a", "b", "a", "a", "b"]  # requests that force switches, streamed and not


async def interleave(path: Path, awake_now: Callable[[], set[str]]) -> None:
    """Send requests that force switches; after each, the backends' own truth must match."""
    async with llmux_running(path) as (_, client):
        for index, model in enumerate(ORDER):
            if index % 2:
                async with client.stream(
                    "POST", "/v1/chat/completions", json=chat(model, stream=True, max_tokens=5)
                ) as response:
                    body = b"".join([chunk async for chunk in response.aiter_bytes()])
                assert response.status_code == 200 and body.endswith(b"[DONE]\n\n")
            else:
                response = await client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200, response.text
            assert await trio.to_thread.run_sync(awake_now) == {model}
            status = (await client.get("/llmux/status")).json()
            assert status["active_model"] == model


def clean(fake_state: dict) -> bool:
    return all(
        fake_state.get(k, 0) == 0
        for k in ("rejected_while_asleep", "slept_while_busy", "garbage_answers")
    )


def ollama_loaded(url: str) -> set[str]:
    """The models an Ollama (or the fake one) at `url` has loaded now, without their tag."""
    models = httpx.get(url + "/api/ps").json()["models"]
    return {m["name"].removesuffix(":latest") for m in models}
