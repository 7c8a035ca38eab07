"""The controller's side of `[server] workers`: starts the data-plane processes, serves their
channels, and keeps them running.

Each worker is this same program (`llmux _worker`, the one-file binary included) started with
two inherited descriptors: the listening socket the controller bound (the kernel spreads new
connections over the processes that accept on it) and its end of a socket pair. A worker that
exits or dies closes its channel: its slots are released at once (slots.py) and it is started
again. One that is stuck is treated as dead and killed: every wait on a worker is bounded (a
message it cannot take in time breaks its channel off, see channel.py; an acknowledgement
waits ACK_TIMEOUT_SECS or FLUSH_TIMEOUT_SECS), so no stuck worker holds up a reload, a scrape
or a shutdown. A reload reaches every worker, acknowledged, before the controller logs it. At
shutdown the workers are told to drain; the controller waits for them to exit before it does
(the one-file binary's bootloader removes its unpacked files when the controller exits), and
kills what is left after the drain and EXIT_GRACE_SECS.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from llmux.http.app import LlmuxApp
from llmux.observe.logs import current_setup, log_event
from llmux.workers.channel import (
    Channel,
    ChannelClosed,
    pack,
    pack_headers,
    unpack,
    unpack_headers,
)
from llmux.workers.slots import SlotService
from llmux.workers.worker import encode_config

log = logging.getLogger("llmux.workers")

RESTART_PAUSE_SECS = 0.5  # before a worker that exited is started again
MAX_RESTART_PAUSE_SECS = 30.0  # the pause doubles for each start in a row that fails, to this
START_TIMEOUT_SECS = 30.0  # a worker says it accepts within this long of its start, or is killed
ACK_TIMEOUT_SECS = 5.0  # a reload waits this long for each worker's acknowledgement
FLUSH_TIMEOUT_SECS = 1.0  # a scrape waits this long for each worker's counts
# After the drain: time for workers to exit. The second left of the 5 s that SIGTERM promises
# (docs/operations/running.md) kills what is left and lets the controller exit.
EXIT_GRACE_SECS = 4.0
FLUSHED_FIRST = ("/metrics", "/llmux/status")  # answers that read the workers' counts


class WorkerStartFailed(Exception):
    """A worker exited before it accepted a connection (its error is in the log above)."""


def worker_command() -> list[str]:
    """How to start a worker (through the one-file binary itself when frozen), logging as
    this process does."""
    program = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "llmux"]
    logs = ["--log-level", current_setup["level"], "--log-format", current_setup["format"]]
    return [*program, "_worker", *logs]


@dataclass(eq=False)
class _Worker:
    index: int
    channel: Channel | None = None
    process: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)  # its first start accepts
    up: trio.Event = field(default_factory=trio.Event)  # the process running now accepts
    acked: dict[int, trio.Event] = field(default_factory=dict)
    connections_open: float = 0.0


class Supervisor:
    def __init__(self, app: LlmuxApp, listener: socket.socket, count: int) -> None:
        self.app = app
        self._listener = listener
        self._workers = [_Worker(i) for i in range(count)]
        self._serials = itertools.count(1)
        self._stopping = trio.Event()
        self.restarts = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, report started once all accept, keep them running."""
        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(self._keep_running, worker)
            for worker in self._workers:
                await worker.ready.wait()
            task_status.started()

    async def _keep_running(self, worker: _Worker) -> None:
        """Start the worker again whenever it exits, dies or is killed as stuck, until stop().
        While its starts fail (it exits before it accepts), the pause doubles: a worker that
        cannot start is not spun, and is tried again for as long as llmux runs."""
        pause = RESTART_PAUSE_SECS
        while not self._stopping.is_set():
            served, ended = await self._run_once(worker)
            if self._stopping.is_set():
                return
            if not worker.ready.is_set():  # its first start failed: llmux does not start
                raise WorkerStartFailed(f"worker {worker.index} {ended} before it could serve")
            pause = RESTART_PAUSE_SECS if served else min(2 * pause, MAX_RESTART_PAUSE_SECS)
            self.restarts += 1
            log_event(
                log, "worker_restarted",
                f"worker {worker.index} {ended}; starting it again in {pause:g} s",
                logging.ERROR, worker=worker.index, pause=pause,
            )  # fmt: skip
            with trio.move_on_after(pause):
                await self._stopping.wait()

    async def _run_once(self, worker: _Worker) -> tuple[bool, str]:
        """One worker process, from its start to its end: whether it came to accept, and how
        it ended."""
        ours, theirs = socket.socketpair()
        try:
            command = [
                *worker_command(), "--listen-fd", str(self._listener.fileno()),
                "--channel-fd", str(theirs.fileno()),
            ]  # fmt: skip
            process = await trio.lowlevel.open_process(
                command, pass_fds=(self._listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            theirs.close()
        worker.process = process
        channel = Channel(trio.socket.from_stdlib_socket(ours))
        worker.channel = channel
        up = worker.up = trio.Event()
        service = SlotService(
            self.app.fleet, on_other=lambda message: self._heard(worker, message),
            answer=self._answer,
        )  # fmt: skip
        try:
            if self._stopping.is_set():  # started as llmux began to stop: not to serve
                channel.break_off("llmux is stopping")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._break_off_unless_up, channel, up)
                with contextlib.suppress(ChannelClosed):
                    hello = {"op": "config", "config": encode_config(self.app.config)}
                    await channel.send(hello, timeout=START_TIMEOUT_SECS)  # it reads once started
                    await service.serve(channel)  # until the worker exits, dies or is broken off
                nursery.cancel_scope.cancel()
        finally:
            worker.channel = None
            for acknowledged in worker.acked.values():  # nothing more to wait for from it
                acknowledged.set()
            self._forget_connections(worker)
            with trio.CancelScope(shield=True):
                await self._reap(process, channel)
        ended = "exited" if channel.broken is None else f"was stuck ({channel.broken}): killed"
        return up.is_set(), ended

    @staticmethod
    async def _break_off_unless_up(channel: Channel, up: trio.Event) -> None:
        with trio.move_on_after(START_TIMEOUT_SECS):
            await up.wait()
        if not up.is_set():
            channel.break_off(f"it did not accept within {START_TIMEOUT_SECS:g} s of its start")

    @staticmethod
    async def _reap(process: trio.Process, channel: Channel) -> None:
        """A worker given up on is killed at once; one that closed its channel is on its way
        out, and gets EXIT_GRACE_SECS to exit."""
        await channel.aclose()
        if channel.broken is None:
            with trio.move_on_after(EXIT_GRACE_SECS):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()

    def _heard(self, worker: _Worker, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "ready":
            worker.ready.set()
            worker.up.set()
        elif op in ("config_applied", "flushed"):
            event = worker.acked.get(message["serial"])
            if event is not None:
                event.set()
        elif op == "metrics":
            self._apply_metrics(worker, message["ops"])

    def _apply_metrics(self, worker: _Worker, ops: list[list[Any]]) -> None:
        metrics = self.app.metrics
        for name, labels, method, value in ops:
            if name == "connections_open":
                worker.connections_open = value
                metrics.connections_open.set(sum(w.connections_open for w in self._workers))
                continue
            metric = getattr(metrics, name, None)
            if metric is None:
                continue
            target = metric.labels(*labels) if labels else metric
            getattr(target, method)(value)

    def _forget_connections(self, worker: _Worker) -> None:
        worker.connections_open = 0.0
        self.app.metrics.connections_open.set(sum(w.connections_open for w in self._workers))

    async def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a worker's /metrics, /llmux/status, /v1/models, /health or admin request
        through the controller's own app."""
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request["method"], "scheme": "http", "path": request["path"],
            "raw_path": unpack(request["raw_path"]),
            "query_string": unpack(request["query_string"]),
            "headers": unpack_headers(request["headers"]),
            "client": None, "server": None,
        }  # fmt: skip
        body = unpack(request["body"])
        if request["path"] in FLUSHED_FIRST:
            await self.gather_counts()
        sent = trio.Event()
        asked = False
        answer: dict[str, Any] = {"status": 500, "headers": [], "body": ""}
        content = bytearray()

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await sent.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = pack_headers(message["headers"])
            elif message["type"] == "http.response.body":
                content.extend(message.get("body", b""))
                if not message.get("more_body"):
                    sent.set()

        await self.app(scope, receive, send)
        answer["body"] = pack(bytes(content))
        return answer

    async def gather_counts(self) -> None:
        """Every worker's counts so far, in the registry before a scrape is answered (each
        sends its batch, then `flushed`; one channel keeps them in order). A worker that has
        not answered within FLUSH_TIMEOUT_SECS is left out: the scrape answers with the rest."""
        message = {"op": "flush", "serial": next(self._serials)}
        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                if worker.up.is_set():  # one still starting has no counts
                    nursery.start_soon(self._await_ack, worker, message, FLUSH_TIMEOUT_SECS, False)

    async def send_config(self) -> None:
        """The config in force now, to every worker; returns once each has acknowledged it.
        A worker that has not within ACK_TIMEOUT_SECS is stuck: it is killed, and started again
        with the config in force (no worker goes on with the config replaced)."""
        config = encode_config(self.app.config)
        message = {"op": "config", "config": config, "serial": next(self._serials)}
        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                # One still starting reads its messages once it has started: it has that long.
                timeout = ACK_TIMEOUT_SECS if worker.up.is_set() else START_TIMEOUT_SECS
                nursery.start_soon(self._await_ack, worker, message, timeout, True)

    async def _await_ack(
        self, worker: _Worker, message: dict[str, Any], timeout: float, required: bool
    ) -> None:
        """Send `message` and wait for its acknowledgement, `timeout` in all. A worker that
        cannot take it in time is given up on; one that took it and has not answered, only if
        the answer is `required`."""
        channel = worker.channel
        if channel is None:
            return  # restarting: it starts with the config in force and no counts
        serial = message["serial"]
        event = worker.acked[serial] = trio.Event()
        deadline = trio.current_time() + timeout
        try:
            await channel.send(message, timeout=timeout)
            with trio.move_on_at(deadline):
                await event.wait()
        except ChannelClosed:
            return  # gone, or broken off: it is killed and started again
        finally:
            worker.acked.pop(serial, None)
        if event.is_set():
            return
        if required:
            channel.break_off(f"it did not acknowledge {message['op']} within {timeout:g} s")
        elif channel.broken is None:
            log.warning(
                "worker %d did not answer %s within %g s: going on without it",
                worker.index, message["op"], timeout,
            )  # fmt: skip

    async def stop(self, grace: float) -> None:
        """Tell every worker to drain and stop; wait for them (the drain's own time, then
        EXIT_GRACE_SECS), and kill what is left. A worker that cannot take the word in time is
        killed at once (its channel is broken off)."""
        self._stopping.set()
        with trio.move_on_after(grace + EXIT_GRACE_SECS):
            async with trio.open_nursery() as nursery:
                for worker in self._workers:
                    nursery.start_soon(self._stop_one, worker)
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
                await worker.process.wait()

    @staticmethod
    async def _stop_one(worker: _Worker) -> None:
        process, channel = worker.process, worker.channel
        if channel is not None:
            with contextlib.suppress(ChannelClosed):
                await channel.send({"op": "shutdown"})
        if process is not None:
            await process.wait()

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process and w.process.returncode is None]
