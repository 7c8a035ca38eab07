"""The example hooks in examples/, run by llmux end to end against stand-ins that speak each
backend's control API: after every switch exactly the model llmux calls active is awake."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tomllib
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    LLMUX,
    PYTHON,
    chat,
    clean,
    free_port,
    interleave,
    llmux_running,
    model_block,
    ollama_loaded,
    process_running,
    write_config,
)

EXAMPLES = Path(__file__).parents[1] / "examples"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the example hooks use curl")


def copy_example(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    (folder / "config.toml").unlink()  # the test writes its own, with the stand-ins' ports
    return folder


async def test_vllm_sleep_mode_levels_1_and_2(fakes, tmp_path):
    folder = copy_example("vllm", tmp_path)
    a, b = fakes.start("a", "b", api="vllm", awake=True, wake_delay=0.1)
    config = model_block("a", a.port, wake="./wake.sh", sleep="./sleep.sh", alive="./alive.sh")
    config += model_block("b", b.port, wake="./wake.sh 2", sleep="./sleep.sh 2", alive="./alive.sh")
    path = write_config(folder, config)

    def awake_now() -> set[str]:
        return {f.name for f in (a, b) if f.state()["state"] == "awake"}

    # Both start awake: llmux keeps a (first in config order) and puts b to sleep (level 2).
    await interleave(path, awake_now)
    for fake in (a, b):
        assert clean(fake.state()), fake.state()
    assert b.state()["wakes"] == 2  # each woken with the level-2 sequence, weights reloaded


async def test_sglang_memory_saver(fakes, tmp_path):
    folder = copy_example("sglang", tmp_path)
    a, b = fakes.start("a", "b", api="sglang", awake=True, wake_delay=0.1)
    # Their markers go to the state folder llmux gives the hooks (LLMUX_STATE_DIR).
    blocks = "".join(
        model_block(f.name, f.port, wake="./wake.sh", sleep="./sleep.sh", alive="./alive.sh")
        for f in (a, b)
    )
    path = write_config(folder, blocks)

    def awake_now() -> set[str]:
        return {f.name for f in (a, b) if f.state()["state"] == "awake"}

    await interleave(path, awake_now)
    for fake in (a, b):
        assert clean(fake.state()), fake.state()


async def test_llama_cpp_process_start_and_stop_leave_no_orphans(tmp_path):
    folder = copy_example("llama.cpp", tmp_path)
    state = Path(os.environ["RUNTIME_DIRECTORY"])  # llmux's state folder: LLMUX_STATE_DIR
    ports = {"a": free_port(), "b": free_port()}
    blocks = ""
    for name, port in ports.items():
        server = f"{LLMUX} fake-backend --awake --name {name} --port {port}"
        blocks += model_block(
            name, port, wake=f"SERVER_CMD='{server}' ./start.sh", sleep="./stop.sh",
            alive="./alive.sh",
        )  # fmt: skip
    path = write_config(folder, blocks)
    seen_pids: set[int] = set()

    def awake_now() -> set[str]:
        running = set()
        for name, port in ports.items():
            pidfile = state / f"llama-{port}.pid"
            if pidfile.exists() and process_running(int(pidfile.read_text())):
                seen_pids.add(int(pidfile.read_text()))
                running.add(name)
        return running

    try:
        await interleave(path, awake_now)
        assert len(seen_pids) == 4  # a, b, a, b: every wake a new process
        stopped = [pid for pid in seen_pids if not process_running(pid)]
        assert len(stopped) == 3, "every server but the active one was stopped"
    finally:
        for port in ports.values():
            pidfile = state / f"llama-{port}.pid"
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGTERM)


async def test_ollama_one_port_many_models(fakes, tmp_path):
    folder = copy_example("ollama", tmp_path)
    (ollama,) = fakes.start("a,b", api="ollama", wake_delay=0.1)
    blocks = "".join(
        model_block(name, ollama.port, wake="./wake.sh", sleep="./sleep.sh", alive="./alive.sh")
        for name in ("a", "b")
    )
    path = write_config(folder, blocks)

    await interleave(path, partial(ollama_loaded, ollama.url))
    state = ollama.state()
    assert state["co_loaded"] == 0
    for model_state in state["models"].values():
        assert clean(model_state), model_state


async def test_containers_with_a_docker_cli_stand_in(tmp_path):
    folder = copy_example("docker", tmp_path)
    runtime = tmp_path / "containers"
    runtime.mkdir()
    docker = Path(__file__).parent / "data" / "fake-docker.sh"
    stand_in = f"FAKE_DOCKER_DIR={runtime} FAKE_DOCKER_PYTHON={PYTHON} DOCKER={docker}"
    ports = {"a": free_port(), "b": free_port()}
    blocks = ""
    for name, port in ports.items():
        (runtime / f"{name}.port").write_text(str(port))
        env = f"CONTAINER={name} {stand_in}"
        blocks += model_block(
            name,
            port,
            wake=f"{env} ./wake.sh",
            sleep=f"{env} ./sleep.sh",
            alive=f"{env} ./alive.sh",
        )
    path = write_config(folder, blocks)

    def awake_now() -> set[str]:
        result = set()
        for name in ports:
            pidfile = runtime / f"{name}.pid"
            if pidfile.exists() and process_running(int(pidfile.read_text())):
                result.add(name)
        return result

    try:
        await interleave(path, awake_now)
    finally:
        for pidfile in runtime.glob("*.pid"):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_every_example_config_passes_check():
    configs = sorted(EXAMPLES.glob("*/config*.toml"))
    assert EXAMPLES / "vllm-cpu" / "config-kind.toml" in configs
    for config in configs:
        result = subprocess.run(
            [PYTHON, "-m", "llmux", "check", "-c", str(config)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_vllm_cpu_example_uses_what_runs_on_a_cpu_box():
    """What tests/real/test_vllm.py found, kept true of the CPU example: the server starts as a
    module (the CPU build's `vllm` script fails), without --enable-sleep-mode (refused on CPU),
    with a bounded KV cache and cores of its own; config.toml stops servers (no kind),
    config-kind.toml pauses them (kind = "vllm") on cores that do not overlap."""
    kinds = {}
    for name in ("config.toml", "config-kind.toml"):
        models = tomllib.loads((EXAMPLES / "vllm-cpu" / name).read_text())["models"]
        assert len(models) == 2
        for model in models.values():
            command = model["cmd"]
            assert "--enable-sleep-mode" not in command
            assert " python3 -m vllm.entrypoints.openai.api_server " in command
            assert "vllm serve" not in command
            assert "--port ${PORT}" in command
            for variable in ("VLLM_CPU_KVCACHE_SPACE=", "VLLM_CPU_OMP_THREADS_BIND="):
                assert variable in command
        kinds[name] = [model.get("kind") for model in models.values()]
    assert kinds == {"config.toml": [None, None], "config-kind.toml": ["vllm", "vllm"]}
    # Both kind servers run at once: their cores, as the shell works them out, must not overlap.
    models = tomllib.loads((EXAMPLES / "vllm-cpu" / "config-kind.toml").read_text())["models"]
    cores = []
    for model in models.values():
        words = model["cmd"].split()
        assignment = next(w for w in words if w.startswith("VLLM_CPU_OMP_THREADS_BIND="))
        script = f"{assignment}; echo $VLLM_CPU_OMP_THREADS_BIND"
        first, last = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, check=True
        ).stdout.split("-")
        cores.append(set(range(int(first), int(last) + 1)))
    assert cores[0] and cores[1] and not cores[0] & cores[1]


async def test_groups_example_on_vllm_stand_ins(fakes, tmp_path):
    """Seven vLLM servers, all awake at start-up: each group keeps what fits, then serves and
    evicts with the vLLM hooks; the servers' own state always matches llmux's."""
    shutil.copytree(EXAMPLES / "vllm", tmp_path / "vllm")
    folder = tmp_path / "groups"
    shutil.copytree(EXAMPLES / "groups", folder)
    text = (folder / "config.toml").read_text()
    names = ["llama-70b", "qwen-72b", "qwen-coder-32b", "llama-8b", "mistral-7b", "bge-m3"]
    names.append("qwen-7b")  # in the file's port order, 8001 to 8007
    started = fakes.start(*names, api="vllm", awake=True, wake_delay=0.05)
    backends = {fake.name: fake for fake in started}
    for index, fake in enumerate(backends.values()):
        text = text.replace(f"port = {8001 + index}\n", f"port = {fake.port}\n")
    text = text.replace("port = 3000\n", "port = 3999\n")
    (folder / "config.toml").write_text(text)

    def awake_now() -> set[str]:
        return {name for name, fake in backends.items() if fake.state()["state"] == "awake"}

    async with llmux_running(folder / "config.toml") as (_, client):

        async def llmux_awake() -> set[str]:
            data = (await client.get("/v1/models")).json()["data"]
            return {
                m["id"]
                for m in data
                if m["llmux"]["state"] == "active" and "alias_of" not in m["llmux"]
            }

        # Start-up: the first of each one-at-a-time group, and what fits in the others.
        kept = {"llama-70b", "qwen-coder-32b", "llama-8b", "bge-m3", "qwen-7b"}
        with trio.fail_after(10):
            while await llmux_awake() != kept:
                await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(awake_now) == kept
        by_alias = await client.post("/v1/chat/completions", json=chat("gpt-4o-mini"))
        assert by_alias.status_code == 200
        assert by_alias.json()["model"] == "Qwen/Qwen2.5-7B-Instruct"
        # mistral-7b needs room on GPU 2: one of the two awake there goes (the coder, in
        # config order, as neither has been used); GPUs 0-1 switch at the same time.
        async with trio.open_nursery() as nursery:
            for model in ("mistral-7b", "qwen-72b"):
                nursery.start_soon(partial(client.post, "/v1/chat/completions", json=chat(model)))
        expected = {"qwen-72b", "llama-8b", "mistral-7b", "bge-m3", "qwen-7b"}
        assert await llmux_awake() == expected
        assert await trio.to_thread.run_sync(awake_now) == expected
    for fake in backends.values():
        assert clean(fake.state()), fake.state()


async def test_vllm_wake_waits_for_a_server_still_loading_and_keeps_its_deadline(fakes, tmp_path):
    folder = copy_example("vllm", tmp_path)
    port = free_port()
    env = {**os.environ, "LLMUX_PORT": str(port), "LLMUX_TIMEOUT_SECS": "20"}
    hook = subprocess.Popen(["sh", "./wake.sh"], cwd=folder, env=env, stderr=subprocess.PIPE)
    try:
        await trio.sleep(1.0)  # nothing listens yet, as while vLLM loads after a boot
        (a,) = fakes.start("a", api="vllm", port=port, wake_delay=0.1)
        assert await trio.to_thread.run_sync(partial(hook.wait, timeout=30)) == 0
        assert a.state()["state"] == "awake"
    finally:
        hook.kill()
        hook.wait()
    # With nothing ever listening, it gives up at its own deadline, saying why.
    quick = {**env, "LLMUX_PORT": str(free_port()), "LLMUX_TIMEOUT_SECS": "1.5"}
    ended = subprocess.run(
        ["sh", "./wake.sh"], cwd=folder, env=quick, capture_output=True, text=True, timeout=30
    )
    assert ended.returncode == 1 and "does not answer after 1.5s" in ended.stderr
