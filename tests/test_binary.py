"""The one-file binary (dist/llmux, built by `pyinstaller llmux.spec`): serve, switch, stop; the
demo with no Python on PATH; hooks get the user's LD_LIBRARY_PATH back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat, metric_value

BINARY = Path(os.environ.get("LLMUX_BINARY", Path(__file__).parents[1] / "dist" / "llmux"))

pytestmark = pytest.mark.skipif(
    not BINARY.exists() and not os.environ.get("LLMUX_REQUIRE_BINARY"),
    reason="no one-file binary: run `pyinstaller llmux.spec` first",
)


def _start(args: list[str], marker: str, env: dict[str, str] | None = None):
    proc = subprocess.Popen(
        [str(BINARY), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if marker in line:
            return proc, line
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"{args} never printed {marker!r}")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=20)


def test_version():
    result = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("llmux ")


def test_binary_serves_switches_and_exits_0_on_sigterm(tmp_path):
    backends = [
        _start(["fake-backend", "--name", name, "--wake-delay", "0.05"], "listening on")
        for name in ("a", "b")
    ]
    llmux = None
    try:
        ports = [line.strip().rsplit(":", 1)[1] for _, line in backends]
        hooks = ""
        for name, port in zip(("a", "b"), ports, strict=True):
            ctl = f"{BINARY} fake-ctl {{}} --port {port}"
            hooks += (
                f'[models.{name}]\nport = {port}\nwake = "{ctl.format("wake")}"\n'
                f'sleep = "{ctl.format("sleep")}"\n'
                f'alive = "echo $LD_LIBRARY_PATH > {tmp_path}/ld-{name}; {ctl.format("alive")}"\n'
            )
        config = tmp_path / "config.toml"
        config.write_text("[server]\nworkers = 2\n" + hooks)  # workers started by the binary
        env = {**os.environ, "LD_LIBRARY_PATH": "/opt/user/lib"}
        llmux, line = _start(["serve", "-c", str(config), "--port", "0"], "listening on", env)
        url = line.strip().rsplit(" ", 1)[1]
        for model in ("a", "b", "a"):
            response = httpx.post(url + "/v1/chat/completions", json=chat(model), timeout=30)
            assert response.status_code == 200, response.text
        metrics = httpx.get(url + "/metrics").text
        assert 'llmux_switch_total{from="a",result="ok",to="b"} 1.0' in metrics
        assert (tmp_path / "ld-a").read_text().strip() == "/opt/user/lib"
        workers = _workers_of_the_binary()
        assert len(workers) == 2, workers
        assert _stop(llmux) == 0
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived it"
    finally:
        if llmux is not None:
            _stop(llmux)
        for proc, _ in backends:
            _stop(proc)


def _workers_of_the_binary() -> list[int]:
    """Worker processes started through the binary itself (`llmux _worker`), read from /proc
    (to check, never to signal)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = entry.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0] == str(BINARY).encode() and b"_worker" in argv:
            found.append(int(entry.parent.name))

    # Each is a bootloader and its child, both with these arguments: count the bootloaders.
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    return [pid for pid in found if parent(pid) not in found]


def test_a_custom_policy_file_imports_llmux_policy_inside_the_binary(tmp_path):
    """The binary has no site-packages: a policy file gets `llmux.policy` from the binary."""
    (tmp_path / "mine.py").write_text(
        "from llmux.policy import FifoPolicy, Snapshot, Stay, SwitchTo, CallAt, ModelState\n"
        "class Mine(FifoPolicy):\n    pass\n"
    )
    config = tmp_path / "config.toml"
    config.write_text(
        '[policy]\nname = "mine.py:Mine"\n[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n'
    )
    result = subprocess.run(
        [str(BINARY), "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "policy mine.py:Mine" in result.stdout


def test_simulate_finds_its_sample_trace_inside_the_binary(tmp_path):
    result = subprocess.run(
        [str(BINARY), "simulate", "--policy", "fifo"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("475 requests, 3 models")


def test_demo_runs_without_python_on_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to("/bin/sh")  # hooks need a shell, nothing else
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    demo, _ = _start(["demo", "--port", str(port)], "Press Ctrl-C", env)
    try:
        for model in ("llama", "qwen"):
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(model), timeout=30
            )
            assert response.status_code == 200, response.text
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=20) == 0


def test_the_binary_carries_nvml_and_reads_the_fake_file(tmp_path):
    """nvidia-ml-py is inside the binary: with no driver it says NVML's own reason, never that
    the package is missing; LLMUX_FAKE_NVML works through the binary as through Python."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[groups.g]\nmodels = ["a"]\ngpus = [1]\n'
        '[models.a]\nport = 9\nwake = "true"\nsleep = "true"\n'
    )
    serve = ["serve", "-c", str(config), "--port", "0"]
    bare = {k: v for k, v in os.environ.items() if k != "LLMUX_FAKE_NVML"}
    llmux, line = _start(serve, "GPU memory", bare)
    try:
        assert "nvidia-ml-py" not in line, line
        assert "(NVML: " in line or "through NVML" in line, line  # no driver here, or one
    finally:
        assert _stop(llmux) == 0
    nvml = tmp_path / "gpus.json"
    nvml.write_text('{"gpus": [{"total_gb": 80, "free_gb": 80}, {"total_gb": 24, "free_gb": 6}]}')
    llmux, line = _start(serve, "listening on", {**bare, "LLMUX_FAKE_NVML": str(nvml)})
    try:
        url = line.strip().rsplit(" ", 1)[1]
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert metric_value(metrics, "llmux_gpu_free_bytes", gpu="1") == 6 * 1024**3
    finally:
        assert _stop(llmux) == 0
