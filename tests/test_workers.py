"""`[server] workers = 2`, end to end: `llmux serve` as a controller and two data-plane
processes on one port, against fake backends. What one process promises, two keep: switching
with drains, reloads everywhere at once, a drain on SIGTERM; and a worker that dies takes no
slot with it."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import (
    LlmuxProcess,
    chat,
    fake_model_block,
    llmux_running,
    process_running,
    write_config,
)

WORKERS = {"workers": 2}


def worker_pids(llmux: LlmuxProcess) -> set[int]:
    """llmux's child processes (trio starts them from a thread: every thread is read)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{llmux.proc.pid}/task").iterdir():
        try:
            pids |= {int(pid) for pid in (task / "children").read_text().split()}
        except OSError:
            continue
    return {pid for pid in pids if b"_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def busiest(pids: set[int], backend_port: int) -> int:
    """The worker with the most connections open to the backend: one that carries streams."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"dport = :{backend_port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts = {pid: out.count(f"pid={pid},") for pid in pids}
    return max(counts, key=lambda pid: counts[pid])


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metric(url: str, line_start: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stream(url: str, model: str, tokens: int, out: list) -> None:
    """One streamed answer: (status, body), or ("cut", b"") if the connection broke."""
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=chat(model, stream=True, max_tokens=tokens),
            timeout=30,
        ) as response:  # fmt: skip
            body = b"".join(response.iter_bytes())
    except httpx.TransportError:
        out.append(("cut", b""))
        return
    out.append((response.status_code, body))


def test_two_workers_switch_with_drains_and_count_every_request(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.2, token_interval=0.05)
    config = write_config(tmp_path, fake_model_block(a) + fake_model_block(b), server=WORKERS)
    llmux = LlmuxProcess(config)
    try:
        assert len(worker_pids(llmux)) == 2
        with httpx.Client(base_url=llmux.url, timeout=30) as client:
            for model in ("a", "b", "a"):
                assert client.post("/v1/chat/completions", json=chat(model)).status_code == 200
        # A stream on a; b is asked for meanwhile: a's stream is drained, not cut.
        streamed: list = []
        runner = threading.Thread(target=stream, args=(llmux.url, "a", 20, streamed))
        runner.start()
        wait_for(lambda: metric(llmux.url, 'llmux_model_in_flight{model="a"}') == 1)
        answer = httpx.post(llmux.url + "/v1/chat/completions", json=chat("b"), timeout=30)
        runner.join()
        assert answer.status_code == 200
        status, body = streamed[0]
        assert status == 200 and body.count(b"data: {") == 21 and b"[DONE]" in body
        for fake in (a, b):
            stats = json.loads(httpx.get(fake.url + "/fake/state").text)
            assert stats["rejected_while_asleep"] == 0 and stats["slept_while_busy"] == 0
        # Six requests from two processes, all in the controller's registry.
        wait_for(
            lambda: (
                metric(llmux.url, 'llmux_requests_total{model="a",status="200"}') == 3
                and metric(llmux.url, 'llmux_requests_total{model="b",status="200"}') == 2
            )
        )
        status_report = httpx.get(llmux.url + "/llmux/status").json()
        assert status_report["active_model"] == "b"
    finally:
        assert llmux.stop() == 0


def test_a_worker_killed_mid_stream_releases_its_slot_and_is_started_again(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.2, token_interval=0.05)
    config = write_config(tmp_path, fake_model_block(a) + fake_model_block(b), server=WORKERS)
    llmux = LlmuxProcess(config)
    try:
        before = worker_pids(llmux)
        streams: list = []
        runners = [
            threading.Thread(target=stream, args=(llmux.url, "a", 100, streams)) for _ in range(4)
        ]
        for runner in runners:
            runner.start()
        wait_for(lambda: metric(llmux.url, 'llmux_model_in_flight{model="a"}') == 4)
        victim = busiest(before, a.port)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(llmux)) == 2 and victim not in worker_pids(llmux))
        # The killed worker's streams are cut; its slots are free: the switch to b needs
        # only the survivors' streams to end, not the dead worker's.
        wait_for(lambda: metric(llmux.url, 'llmux_model_in_flight{model="a"}') < 4)
        answer = httpx.post(llmux.url + "/v1/chat/completions", json=chat("b"), timeout=60)
        assert answer.status_code == 200
        for runner in runners:
            runner.join()
        assert metric(llmux.url, 'llmux_model_in_flight{model="a"}') == 0
        assert ("cut", b"") in streams  # the dead worker's streams end broken, not complete
        assert "worker_restarted" in llmux.log
    finally:
        assert llmux.stop() == 0


def test_a_reload_reaches_every_worker_before_it_is_logged(fakes, tmp_path):
    """A revoked key is refused on every connection from the moment the reload is logged."""
    (a,) = fakes.start("a")
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-old\n")
    config = write_config(
        tmp_path, fake_model_block(a), server=WORKERS, top='',
    )  # fmt: skip
    config.write_text(config.read_text() + '\n[auth]\napi_keys_file = "keys.txt"\n')
    llmux = LlmuxProcess(config)
    try:
        old = {"authorization": "Bearer sk-old"}
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            answer = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), headers=old)
            assert answer.status_code == 200
        keys.write_text("sk-new\n")
        llmux.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in llmux.log)
        for _ in range(10):
            answer = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), headers=old)
            assert answer.status_code == 401
        new = {"authorization": "Bearer sk-new"}
        answer = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), headers=new)
        assert answer.status_code == 200
    finally:
        assert llmux.stop() == 0


def test_sigterm_drains_every_worker_then_all_processes_exit(fakes, tmp_path):
    (a,) = fakes.start("a", token_interval=0.05)
    config = write_config(tmp_path, fake_model_block(a), server=WORKERS)
    llmux = LlmuxProcess(config)
    pids = worker_pids(llmux)
    streamed: list = []
    runner = threading.Thread(target=stream, args=(llmux.url, "a", 30, streamed))
    runner.start()
    wait_for(lambda: metric(llmux.url, 'llmux_model_in_flight{model="a"}') == 1)
    llmux.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), timeout=10)
    assert late.status_code == 503
    runner.join()
    status, body = streamed[0]
    assert status == 200 and body.count(b"data: {") == 31
    assert llmux.stop() == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"worker {pid} outlived llmux"


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_must_be_positive(tmp_path, workers):
    from llmux.config import ConfigError, load_config

    path = write_config(tmp_path, "[models.a]\nport = 9\nwake = 'true'\nsleep = 'true'\n",
                        server={"workers": workers})  # fmt: skip
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_config(path)


def test_queue_limits_and_timeouts_answer_as_in_one_process(fakes, tmp_path):
    """The queue lives in the controller: a full queue and a request that waits too long get
    the same answers through a worker (503 queue_full with Retry-After, 504)."""
    (a,) = fakes.start("a", wake_delay=2.0)
    config = write_config(
        tmp_path, fake_model_block(a), server={**WORKERS, "max_queue_per_model": 1},
        policy={"request_timeout_secs": 1},
    )  # fmt: skip
    llmux = LlmuxProcess(config)
    try:
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(
                httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), timeout=30)
            )

        first = threading.Thread(target=ask)
        first.start()  # it waits for a's 2 s wake, and times out after 1 s
        wait_for(lambda: metric(llmux.url, 'llmux_request_queue_depth{model="a"}') == 1)
        full = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"), timeout=30)
        first.join()
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert "retry-after" in full.headers
        assert answers[0].status_code == 504
    finally:
        assert llmux.stop() == 0


# ----- a stuck worker (SIGSTOP) bounds nothing it should not -----

DRAIN_SECS = 1  # server.shutdown_timeout_secs in these tests
RELOAD_BOUND_SECS = 5 + 2  # supervisor.ACK_TIMEOUT_SECS, and time to read the log line
SCRAPE_BOUND_SECS = 2  # the brief a scrape answers within, whatever a worker does
STOP_BOUND_SECS = DRAIN_SECS + 5  # shutdown_timeout_secs + 5 s
KEY = "sk-test"


@contextmanager
def frozen(pid: int) -> Iterator[int]:
    """Worker `pid` stopped (SIGSTOP) for the block, and killed after it whatever happened; by a
    pidfd, so that no other process that reused the pid is signalled. Yields the pidfd (it
    reads ready once the process has exited)."""
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        yield pidfd
    finally:
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)


def exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def big_config(models: str) -> str:
    """A config whose message to a worker cannot fit in a socket buffer: a send to a worker
    that does not read blocks (thousands of API keys, as in the report)."""
    keys = [KEY] + [f"sk-{index:060d}" for index in range(8000)]
    text = (
        f"[server]\nworkers = 2\nshutdown_timeout_secs = {DRAIN_SECS}\n"
        f"[auth]\napi_keys = {json.dumps(keys)}\n{models}"
    )
    with socket.socket(socket.AF_UNIX) as probe:
        assert len(text) > 2 * probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return text


def stuck_worker_setup(fakes, tmp_path) -> LlmuxProcess:
    """llmux with two workers; its config file is then replaced by a big one, read at the
    next SIGHUP."""
    (a,) = fakes.start("a")
    models = fake_model_block(a)
    big = big_config(models)
    config = write_config(tmp_path, models, server={**WORKERS, "shutdown_timeout_secs": DRAIN_SECS})
    llmux = LlmuxProcess(config)
    config.write_text(big)
    return llmux


def timed_get(url: str, path: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        answer = httpx.get(url + path, headers={"authorization": f"Bearer {KEY}"},
                           timeout=SCRAPE_BOUND_SECS + 3)  # fmt: skip
    except httpx.TimeoutException:
        return 0, time.monotonic() - started
    return answer.status_code, time.monotonic() - started


def test_a_reload_with_a_stuck_worker_completes_and_replaces_it(fakes, tmp_path):
    """The stuck worker cannot take the new config: it is killed and started again (with the
    config in force), and the reload is logged within its bound."""
    llmux = stuck_worker_setup(fakes, tmp_path)
    try:
        victim = min(worker_pids(llmux))
        with frozen(victim) as pidfd:
            started = time.monotonic()
            llmux.proc.send_signal(signal.SIGHUP)
            with suppress(AssertionError):
                wait_for(lambda: "config_reloaded" in llmux.log, RELOAD_BOUND_SECS)
            took = time.monotonic() - started
            assert "config_reloaded" in llmux.log, f"no config_reloaded after {took:.1f} s"
            wait_for(lambda: exited(pidfd))  # killed, not left stopped
        wait_for(lambda: len(worker_pids(llmux)) == 2 and victim not in worker_pids(llmux))
        assert "worker_restarted" in llmux.log
        for _ in range(6):  # new connections reach both workers: each has the new config
            refused = httpx.post(llmux.url + "/v1/chat/completions", json=chat("a"))
            assert refused.status_code == 401
    finally:
        assert llmux.stop(timeout=STOP_BOUND_SECS + 5) == 0


def test_a_scrape_answers_in_time_while_a_worker_is_stuck(fakes, tmp_path):
    """A reload is stuck on the stopped worker (its config does not fit the socket buffer);
    /metrics and /llmux/status still answer within 2 s, with the counts they have."""
    llmux = stuck_worker_setup(fakes, tmp_path)
    try:
        paths = ("/metrics", "/llmux/status")  # each with one of the two first workers stopped
        for pid, path in zip(sorted(worker_pids(llmux)), paths, strict=True):
            with frozen(pid):
                llmux.proc.send_signal(signal.SIGHUP)
                time.sleep(0.5)  # the reload's send to the stopped worker is blocked now
                status, took = timed_get(llmux.url, path)
                assert status == 200 and took < SCRAPE_BOUND_SECS, (
                    f"{path}: {status} in {took:.1f} s"
                )
    finally:
        assert llmux.stop(timeout=STOP_BOUND_SECS + 5) == 0


def test_sigterm_with_a_stuck_worker_stops_llmux_within_the_drain_bound(fakes, tmp_path):
    """A reload is stuck on the stopped worker when SIGTERM comes: llmux still exits within
    shutdown_timeout_secs + 5 s, its workers with it."""
    llmux = stuck_worker_setup(fakes, tmp_path)
    pids = worker_pids(llmux)
    with frozen(min(pids)) as pidfd:
        llmux.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "received SIGHUP" in llmux.log)
        time.sleep(0.5)
        started = time.monotonic()
        llmux.proc.send_signal(signal.SIGTERM)
        try:
            code = llmux.proc.wait(timeout=STOP_BOUND_SECS + 5)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        llmux.stop(timeout=1)  # kills it if it is still there; the log is complete
        assert code == 0 and took < STOP_BOUND_SECS, f"exit status {code} after {took:.1f} s"
        assert exited(pidfd)
    for pid in pids:
        assert not process_running(pid), f"worker {pid} outlived llmux"


# ----- restarts -----


def test_a_worker_that_died_is_not_started_again_during_the_drain(fakes, tmp_path):
    """SIGTERM comes while a dead worker waits to be started again: it stays down (nothing
    would tell a new one to drain), and the drain of the other goes on."""
    (a,) = fakes.start("a", token_interval=0.05)
    config = write_config(
        tmp_path, fake_model_block(a), server={**WORKERS, "shutdown_timeout_secs": 10}
    )
    llmux = LlmuxProcess(config)
    try:
        pids = worker_pids(llmux)
        streamed: list = []
        runner = threading.Thread(target=stream, args=(llmux.url, "a", 40, streamed))
        runner.start()  # two seconds of stream: the drain lasts that long
        wait_for(lambda: metric(llmux.url, 'llmux_model_in_flight{model="a"}') == 1)
        carrier = busiest(pids, a.port)
        (victim,) = pids - {carrier}
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "worker_restarted" in llmux.log)  # it waits its pause (0.5 s) now
        llmux.proc.send_signal(signal.SIGTERM)
        seen: set[int] = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen |= worker_pids(llmux)
            time.sleep(0.02)
        assert seen <= {carrier}, f"started during the drain: {seen - {carrier}}"
        runner.join()
        status, body = streamed[0]
        assert status == 200 and body.count(b"data: {") == 41
    finally:
        assert llmux.stop() == 0


async def test_a_worker_that_cannot_start_again_is_retried_with_a_growing_pause(
    fakes, tmp_path, monkeypatch
):
    """After one good start, its starts fail (say its binary was replaced by a broken one):
    it is tried again after 0.5 s, then 1, 2, 4 ... up to 30 s between tries, not every
    0.5 s; once it can start again, it serves again."""
    from llmux.workers import supervisor

    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a))
    monkeypatch.setattr(supervisor, "RESTART_PAUSE_SECS", 0.1)  # 0.1, 0.2, 0.4, 0.8, ...
    async with llmux_running(path, workers=2) as (server, client):
        assert server.supervisor is not None
        good_command = supervisor.worker_command
        tries: list[float] = []

        def broken_command() -> list[str]:
            tries.append(trio.current_time())
            return [sys.executable, "-c", "raise SystemExit(3)"]

        monkeypatch.setattr(supervisor, "worker_command", broken_command)
        victim = server.supervisor.pids()[0]
        os.kill(victim, signal.SIGKILL)
        await trio.sleep(2.5)
        gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
        assert 3 <= len(tries) <= 5, gaps  # every 0.1 s, it would be about 20 tries
        assert all(gap >= 0.2 * 2**index for index, gap in enumerate(gaps)), gaps
        monkeypatch.setattr(supervisor, "worker_command", good_command)
        with trio.fail_after(10):
            while len(server.supervisor.pids()) < 2 or victim in server.supervisor.pids():
                await trio.sleep(0.05)
        assert (await client.get("/health")).status_code == 200


async def test_a_worker_still_starting_is_not_taken_for_a_stuck_one(fakes, tmp_path, monkeypatch):
    """A worker started again takes its time (here 2 s) before it reads its config, which is
    too big for the socket buffer: a scrape meanwhile leaves it out (it has no counts yet)
    instead of killing it, and a reload waits for it."""
    from llmux.workers import supervisor

    (a,) = fakes.start("a")
    path = tmp_path / "config.toml"
    path.write_text(big_config(fake_model_block(a)))
    key = {"authorization": f"Bearer {KEY}"}
    async with llmux_running(path, workers=2) as (server, client):
        assert server.supervisor is not None
        pids = server.supervisor.pids
        good_command = supervisor.worker_command
        slow_command = ["sh", "-c", 'sleep 2; exec "$@"', "sh", *good_command()]
        monkeypatch.setattr(supervisor, "worker_command", lambda: slow_command)
        victim = pids()[0]
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(5):
            while len(pids()) < 2 or victim in pids():
                await trio.sleep(0.05)
        workers_now = set(pids())
        started = trio.current_time()
        scrape = await client.get("/metrics", headers=key)
        assert scrape.status_code == 200 and trio.current_time() - started < SCRAPE_BOUND_SECS
        assert await server.reload()
        assert server.supervisor.restarts == 1 and workers_now <= set(pids())  # none killed
        assert (await client.get("/health")).status_code == 200
