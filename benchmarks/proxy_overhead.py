"""Added latency of a request through llmux versus the same fake backend hit directly.

Starts a fake backend and llmux as processes on loopback, then sends non-streaming chat requests at
concurrency 1 in interleaved rounds (direct, proxied, direct, ...) so that machine noise hits both
sides alike. Prints medians, p99s and the difference. Usage:

    python benchmarks/proxy_overhead.py [--requests 2000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

LLMUX = [sys.executable, "-m", "llmux"]
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def start(args: list[str], marker: str, timeout: float = 30.0) -> tuple[subprocess.Popen[str], str]:
    """Start a process in its own group and return it with the URL from its `marker` line."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # keeps reading, so that a full pipe never blocks the process
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if marker in line:
            return proc, line.strip().rsplit(" ", 1)[1]
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"{args} did not print {marker!r} within {timeout}s")


def timed(client: httpx.Client, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        response = client.post(url, json=BODY)
        times.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    backend, backend_url = start(
        [*LLMUX, "fake-backend", "--name", "bench", "--awake", "--token-interval", "0"],
        "listening on",
    )
    port = backend_url.rsplit(":", 1)[1]
    folder = tempfile.TemporaryDirectory()  # hooks run in the config's folder: keep it to the end
    config = Path(folder.name) / "config.toml"
    ctl = " ".join(LLMUX) + f" fake-ctl {{}} --port {port}"
    config.write_text(
        f'[models.bench]\nport = {port}\nwake = "{ctl.format("wake")}"\n'
        f'sleep = "{ctl.format("sleep")}"\nalive = "{ctl.format("alive")}"\n'
        "[defaults]\nalive_interval_secs = 3600\n"
    )
    state = Path(folder.name) / "state"  # locks and hook records stay in this run's folder
    state.mkdir(mode=0o700)
    config.write_text(f'[server]\nstate_dir = "{state}"\n' + config.read_text())
    llmux, llmux_url = start([*LLMUX, "serve", "-c", str(config), "--port", "0"], "listening on")
    try:
        direct: list[float] = []
        proxied: list[float] = []
        per_round = max(1, args.requests // args.rounds)
        with httpx.Client(timeout=30) as client:
            timed(client, backend_url + "/v1/chat/completions", 50)  # warm up both paths
            timed(client, llmux_url + "/v1/chat/completions", 50)
            for _ in range(args.rounds):
                direct += timed(client, backend_url + "/v1/chat/completions", per_round)
                proxied += timed(client, llmux_url + "/v1/chat/completions", per_round)
        d50, p50 = statistics.median(direct), statistics.median(proxied)
        print(f"requests per side: {len(direct)} (concurrency 1, {args.rounds} interleaved rounds)")
        print(f"direct   p50 {d50 * 1000:7.3f} ms   p99 {p99(direct) * 1000:7.3f} ms")
        print(f"llmux    p50 {p50 * 1000:7.3f} ms   p99 {p99(proxied) * 1000:7.3f} ms")
        added_p99 = p99(proxied) - p99(direct)
        print(f"added    p50 {(p50 - d50) * 1000:7.3f} ms   p99 {added_p99 * 1000:7.3f} ms")
        print(f"ratio    p50 {p50 / d50:.2f}x")
        print(f"requests/s at concurrency 1: direct {1 / d50:.0f}, through llmux {1 / p50:.0f}")
    finally:
        for proc in (llmux, backend):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        folder.cleanup()


if __name__ == "__main__":
    main()
