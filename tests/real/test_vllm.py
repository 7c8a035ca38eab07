"""llmux against real vLLM servers (CPU build, dev mode), driven by the examples/ hooks, by
the built-in `kind = "vllm"` driver (with and without `cmd`), and by examples/vllm-cpu's config
files run as written, through the official OpenAI SDK.
Opt-in: `bash tests/real/prepare.sh`, then `python -m pytest -m real -s`.

Checks, after every switch, that exactly the model llmux calls active is awake according to
vLLM's own /is_sleeping; that no request hung (every one answered within a bound); that the
drain held (a long stream finished whole before its server was put to sleep); and prints the
switch times llmux measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]
VENV_PYTHON = ROOT / ".real-venv" / "bin" / "python"
MODEL = ROOT / ".real-models" / "tiny"
MODEL2 = ROOT / ".real-models" / "tiny2"  # other random weights
EXAMPLES = ROOT / "examples"
ANSWER_BOUND_SECS = 120  # no request may take longer: a request sent to a sleeping vLLM hangs
# examples/vllm-cpu's models, and the local ones a test runs in their place.
CPU_EXAMPLE_MODELS = {"Qwen/Qwen2.5-0.5B-Instruct": MODEL, "Qwen/Qwen2.5-1.5B-Instruct": MODEL2}

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        not VENV_PYTHON.exists()
        or not all((model / "config.json").exists() for model in (MODEL, MODEL2)),
        reason="real backends not prepared: run `bash tests/real/prepare.sh` (vLLM CPU, GBs)",
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(name: str, port: int) -> list[str]:
    return [
        str(VENV_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name,
        "--dtype", "float32", "--max-model-len", "512",
    ]  # fmt: skip


def vllm_env(core: int) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": str(core),  # one core each, or both pin the same
    }


def wait_healthy(port: int, within: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server on {port} exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"server on {port} not healthy within {within}s")


def session_members(session: int) -> list[int]:
    """Live processes of a session (vLLM's API server and the engine processes it spawned)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def sleeping(port: int) -> bool:
    """Whether the server holds no model awake: asleep, or (a `cmd` server) not started yet."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/is_sleeping", timeout=10)
    except httpx.ConnectError:
        return True
    return answer.json()["is_sleeping"]


class Llmux:
    """`llmux serve` as a process, with JSON logs kept for the figures."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        args = ["serve", "-c", str(config), "--port", "0", "--log-format", "json"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmux", *args],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.events: list[dict] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                self.events.append(event)
                if event["message"].startswith("llmux listening on"):
                    self.url = event["message"].rsplit(" ", 1)[1]
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        assert ready.wait(300), "llmux did not start"

    def status(self) -> dict:
        return httpx.get(self.url + "/llmux/status", timeout=10).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def switch_figures(llmux: Llmux) -> list[str]:
    lines = []
    for event in llmux.events:
        if event.get("event") == "model_activated" and "switch_seconds" in event:
            lines.append(
                f"{event['from']} -> {event['to']}: switch {event['switch_seconds']:.2f} s "
                f"(hooks {event['cost_seconds']:.2f} s, drain {event['drain_seconds']:.2f} s)"
            )
    return lines


def chat(
    client, model: str, stream: bool, tokens: int = 16, streaming: threading.Event | None = None
) -> str:
    import openai

    messages = [{"role": "user", "content": "hello world"}]
    extra = {"ignore_eos": True}  # random weights: make every answer exactly `tokens` long
    try:
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=messages, max_tokens=tokens, stream=True, extra_body=extra
            )
            finish = None
            for chunk in chunks:
                if streaming is not None:
                    streaming.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return finish or "cut"
        answer = client.chat.completions.create(
            model=model, messages=messages, max_tokens=tokens, extra_body=extra
        )
        return answer.choices[0].finish_reason
    except openai.APITimeoutError:
        return "hung"


@pytest.fixture(scope="module")
def two_vllm_servers():
    ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    logs = {name: open(ROOT / ".real-models" / f"{name}.log", "w") for name in ports}  # noqa: SIM115
    servers = {
        name: subprocess.Popen(
            vllm_command(name, port),
            env=vllm_env(index),
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for index, (name, port) in enumerate(ports.items())
    }
    try:
        for name, port in ports.items():
            wait_healthy(port, 400, servers[name])
        yield ports
    finally:
        for server in servers.values():
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers.values():
            server.wait(60)
        for log in logs.values():
            log.close()


def exercise_sleep_mode(
    llmux: Llmux, models: tuple[str, str] = ("tiny-a", "tiny-b"), drain: bool = True
) -> list[str]:
    """Switch back and forth (streamed and not), then (`drain`) drain a long stream before a
    sleep; after every step exactly the model llmux calls active is awake by vLLM's own
    /is_sleeping. Returns how long each request took, as the client saw it."""
    import openai

    first, second = models
    ports = {name: model["port"] for name, model in llmux.status()["models"].items()}
    client = openai.OpenAI(
        base_url=llmux.url + "/v1", api_key="unused", timeout=ANSWER_BOUND_SECS, max_retries=0
    )
    plan = [(first, False), (second, False), (first, True), (second, True)]
    plan += [(second, False), (first, False)]
    timings = []
    for model, stream in plan:
        began = time.monotonic()
        assert chat(client, model, stream) == "length", f"{model} did not answer in full"
        timings.append(
            f"{model} {'streamed' if stream else 'whole'}: {time.monotonic() - began:.2f} s"
        )
        assert llmux.status()["active_model"] == model
        assert {name: sleeping(port) for name, port in ports.items()} == {
            name: name != model for name in ports
        }
    if not drain:
        return timings

    # Drain: a long stream on the first, then a request for the second. vLLM's sleep aborts
    # what is in flight, so the stream ends whole only if llmux drained before sleeping it.
    results: dict[str, str] = {}
    streaming = threading.Event()
    long_stream = threading.Thread(
        target=lambda: results.__setitem__(
            first, chat(client, first, True, tokens=480, streaming=streaming)
        )
    )
    long_stream.start()
    assert streaming.wait(ANSWER_BOUND_SECS)
    results[second] = chat(client, second, False)
    long_stream.join(ANSWER_BOUND_SECS)
    assert results == {first: "length", second: "length"}
    assert (sleeping(ports[first]), sleeping(ports[second])) == (True, False)
    last = [e for e in llmux.events if e.get("event") == "model_activated"][-1]
    assert last["to"] == second and last["drain_seconds"] > 0, "the stream was not drained"
    return timings


def test_kind_vllm_with_cmd_starts_each_server_once_then_sleeps_it(tmp_path):
    """No scripts: llmux starts each vLLM itself on a port it chooses, one at a time (the first
    start is the wake), and from then on sleeps and wakes it through its API."""
    blocks = ""
    for index, name in enumerate(("tiny-a", "tiny-b")):
        env = f"HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND={index}"
        command = " ".join(vllm_command(name, 0)).replace("--port 0", "--port ${PORT}")
        level = "sleep_level = 2\n" if name == "tiny-b" else ""
        blocks += f'[models.{name}]\nkind = "vllm"\n{level}cmd = "{env} exec {command}"\n'
    path = tmp_path / "config.toml"
    # fifo: switch while the long stream runs, so that the drain is exercised. (cost_aware would
    # rightly let the stream finish first: the first switches include cold starts of tens of
    # seconds, which its switch-cost estimate remembers.)
    path.write_text(
        '[policy]\nname = "fifo"\nrequest_timeout_secs = 600\n'
        "[defaults]\nwake_timeout_secs = 500\n" + blocks
    )
    llmux = Llmux(path)
    try:
        exercise_sleep_mode(llmux)
        started = [e for e in llmux.events if e.get("event") == "server_started"]
        assert sorted(e["model"] for e in started) == ["tiny-a", "tiny-b"], "each started once"
        print("\nkind = vllm with cmd (vLLM CPU build, tiny model):")
        print("\n".join(switch_figures(llmux)))
    finally:
        assert llmux.stop() == 0
    for event in started:
        assert not session_members(event["pid"]), "llmux stopped the servers it started"


@pytest.mark.parametrize("driver", ["hooks", "kind"])
def test_sleep_mode_levels_1_and_2_through_llmux(two_vllm_servers, tmp_path, driver):
    """The same servers, put to sleep and woken by the example hooks or by `kind = "vllm"`."""
    folder = tmp_path / "vllm"
    shutil.copytree(EXAMPLES / "vllm", folder)
    a, b = two_vllm_servers["tiny-a"], two_vllm_servers["tiny-b"]
    for port in (a, b):  # both awake at the start, as after a boot
        httpx.post(f"http://127.0.0.1:{port}/wake_up", timeout=60).raise_for_status()
    if driver == "hooks":
        models = (
            f'[models.tiny-a]\nport = {a}\nwake = "./wake.sh"\nsleep = "./sleep.sh"\n'
            'alive = "./alive.sh"\n'
            f'[models.tiny-b]\nport = {b}\nwake = "./wake.sh 2"\nsleep = "./sleep.sh 2"\n'
            'alive = "./alive.sh"\n'
        )
    else:
        models = (
            f'[models.tiny-a]\nport = {a}\nkind = "vllm"\n'
            f'[models.tiny-b]\nport = {b}\nkind = "vllm"\nsleep_level = 2\n'
        )
    (folder / "config.toml").write_text(
        '[policy]\nname = "fifo"\nrequest_timeout_secs = 120\n'  # fifo: see the cmd test
        "[defaults]\nwake_timeout_secs = 120\n" + models
    )
    llmux = Llmux(folder / "config.toml")
    try:
        # Both servers were awake: llmux kept the first and put the other to sleep (its alive
        # checks at start-up run while it already listens).
        deadline = time.monotonic() + 60
        settled = {"tiny-a": "active", "tiny-b": "asleep"}
        while time.monotonic() < deadline:
            if {n: m["state"] for n, m in llmux.status()["models"].items()} == settled:
                break
            time.sleep(0.2)
        assert llmux.status()["active_model"] == "tiny-a"
        assert (sleeping(a), sleeping(b)) == (False, True)
        exercise_sleep_mode(llmux)
        print(f"\nsleep-mode switches with {driver} (vLLM CPU build, tiny model):")
        print("\n".join(switch_figures(llmux)))
    finally:
        assert llmux.stop() == 0


def test_cold_start_hooks_with_vllm(tmp_path):
    """llama-swap style: each switch stops one vLLM process and starts another."""
    import openai

    folder = tmp_path / "cold"
    shutil.copytree(EXAMPLES / "llama.cpp", folder)
    state = tmp_path / "state"
    blocks = ""  # the default timeouts must suit cold starts of tens of seconds
    ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    for index, (name, port) in enumerate(ports.items()):
        command = " ".join(vllm_command(name, port))
        env = (
            f"LLMUX_STATE_DIR={state} HF_HUB_OFFLINE=1 "
            f"VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND={index} SERVER_CMD='{command}'"
        )
        blocks += (
            f'[models.{name}]\nport = {port}\nwake = "{env} ./start.sh"\n'
            f'sleep = "LLMUX_STATE_DIR={state} ./stop.sh"\n'
            f'alive = "LLMUX_STATE_DIR={state} ./alive.sh"\n'
        )
    (folder / "config.toml").write_text(blocks)
    llmux = Llmux(folder / "config.toml")
    try:
        client = openai.OpenAI(
            base_url=llmux.url + "/v1", api_key="unused", timeout=500, max_retries=0
        )
        sessions: dict[str, int] = {}
        for model in ("tiny-a", "tiny-b", "tiny-a"):
            assert chat(client, model, stream=model == "tiny-b") == "length"
            running = {
                name for name, port in ports.items()
                if (state / f"llama-{port}.pid").exists()
            }  # fmt: skip
            assert running == {model}, "the other server must have been stopped"
            for name, session in sessions.items():
                if name != model:
                    assert not session_members(session), f"{name} left processes behind"
            sessions[model] = int((state / f"llama-{ports[model]}.pid").read_text())
        print("\ncold-start switches (vLLM CPU build, process start/stop hooks):")
        print("\n".join(switch_figures(llmux)))
    finally:
        assert llmux.stop() == 0
        for pidfile in state.glob("*.pid"):
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)


def session_resident_gib(session: int) -> float:
    """The resident memory of a session's live processes together, in GiB."""
    total = 0
    for pid in session_members(session):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_cpu_example(tmp_path: Path, config_name: str) -> Llmux:
    """examples/vllm-cpu's config file as written, but for the model paths, run by llmux from
    an environment whose `python3` is the real-backend virtualenv's, as the example asks."""
    folder = tmp_path / "vllm-cpu"
    shutil.copytree(EXAMPLES / "vllm-cpu", folder)
    config = folder / config_name
    text = config.read_text()
    for name, model in CPU_EXAMPLE_MODELS.items():
        assert text.count(f"--model {name} ") == 1, f"{config_name} runs {name} once"
        text = text.replace(f"--model {name} ", f"--model {model} ")
    config.write_text(text)
    path = f"{VENV_PYTHON.parent}{os.pathsep}{os.environ['PATH']}"
    return Llmux(config, env={**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"})


def servers_started(llmux: Llmux) -> list[tuple[str, int]]:
    """The servers llmux started, in order, as (model, pid); the pid also names its session."""
    return [(e["model"], e["pid"]) for e in llmux.events if e.get("event") == "server_started"]


def test_cpu_example_cold_starts_one_server_at_a_time(tmp_path):
    """examples/vllm-cpu/config.toml: every switch stops the active server (all its processes)
    and starts the other, so only one server's memory is held at once."""
    import openai

    llmux = run_cpu_example(tmp_path, "config.toml")
    first, second = CPU_EXAMPLE_MODELS
    timings, held = [], []
    try:
        client = openai.OpenAI(
            base_url=llmux.url + "/v1", api_key="unused", timeout=500, max_retries=0
        )
        for model, stream in [(first, False), (second, False), (first, True), (second, True)]:
            began = time.monotonic()
            assert chat(client, model, stream) == "length", f"{model} did not answer in full"
            timings.append(f"{model}: {time.monotonic() - began:.2f} s")
            assert llmux.status()["active_model"] == model
            *stopped, (latest_model, latest) = servers_started(llmux)
            assert latest_model == model and session_members(latest)
            for name, session in stopped:
                assert not session_members(session), f"{name}'s server left processes behind"
            held.append(session_resident_gib(latest))
        assert [name for name, _ in servers_started(llmux)] == [first, second] * 2
        print("\nexamples/vllm-cpu/config.toml (cmd without kind; tiny models):")
        print("\n".join(switch_figures(llmux)))
        print("client-side, request that caused each switch:", "; ".join(timings))
        print(f"resident memory of the one server running: {max(held):.2f} GiB at most")
    finally:
        assert llmux.stop() == 0
    for name, session in servers_started(llmux):
        assert not session_members(session), f"{name}'s server outlived llmux"


def test_cpu_example_kind_vllm_keeps_both_servers_and_pauses_them(tmp_path):
    """examples/vllm-cpu/config-kind.toml: each server starts once; from then on a switch goes
    through vLLM's sleep API, with both servers (and their memory) kept."""
    llmux = run_cpu_example(tmp_path, "config-kind.toml")
    first, second = CPU_EXAMPLE_MODELS
    try:
        timings = exercise_sleep_mode(llmux, (first, second), drain=False)
        started = servers_started(llmux)
        assert sorted(name for name, _ in started) == [first, second], "each started once"
        held = {name: session_resident_gib(session) for name, session in started}
        assert all(held.values()), "both servers still run"
        print("\nexamples/vllm-cpu/config-kind.toml (kind = vllm; tiny models):")
        print("\n".join(switch_figures(llmux)))
        print("client-side, each request:", "; ".join(timings))
        print(
            "resident memory held:",
            ", ".join(f"{name} {gib:.2f} GiB" for name, gib in held.items()),
        )
    finally:
        assert llmux.stop() == 0
    for name, session in started:
        assert not session_members(session), f"{name}'s server outlived llmux"
