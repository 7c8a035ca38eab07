"""Chaos run: many clients, faulty hooks, a backend killed mid-stream; then check that nothing
was lost. Used by tests/test_chaos.py (a short seed) and as a soak script:

    python -m tests.chaos --requests 2000 --seed 7
    python -m tests.chaos --requests 2000 --seed 7 --servers   # kind = "vllm" + cmd

Faults injected: wake hooks that fail (10%), hang until killed by their timeout (2%) or take a
random time; clients that leave while queued or mid-stream; the active backend killed with
SIGKILL while it streams, and restarted (awake, as a supervisor would) a second later.

Afterwards these must hold: no request reached a sleeping backend and no backend was put to sleep
with requests in flight; every request got its full answer or a defined error (502/503/504 in
OpenAI shape, or a truncated stream from the killed backend); in-flight counts and queues are 0;
no hook process is left; llmux still serves every model; with groups, no group ever has more
awake than its capacity.

With --servers, no hooks: each model is `kind = "vllm"` with a `cmd` that llmux starts itself
(fake servers speaking vLLM's sleep-mode API), and instead of one backend killed and restarted by
hand, the server of a busy model is killed with SIGKILL up to three times; llmux must notice
each death and start the server again on demand. No server process may outlive llmux.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import trio

from llmux.config import load_config
from llmux.runtime.hook_registry import group_runs
from llmux.server import running_controller, running_server, start_instance

LLMUX = shlex.join([sys.executable, "-m", "llmux"])
MODELS = ("m1", "m2", "m3")
# With --groups: two of m1-m3 awake at once on one "GPU" (capacity 2), m4 alone on another.
GROUPED_MODELS = ("m1", "m2", "m3", "m4")
GROUPS = (
    '[groups.gpu0]\ncapacity = 2\nmodels = ["m1", "m2", "m3"]\n[groups.gpu1]\nmodels = ["m4"]\n'
)
CAPACITY = {"gpu0": 2.0, "gpu1": 1.0}
WAKE_HOOK = """#!/bin/sh
# Wake with an injected fault: the next line of the model's plan says what to do.
plan="$1"; count="$2"; port="$3"
n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$count"
step=$(sed -n "${n}p" "$plan")
case "$step" in
fail) echo "injected wake failure" >&2; exit 1 ;;
hang) sleep 60 ;;
esac
sleep "${step:-0}"
exec LLMUX fake-ctl wake --port "$port"
"""


@dataclass
class ChaosReport:
    requests: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"requests: {self.requests}"]
        lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())))
        lines.append(
            "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        )
        lines.append(f"violations: {len(self.violations)}")
        lines += [f"  {v}" for v in self.violations[:20]]
        return "\n".join(lines)


class Backend:
    def __init__(self, name: str, port: int = 0, awake: bool = False) -> None:
        args = [sys.executable, "-m", "llmux", "fake-backend", "--name", name, "--port", str(port)]
        args += ["--wake-delay", "0.02", "--sleep-delay", "0.01", "--token-interval", "0.005"]
        self.process = subprocess.Popen(
            [*args, *(["--awake"] if awake else [])], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.name, self.port = name, int(line.strip().rsplit(":", 1)[1])

    def state(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/fake/state", timeout=10).json()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=10)


SERVER_CMD = (
    "exec LLMUX fake-backend --awake --api vllm --name ${MODEL} --port ${PORT} "
    "--wake-delay 0.02 --sleep-delay 0.01 --token-interval 0.005"
)
SERVER_KILLS = 3


def write_server_setup(folder: Path) -> Path:
    """Models whose servers llmux starts itself and drives through vLLM's API."""
    command = SERVER_CMD.replace("LLMUX", LLMUX)
    blocks = [f'[models.{name}]\nkind = "vllm"\ncmd = "{command}"\n' for name in MODELS]
    path = folder / "config.toml"
    path.write_text(
        "[server]\nshutdown_timeout_secs = 5\n"
        f'state_dir = "{folder / "state"}"\n'
        "[policy]\nrequest_timeout_secs = 30\n"
        "[defaults]\nalive_interval_secs = 0.5\nwake_timeout_secs = 20\n\n" + "\n".join(blocks)
    )
    return path


def write_setup(
    folder: Path,
    backends: dict[str, Backend],
    rng: random.Random,
    report: ChaosReport,
    grouped: bool = False,
) -> Path:
    hook = folder / "wake.sh"
    hook.write_text(WAKE_HOOK.replace("LLMUX", LLMUX))
    hook.chmod(0o755)
    blocks = []
    for name, backend in backends.items():
        plan = []
        for _ in range(2000):
            roll = rng.random()
            step = (
                "fail" if roll < 0.10 else "hang" if roll < 0.12 else f"{rng.uniform(0, 0.15):.3f}"
            )
            plan.append(step)
        # Every model's second wake fails, the last model's first wake too, and the first
        # model's third hangs: a short run injects both faults however few switches the policy
        # makes (with a capacity, a model may be woken only once).
        plan[1] = "fail"
        if not blocks:
            plan[2] = "hang"
        if len(blocks) == len(backends) - 1:
            plan[0] = "fail"
        (folder / f"{name}.plan").write_text("\n".join(plan) + "\n")
        ctl = f"{LLMUX} fake-ctl {{}} --port {backend.port}"
        blocks.append(
            f"[models.{name}]\nport = {backend.port}\n"
            f'wake = "./wake.sh {name}.plan {name}.count {backend.port}"\n'
            f'sleep = "sleep 0.02; {ctl.format("sleep")}"\nalive = "{ctl.format("alive")}"\n'
            "wake_timeout_secs = 1.5\n" + ("size = 1\n" if grouped else "")
        )
    path = folder / "config.toml"
    path.write_text(
        "[server]\nshutdown_timeout_secs = 5\n"
        f'state_dir = "{folder / "state"}"\n'
        "[policy]\nrequest_timeout_secs = 30\n"
        "[defaults]\nalive_interval_secs = 0.5\n\n"
        + (GROUPS if grouped else "")
        + "\n".join(blocks)
    )
    return path


async def one_request(
    client: httpx.AsyncClient, model: str, stream: bool, behaviour: str, rng: random.Random
) -> str:
    """Send one request; returns its outcome."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": rng.randint(1, 30),
    }
    try:
        if behaviour == "leave_queued":
            with trio.move_on_after(rng.uniform(0.0, 0.3)):
                await client.post("/v1/chat/completions", json=body)
                return "ok_before_leaving"
            return "client_left"
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            return _classify(response.status_code, response.content, streamed=False)
        body["stream"] = True
        received = b""
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for chunk in response.aiter_bytes():
                received += chunk
                if behaviour == "leave_mid_stream" and response.status_code == 200:
                    return "client_left"
            return _classify(response.status_code, received, streamed=True)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        return "truncated"  # the connection broke mid-answer


def _classify(status: int, content: bytes, streamed: bool) -> str:
    if status == 200:
        complete = content.endswith(b"data: [DONE]\n\n") if streamed else _json_ok(content)
        return "ok" if complete else "incomplete_200"
    if status in (502, 503, 504):
        try:
            error = json.loads(content)["error"]
            assert {"message", "type", "code"} <= set(error)
        except (ValueError, KeyError, AssertionError, TypeError):
            return f"malformed_{status}"
        return f"error_{status}"
    return f"unexpected_{status}"


def _json_ok(content: bytes) -> bool:
    try:
        return bool(json.loads(content)["choices"])
    except (ValueError, KeyError):
        return False


async def run_chaos(
    folder: Path,
    requests: int,
    seed: int,
    concurrency: int = 16,
    grouped: bool = False,
    servers: bool = False,
    workers: int = 1,
) -> ChaosReport:
    rng = random.Random(seed)
    report = ChaosReport(requests=requests)
    models = GROUPED_MODELS if grouped else MODELS
    backends = {} if servers else {name: Backend(name) for name in models}
    if servers:
        path = write_server_setup(folder)
    else:
        path = write_setup(folder, backends, rng, report, grouped)
    killed: set[str] = set()
    lost_stats: list[dict] = []
    server_pids: set[int] = set()
    worker_pids: set[int] = set()
    try:
        config = load_config(path).with_listen("127.0.0.1", 0)
        config = replace(config, server=replace(config.server, workers=workers))
        serving = (
            running_server(config)
            if workers == 1
            else running_controller(config, None, start_instance(config))
        )
        async with serving as server:
            switcher = server.app.fleet
            if server.supervisor is not None:
                worker_pids.update(server.supervisor.pids())
            plan = [
                (
                    rng.choice(models),
                    rng.random() < 0.5,
                    rng.choices(["normal", "leave_queued", "leave_mid_stream"], [8, 1, 1])[0],
                )
                for _ in range(requests)
            ]
            work = iter(enumerate(plan))
            limits = httpx.Limits(max_connections=concurrency * 2)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

                async def client_task() -> None:
                    for _index, (model, stream, behaviour) in work:
                        outcome = await one_request(client, model, stream, behaviour, rng)
                        if outcome == "truncated" and model not in killed:
                            report.violations.append(
                                f"stream for {model} truncated without a fault"
                            )
                        report.outcomes[outcome] += 1
                        if behaviour != "normal":
                            report.faults[behaviour] += 1
                        await trio.sleep(rng.uniform(0, 0.01))

                async def kill_a_streaming_backend() -> None:
                    await trio.sleep(rng.uniform(1.0, 3.0))
                    with trio.move_on_after(20):
                        while True:
                            busy = [
                                m
                                for m in switcher.models.values()
                                if m.state == "active" and m.in_flight
                            ]
                            if busy:
                                break
                            await trio.sleep(0.01)
                        victim = busy[0].name
                        backend = backends[victim]
                        # Once killed, it is restarted even if the clients are done meanwhile.
                        with trio.CancelScope(shield=True):
                            lost_stats.append(await trio.to_thread.run_sync(backend.state))
                            killed.add(victim)
                            backend.stop(signal.SIGKILL)
                            report.faults["backend_killed_mid_stream"] += 1
                            await trio.sleep(1.0)
                            backends[victim] = await trio.to_thread.run_sync(
                                lambda: Backend(victim, backend.port, awake=True)
                            )
                            report.faults["backend_restarted"] += 1

                async def kill_busy_servers() -> None:
                    """SIGKILL the server of a busy model, a few times; llmux restarts it."""
                    for _ in range(SERVER_KILLS):
                        await trio.sleep(rng.uniform(1.0, 2.5))
                        with trio.move_on_after(20):
                            while True:
                                busy = [
                                    m.name
                                    for m in switcher.models.values()
                                    if m.state == "active" and m.in_flight
                                ]
                                pid = switcher.servers.pid(busy[0]) if busy else None
                                if pid is not None:
                                    break
                                await trio.sleep(0.01)
                            with trio.CancelScope(shield=True):
                                port = switcher.config.models[busy[0]].port
                                try:
                                    stats = await trio.to_thread.run_sync(_state, port)
                                except httpx.HTTPError:
                                    continue  # it went to sleep or died meanwhile: next time
                                lost_stats.append(stats)
                                killed.add(busy[0])
                                server_pids.add(pid)
                                os.killpg(pid, signal.SIGKILL)
                                report.faults["server_killed_mid_stream"] += 1

                async def kill_a_worker() -> None:
                    """SIGKILL one data-plane process mid-run: its streams break, its slots
                    are released, and it is started again."""
                    assert server.supervisor is not None
                    await trio.sleep(rng.uniform(1.0, 3.0))
                    victim = rng.choice(sorted(server.supervisor.pids()))
                    killed.update(models)  # any model's stream may have been on it
                    os.kill(victim, signal.SIGKILL)
                    report.faults["worker_killed"] += 1
                    with trio.move_on_after(10):
                        while (
                            victim in server.supervisor.pids()
                            or len(server.supervisor.pids()) < workers
                        ):
                            await trio.sleep(0.05)
                    worker_pids.update(server.supervisor.pids())

                async def watch_capacity() -> None:
                    """llmux's own books: never more awake in a group than it holds."""
                    while True:
                        held: collections.Counter[str] = collections.Counter()
                        for model in switcher.models.values():
                            if model.state != "asleep":
                                held[model.config.group] += model.size
                        for group, used in held.items():
                            if used > CAPACITY.get(group, 1.0) + 1e-9:
                                report.violations.append(f"group {group} holds {used:g}")
                        await trio.sleep(0.005)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kill_busy_servers if servers else kill_a_streaming_backend)
                    nursery.start_soon(watch_capacity)
                    if workers > 1:
                        nursery.start_soon(kill_a_worker)
                    async with trio.open_nursery() as clients:
                        for _ in range(concurrency):
                            clients.start_soon(client_task)
                    nursery.cancel_scope.cancel()

                for name in models if not servers else ():
                    plan_file = folder / f"{name}.plan"
                    count = (
                        int((folder / f"{name}.count").read_text() or 0)
                        if (folder / f"{name}.count").exists()
                        else 0
                    )
                    steps = plan_file.read_text().splitlines()[:count]
                    report.faults["wake_failed"] += steps.count("fail")
                    report.faults["wake_hung_and_killed"] += steps.count("hang")
                    # Later wakes succeed at once, so that the final checks see llmux serve.
                    (folder / f"{name}.plan").write_text("\n".join(steps) + "\n" + "0\n" * 100)
                with trio.move_on_after(30):
                    while any(m.queue or m.in_flight for m in switcher.models.values()):
                        await trio.sleep(0.05)
                for name, model in switcher.models.items():
                    if model.queue or model.in_flight:
                        report.violations.append(
                            f"{name}: queue {len(model.queue)}, "
                            f"in flight {model.in_flight} at the end"
                        )
                if servers:  # the servers' own counters, before llmux stops them
                    for name in models:
                        pid = switcher.servers.pid(name)
                        if pid is not None:
                            server_pids.add(pid)
                            port = switcher.config.models[name].port
                            lost_stats.append(await trio.to_thread.run_sync(_state, port))
                metrics = (await client.get("/metrics")).text
                for line in metrics.splitlines():
                    if line.startswith(
                        ("llmux_model_in_flight{", "llmux_request_queue_depth{")
                    ) and not line.endswith(" 0.0"):
                        report.violations.append(f"gauge not back to 0: {line}")
                for name in models:
                    await trio.sleep(0.1 if servers else 2.1)  # past a failed switch's backoff
                    response = await client.post(
                        "/v1/chat/completions", json={"model": name, "messages": []}
                    )
                    if response.status_code != 200:
                        report.violations.append(
                            f"llmux no longer serves {name}: {response.status_code}"
                        )
        for stats in [
            *lost_stats,
            *[await trio.to_thread.run_sync(b.state) for b in backends.values()],
        ]:
            for counter in ("rejected_while_asleep", "slept_while_busy"):
                if stats[counter]:
                    report.violations.append(f"{stats['name']}: {counter} = {stats[counter]}")
        alive = [pid for pid in worker_pids if _running(pid)]
        if alive:
            report.violations.append(f"worker processes left after llmux stopped: {alive}")
        left = [pid for pid in server_pids if group_runs(pid)]
        if left:
            report.violations.append(f"server process groups left after llmux stopped: {left}")
        leftovers = _hook_processes(folder)
        if leftovers:
            report.violations.append(f"hook processes left: {leftovers}")
        for outcome in report.outcomes:
            if outcome.startswith(("incomplete", "malformed", "unexpected")):
                report.violations.append(f"{report.outcomes[outcome]} requests ended as {outcome}")
    finally:
        for backend in backends.values():
            backend.stop()
    return report


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent does not)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _state(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/fake/state", timeout=10).json()


def _hook_processes(folder: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in text and "fake-backend" not in text:
            found.append(text.strip())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--groups", action="store_true", help="two groups, one with capacity 2")
    parser.add_argument(
        "--servers", action="store_true", help='kind = "vllm" + cmd servers that llmux starts'
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="data-plane processes (one is killed mid-run)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmux-chaos-") as folder:
        report = trio.run(
            run_chaos, Path(folder), args.requests, args.seed, args.concurrency, args.groups,
            args.servers, args.workers,
        )  # fmt: skip
    print(report.summary())
    raise SystemExit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
