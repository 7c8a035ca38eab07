"""llmux's benchmark: what the proxy costs, side by side with the backend direct (and nginx).

    python -m benchmarks            # the full run; prints the table docs/performance.md shows
    python -m benchmarks --quick    # a short run (CI); add --check to fail below the floors

Everything runs on loopback: a lean asyncio backend (benchmarks/lean_backend.py, faster than
llmux so never the bottleneck), llmux as `llmux serve`, nginx when installed, and a lean asyncio
client. Targets are measured in interleaved rounds and compared as ratios of medians, because
this machine is noisy; CPU time comes from /proc, which is steadier than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from benchmarks.loadgen import latencies, open_streams, streams
from benchmarks.paced import paced_streams, summary

HERE = Path(__file__).parent
FLOORS = HERE / "floors.toml"
TICKS = os.sysconf("SC_CLK_TCK")


class Process:
    """A child process in its own group whose output is read until `marker` gives its URL."""

    def __init__(self, args: list[str], marker: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        found = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if marker in line and not found.is_set():
                    text = json.loads(line)["message"] if line.startswith("{") else line
                    self.url = text.strip().rsplit(" ", 1)[1]
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(30):
            self.stop()
            raise RuntimeError(f"{args} did not print {marker!r}: {''.join(self.lines)[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1].rstrip("/"))

    def _group(self) -> list[Path]:
        """/proc entries of every process in its group (llmux's workers included)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:
                found.append(entry)
        return found

    def cpu_seconds(self) -> float:
        """CPU time of the processes now in its group."""
        total = 0
        for entry in self._group():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / TICKS

    def rss_mb(self) -> float:
        """Resident memory of its whole group."""
        total = 0
        for entry in self._group():
            try:
                lines = (entry / "status").read_text().splitlines()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def lean_backend(interval: float = 0.0) -> Process:
    args = [sys.executable, "-m", "benchmarks.lean_backend", "--event-interval", str(interval)]
    return Process(args, "listening on")


def floor_app(interval: float) -> Process:
    args = [sys.executable, "-m", "benchmarks.floor_app", "--event-interval", str(interval)]
    return Process(args, "listening on")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False))["ListenOverflows"])
    return 0


def llmux(
    folder: Path,
    models: dict[str, int],
    hooks: dict[str, str] | None = None,
    extra: str = "",
    workers: int = 1,
) -> Process:
    """`llmux serve` on these backends; one process unless `workers` says otherwise."""
    hooks = hooks or {"wake": "true", "sleep": "true"}
    blocks = []
    for index, (name, port) in enumerate(models.items()):
        alive = '"true"' if index == 0 else '"false"'  # the first one is adopted as active
        hook_lines = "".join(f'{hook} = "{command}"\n' for hook, command in hooks.items())
        blocks.append(f"[models.{name}]\nport = {port}\n{hook_lines}alive = {alive}\n")
    config = folder / f"llmux-{len(list(folder.glob('*.toml')))}.toml"
    config.write_text(
        f"{extra}\n[server]\nworkers = {workers}\n[defaults]\nalive_interval_secs = 3600\n\n"
        + "\n".join(blocks)
    )
    args = [
        sys.executable,
        "-m",
        "llmux",
        "serve",
        "-c",
        str(config),
        "--port",
        "0",
        "--log-format",
        "json",
    ]
    # Locks and hook records stay in the run's folder, not in the user's state folder.
    state = folder / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    return Process(args, "llmux listening on", env={**os.environ, "RUNTIME_DIRECTORY": str(state)})


def nginx(folder: Path, backend_port: int) -> Process | None:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    conf = folder / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {folder}/nginx-error.log;
pid {folder}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}; proxy_temp_path {folder};
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    # nginx cannot report an ephemeral port, so pick one.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf.write_text(conf.read_text().replace("listen 127.0.0.1:0", f"listen 127.0.0.1:{port}"))
    announce_then_exec = (
        f"import os; print('nginx listening on http://127.0.0.1:{port}', flush=True); "
        f"os.execv({binary!r}, [{binary!r}, '-c', {str(conf)!r}, '-g', 'daemon off;'])"
    )
    wrapper = [sys.executable, "-c", announce_then_exec]
    process = Process(wrapper, "listening on")
    time.sleep(0.5)
    return process


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] if ordered else float("nan")


def rounds(
    count: int, targets: dict[str, Process], measure: Callable[[Process], object]
) -> dict[str, list]:
    """Run `measure` on each target, interleaved, `count` times."""
    results: dict[str, list] = {name: [] for name in targets}
    for _ in range(count):
        for name, target in targets.items():
            results[name].append(measure(target))
    return results


def run(quick: bool) -> dict[str, float]:
    figures: dict[str, float] = {}
    scale = 0.25 if quick else 1.0
    n_rounds = 3 if quick else 6
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="llmux-bench-") as tmp:
        folder = Path(tmp)
        started: list[Process] = []
        try:
            fast = lean_backend()
            started.append(fast)
            proxy = llmux(folder, {"bench": fast.port})
            started.append(proxy)
            targets = {"direct": fast, "llmux": proxy}
            front = nginx(folder, fast.port)
            if front is not None:
                started.append(front)
                targets["nginx"] = front
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
            }

            # --- non-streaming latency and throughput ---
            for concurrency, count in ((1, int(1000 * scale)), (32, int(4000 * scale))):
                cpu_before = proxy.cpu_seconds()
                results = rounds(
                    n_rounds,
                    targets,
                    lambda t, c=concurrency, n=count: asyncio.run(
                        latencies(t.port, body, c, n // n_rounds)
                    ),
                )
                llmux_cpu = proxy.cpu_seconds() - cpu_before
                merged = {
                    name: [x for r in runs for x in r.latencies] for name, runs in results.items()
                }
                rates = {name: median([r.rate for r in runs]) for name, runs in results.items()}
                figures[f"c{concurrency}_direct_p50_ms"] = median(merged["direct"]) * 1000
                figures[f"c{concurrency}_added_p50_ms"] = (
                    median(merged["llmux"]) - median(merged["direct"])
                ) * 1000
                figures[f"c{concurrency}_added_p99_ms"] = (
                    p99(merged["llmux"]) - p99(merged["direct"])
                ) * 1000
                figures[f"c{concurrency}_rps_ratio"] = rates["llmux"] / rates["direct"]
                figures[f"c{concurrency}_llmux_rps"] = rates["llmux"]
                if "nginx" in merged:
                    figures[f"c{concurrency}_nginx_added_p50_ms"] = (
                        median(merged["nginx"]) - median(merged["direct"])
                    ) * 1000
                    figures[f"c{concurrency}_nginx_rps_ratio"] = rates["nginx"] / rates["direct"]
                if concurrency == 32:
                    requests = sum(len(r.latencies) for r in results["llmux"])
                    figures["llmux_cpu_ms_per_request"] = llmux_cpu / requests * 1000

            # --- streaming: events/s and time to first byte ---
            for concurrency, events in ((1, 2000), (64, 300), (512, 40)):
                events = max(10, int(events * scale))
                cpu_before = proxy.cpu_seconds()
                results = rounds(
                    n_rounds,
                    targets,
                    lambda t, c=concurrency, e=events: asyncio.run(
                        streams(t.port, {**body, "max_tokens": e}, c)
                    ),
                )
                llmux_cpu = proxy.cpu_seconds() - cpu_before
                rates = {name: median([r.rate for r in runs]) for name, runs in results.items()}
                ttfb = {
                    name: median([x for r in runs for x in r.first_bytes])
                    for name, runs in results.items()
                }
                figures[f"sse{concurrency}_direct_events_per_s"] = rates["direct"]
                figures[f"sse{concurrency}_llmux_events_per_s"] = rates["llmux"]
                figures[f"sse{concurrency}_ratio"] = rates["llmux"] / rates["direct"]
                figures[f"sse{concurrency}_added_ttfb_ms"] = (ttfb["llmux"] - ttfb["direct"]) * 1000
                if "nginx" in rates:
                    figures[f"sse{concurrency}_nginx_ratio"] = rates["nginx"] / rates["direct"]
                if concurrency == 64:
                    total_events = sum(r.events for r in results["llmux"])
                    figures["llmux_cpu_us_per_event"] = llmux_cpu / total_events * 1e6

            # --- streaming at a model's pace: 64 streams of 50 tokens/s each ---
            paced = lean_backend(interval=0.02)
            started.append(paced)
            paced_proxy = llmux(folder, {"bench": paced.port})
            started.append(paced_proxy)
            paced_targets = {"direct": paced, "llmux": paced_proxy}
            results = rounds(
                max(2, n_rounds // 2),
                paced_targets,
                lambda t: asyncio.run(streams(t.port, {**body, "max_tokens": 100}, 64)),
            )
            rates = {name: median([r.rate for r in runs]) for name, runs in results.items()}
            figures["sse64_paced_ratio"] = rates["llmux"] / rates["direct"]
            figures["sse64_paced_direct_events_per_s"] = rates["direct"]

            # --- streams at a model's pace, as users feel them ---
            figures.update(paced_cases(folder, started, quick))

            # --- two workers against one, at full socket speed ---
            figures.update(workers_scaling(folder, started, 5 if quick else 7))

            # --- memory with 1,000 open streams, none stalled ---
            slow = lean_backend(interval=0.5)
            started.append(slow)
            holder = llmux(folder, {"bench": slow.port})
            started.append(holder)
            figures["rss_idle_mb"] = holder.rss_mb()
            stream_count = 1000 if not quick else 300
            figures.update(asyncio.run(hold_streams(holder, slow.port, stream_count)))

            # --- switch overhead and drain-to-sleep delay ---
            figures.update(switch_overhead(folder, started, 20 if quick else 60))

            # --- `llmux top` at 2 Hz ---
            figures["top_2hz_cpu_percent"] = top_cost(proxy, 4 if quick else 10)
        finally:
            for process in reversed(started):
                process.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return figures


# (streams, seconds between events, events per stream); 50 tokens/s is 0.02 s.
PACED_CASES = [
    (1, 0.02, 100),
    (16, 0.02, 100),
    (64, 0.02, 100),
    (256, 0.02, 100),
    (1024, 0.05, 100),
]
QUICK_PACED_CASES = [(256, 0.02, 100)]
RAMP_SECS = 1.0


def paced_cases(folder: Path, started: list[Process], quick: bool) -> dict[str, float]:
    """Each case through every target in turn, all at once and over a 1 s ramp. Ratios are
    to the backend direct; the floor is hypercorn on trio streaming the events itself."""
    figures: dict[str, float] = {}
    for interval in sorted({case[1] for case in (QUICK_PACED_CASES if quick else PACED_CASES)}):
        backend = lean_backend(interval)
        started.append(backend)
        floor = floor_app(interval)
        started.append(floor)
        proxy = llmux(folder, {"bench": backend.port})
        started.append(proxy)
        proxy2 = llmux(folder, {"bench": backend.port}, workers=2)
        started.append(proxy2)
        targets = {"direct": backend, "floor": floor, "llmux": proxy, "llmux2": proxy2}
        front = nginx(folder, backend.port)
        if front is not None:
            started.append(front)
            targets["nginx"] = front
        for count, case_interval, events in QUICK_PACED_CASES if quick else PACED_CASES:
            if case_interval != interval:
                continue
            for mode, ramp in (("burst", 0.0), ("ramp", RAMP_SECS)):
                if quick and mode == "ramp":
                    continue
                key = f"paced{count}_{mode}"
                results = {}
                for name, target in targets.items():
                    cpu, overflows = target.cpu_seconds(), listen_overflows()
                    run = asyncio.run(paced_streams(target.port, count, events, ramp))
                    results[name] = summary(run)
                    results[name]["cpu_us_per_event"] = (
                        (target.cpu_seconds() - cpu) / max(1, sum(s.events for s in run.streams))
                    ) * 1e6
                    results[name]["overflows"] = float(listen_overflows() - overflows)
                    if name.startswith("llmux"):
                        figures[f"{key}_{name}_rss_mb"] = target.rss_mb()
                    time.sleep(0.3)  # let connections close before the next target
                direct = results["direct"]
                for name, result in results.items():
                    figures[f"{key}_{name}_lost"] = result["lost"]
                    figures[f"{key}_{name}_overflows"] = result["overflows"]
                    if name == "direct":
                        continue
                    figures[f"{key}_{name}_rate_ratio"] = result["rate"] / direct["rate"]
                    for tail in ("p50", "p99"):
                        figures[f"{key}_{name}_added_ttft_{tail}_ms"] = (
                            result[f"ttft_{tail}"] - direct[f"ttft_{tail}"]
                        ) * 1000
                    figures[f"{key}_{name}_cpu_us_per_event"] = result["cpu_us_per_event"]
                llmux_cpu = figures[f"{key}_llmux_cpu_us_per_event"]
                figures[f"{key}_cpu_vs_floor"] = (
                    llmux_cpu / figures[f"{key}_floor_cpu_us_per_event"]
                )
                figures[f"{key}_ttft_p99_over_floor_ms"] = (
                    figures[f"{key}_llmux_added_ttft_p99_ms"]
                    - figures[f"{key}_floor_added_ttft_p99_ms"]
                )
        for process in (proxy, proxy2, floor, backend, *([front] if front else [])):
            process.stop()
            started.remove(process)
    return figures


def workers_scaling(folder: Path, started: list[Process], n_rounds: int) -> dict[str, float]:
    """Full-speed streams through one process and through two workers, interleaved rounds:
    the ratio of medians of events/s, and of CPU per event (all of llmux's processes)."""
    fast = lean_backend()
    started.append(fast)
    targets = {
        1: llmux(folder, {"bench": fast.port}),
        2: llmux(folder, {"bench": fast.port}, workers=2),
    }
    started.extend(targets.values())
    payload = {"model": "bench", "messages": [], "max_tokens": 300}
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpus: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(n_rounds):
        for workers, target in targets.items():
            cpu = target.cpu_seconds()
            run = asyncio.run(streams(target.port, payload, 64))
            rates[workers].append(run.rate)
            cpus[workers].append((target.cpu_seconds() - cpu) / max(1, run.events) * 1e6)
    return {
        "workers1_events_per_s": median(rates[1]),
        "workers2_events_per_s": median(rates[2]),
        "workers2_events_ratio": median(rates[2]) / median(rates[1]),
        "workers2_cpu_per_event_ratio": median(cpus[2]) / median(cpus[1]),
    }


def paced_report(figures: dict[str, float]) -> str:
    """One row per case: llmux beside the floor and nginx, as ratios and added milliseconds."""
    lines = [
        "| streams x tokens/s, start | rate vs direct: llmux / 2 workers / floor / nginx "
        "| added TTFT p50 / p99: llmux | p99: 2 workers / floor / nginx "
        "| CPU per event: llmux / 2 workers / floor | lost, listen overflows (llmux) |",
        "|---|---|---|---|---|---|",
    ]

    def get(key: str, fmt: str = ".2f") -> str:
        return format(figures[key], fmt) if key in figures else "-"

    for count, interval, _ in PACED_CASES:
        for mode in ("burst", "ramp"):
            key = f"paced{count}_{mode}"
            if f"{key}_llmux_rate_ratio" not in figures:
                continue
            start = "all at once" if mode == "burst" else "over 1 s"
            lines.append(
                f"| {count} x {1 / interval:g}, {start} "
                f"| {get(f'{key}_llmux_rate_ratio')} / {get(f'{key}_llmux2_rate_ratio')} / "
                f"{get(f'{key}_floor_rate_ratio')} / {get(f'{key}_nginx_rate_ratio')} "
                f"| +{get(f'{key}_llmux_added_ttft_p50_ms', '.1f')} / "
                f"+{get(f'{key}_llmux_added_ttft_p99_ms', '.1f')} ms "
                f"| +{get(f'{key}_llmux2_added_ttft_p99_ms', '.1f')} / "
                f"+{get(f'{key}_floor_added_ttft_p99_ms', '.1f')} / "
                f"+{get(f'{key}_nginx_added_ttft_p99_ms', '.1f')} ms "
                f"| {get(f'{key}_llmux_cpu_us_per_event', '.0f')} / "
                f"{get(f'{key}_llmux2_cpu_us_per_event', '.0f')} / "
                f"{get(f'{key}_floor_cpu_us_per_event', '.0f')} us "
                f"| {get(f'{key}_llmux_lost', '.0f')} ({get(f'{key}_llmux2_lost', '.0f')}), "
                f"{get(f'{key}_llmux_overflows', '.0f')} |"
            )
    return "\n".join(lines)


def run_paced_only(quick: bool) -> dict[str, float]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="llmux-bench-") as tmp:
        started: list[Process] = []
        try:
            return paced_cases(Path(tmp), started, quick)
        finally:
            for process in reversed(started):
                process.stop()


async def hold_streams(holder: Process, backend_port: int, count: int) -> dict[str, float]:
    payload = {"model": "bench", "messages": [], "max_tokens": 10000}
    pairs = await open_streams(holder.port, payload, count)
    try:
        await asyncio.sleep(1.0)
        rss = holder.rss_mb()
        # Every stream must still flow: read from each for a while.
        counts = [0] * len(pairs)

        async def drain(index: int, reader: asyncio.StreamReader) -> None:
            with_timeout = asyncio.timeout(3.0)
            try:
                async with with_timeout:
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            return
                        counts[index] += data.count(b"data: {")
            except TimeoutError:
                pass

        await asyncio.gather(*(drain(i, reader) for i, (reader, _) in enumerate(pairs)))
        stalled = sum(1 for c in counts if c == 0)
    finally:
        for _, writer in pairs:
            writer.close()
    return {f"rss_{count}_streams_mb": rss, f"stalled_of_{count}_streams": float(stalled)}


def switch_overhead(folder: Path, started: list[Process], switches: int) -> dict[str, float]:
    """Alternate two models whose hooks do nothing but note the time; read llmux's own account
    of each switch from its model_activated log events."""
    paced = lean_backend(interval=0.01)
    started.append(paced)
    stamp = folder / "sleep-started"
    hooks = {"wake": "true", "sleep": f"date +%s.%N >> {stamp}"}
    proxy = llmux(folder, {"a": paced.port, "b": paced.port}, hooks)
    started.append(proxy)
    last_bytes: list[float] = []

    async def alternate() -> None:
        for index in range(switches):
            current, other = ("a", "b") if index % 2 == 0 else ("b", "a")
            stream = asyncio.ensure_future(
                streams(proxy.port, {"model": current, "messages": [], "max_tokens": 5}, 1)
            )
            await asyncio.sleep(0.02)  # the stream is in flight: the next request forces a drain
            follow = asyncio.ensure_future(
                latencies(proxy.port, {"model": other, "messages": []}, 1, 1)
            )
            await stream
            last_bytes.append(time.time())
            await follow

    asyncio.run(alternate())
    time.sleep(0.3)
    events = [json.loads(line) for line in proxy.lines if line.startswith("{")]
    activated = [e for e in events if e.get("event") == "model_activated" and "switch_seconds" in e]
    own = [(e["switch_seconds"] - e["cost_seconds"] - e["drain_seconds"]) * 1000 for e in activated]
    hook_starts = [float(line) for line in stamp.read_text().split()]
    delays = [
        (start - end) * 1000
        for start, end in zip(hook_starts, last_bytes, strict=False)
        if start >= end - 0.05
    ]
    # What no proxy can avoid: starting the hook's shell and its `date`, measured alone.
    spawn = []
    for _ in range(switches):
        began = time.time()
        subprocess.run(["sh", "-c", f"date +%s.%N > {folder / 'spawn'}"], check=True)
        spawn.append((float((folder / "spawn").read_text()) - began) * 1000)
    return {
        "hook_spawn_p50_ms": median(spawn),
        "hook_spawn_p99_ms": p99(spawn),
        "switches_measured": float(len(own)),
        "switch_own_p50_ms": median(own),
        "switch_own_p99_ms": p99(own),
        "drain_to_sleep_hook_p50_ms": median(delays),
        "drain_to_sleep_hook_p99_ms": p99(delays),
    }


def top_cost(proxy: Process, seconds: float) -> float:
    """Extra llmux CPU, in % of one core, while a client polls /metrics twice a second."""
    import httpx

    before = proxy.cpu_seconds()
    time.sleep(seconds)
    idle = proxy.cpu_seconds() - before
    before = proxy.cpu_seconds()
    with httpx.Client() as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            client.get(proxy.url + "/metrics")
            time.sleep(0.5)
    polled = proxy.cpu_seconds() - before
    return max(0.0, polled - idle) / seconds * 100


def report(figures: dict[str, float]) -> str:
    rows = [
        ("added p50 latency, concurrency 1", "c1_added_p50_ms", "ms"),
        ("added p99 latency, concurrency 1", "c1_added_p99_ms", "ms"),
        ("nginx's added p50 latency, concurrency 1", "c1_nginx_added_p50_ms", "ms"),
        ("requests/s through llmux / direct, c=1", "c1_rps_ratio", "x"),
        ("requests/s through llmux / direct, c=32", "c32_rps_ratio", "x"),
        ("requests/s through nginx / direct, c=32", "c32_nginx_rps_ratio", "x"),
        ("added p50 latency, concurrency 32", "c32_added_p50_ms", "ms"),
        ("SSE events/s llmux / direct, 1 stream", "sse1_ratio", "x"),
        ("SSE events/s llmux / direct, 64 streams", "sse64_ratio", "x"),
        ("SSE events/s llmux / direct, 512 streams", "sse512_ratio", "x"),
        ("SSE events/s nginx / direct, 64 streams", "sse64_nginx_ratio", "x"),
        ("SSE events/s llmux / direct, 64 streams at 50 tokens/s", "sse64_paced_ratio", "x"),
        ("SSE events/s direct, 64 streams", "sse64_direct_events_per_s", "/s"),
        ("SSE events/s through llmux, 64 streams", "sse64_llmux_events_per_s", "/s"),
        ("added time to first byte, 64 streams", "sse64_added_ttfb_ms", "ms"),
        ("llmux CPU per request (c=32)", "llmux_cpu_ms_per_request", "ms"),
        ("llmux CPU per SSE event (64 streams)", "llmux_cpu_us_per_event", "us"),
        ("llmux RSS idle", "rss_idle_mb", "MB"),
        ("llmux RSS with 1,000 open streams", "rss_1000_streams_mb", "MB"),
        ("streams stalled of 1,000", "stalled_of_1000_streams", ""),
        ("llmux RSS with 300 open streams", "rss_300_streams_mb", "MB"),
        ("streams stalled of 300", "stalled_of_300_streams", ""),
        ("llmux's own share of a switch, p50", "switch_own_p50_ms", "ms"),
        ("llmux's own share of a switch, p99", "switch_own_p99_ms", "ms"),
        ("last in-flight byte to sleep hook start, p50", "drain_to_sleep_hook_p50_ms", "ms"),
        ("last in-flight byte to sleep hook start, p99", "drain_to_sleep_hook_p99_ms", "ms"),
        ("of which starting sh + date alone, p50", "hook_spawn_p50_ms", "ms"),
        ("of which starting sh + date alone, p99", "hook_spawn_p99_ms", "ms"),
        ("llmux CPU while `llmux top` polls at 2 Hz", "top_2hz_cpu_percent", "% core"),
        ("SSE events/s, 64 streams: 2 workers / 1 process", "workers2_events_ratio", "x"),
        ("CPU per event: 2 workers / 1 process", "workers2_cpu_per_event_ratio", "x"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    for label, key, unit in rows:
        if key in figures:
            lines.append(f"| {label} | {figures[key]:.3g} {unit} |")
    return "\n".join(lines)


def check(figures: dict[str, float]) -> list[str]:
    floors = tomllib.loads(FLOORS.read_text())
    failures = []
    for key, bound in floors.get("at_least", {}).items():
        if key in figures and not figures[key] >= bound:
            failures.append(f"{key} = {figures[key]:.3g}, below its floor {bound}")
    for key, bound in floors.get("at_most", {}).items():
        if key in figures and not figures[key] <= bound:
            failures.append(f"{key} = {figures[key]:.3g}, above its ceiling {bound}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run, for CI")
    parser.add_argument(
        "--check", action="store_true", help=f"fail when a figure passes its floor in {FLOORS.name}"
    )
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--paced-only", action="store_true", help="only the streams at a model's pace"
    )
    args = parser.parse_args()
    figures = run_paced_only(args.quick) if args.paced_only else run(args.quick)
    print(report(figures))
    print()
    print(paced_report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.check:
        failures = check(figures)
        for failure in failures:
            print("REGRESSION:", failure)
        raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
