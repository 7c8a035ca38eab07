"""One data-plane process (`[server] workers`): accepts on the listening socket it inherited,
carries requests and streams, and asks the controller for everything that decides.

What it does itself: the edge (routes, auth, limits, reading the body to its `model`) and the
proxying. What it asks the controller, over its channel: a slot on a model (and its release),
and every answer llmux gives itself (/health, /metrics, /llmux/status, /v1/models, the admin
API), which the controller's own app answers. Its per-request counts go to the controller in
batches (`ForwardedMetrics`), whose registry is the only one. A reload's config arrives over
the channel, whole (the controller's own object), and is acknowledged before the controller
logs `config_reloaded`. It ignores the signals a terminal or `kill` sends its group: the
controller tells it when to drain and stop, and it exits when its channel closes.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from llmux.config import Config
from llmux.http.app import LlmuxApp
from llmux.http.asgi import Receive, Scope, Send
from llmux.http.listener import ConnectionBounds, Listener, hypercorn_config
from llmux.http.routes import RouteMatch
from llmux.workers.channel import Channel, ChannelClosed, pack, pack_headers, unpack, unpack_headers
from llmux.workers.slots import RemoteFleet

METRICS_FLUSH_SECS = 0.05  # a worker's counts reach the controller's registry this late at most


def encode_config(config: Config) -> str:
    """The controller's config, exactly (chosen ports, keys read from files, overrides)."""
    return pack(pickle.dumps(config))


def decode_config(text: str) -> Config:
    return pickle.loads(unpack(text))  # from our own controller, over our socket pair


class _ForwardedMetric:
    """A metric of the controller's registry, seen from a worker: calls are batched to it."""

    def __init__(self, name: str, ops: list[list[Any]], labels: tuple[str, ...] = ()) -> None:
        self._name = name
        self._ops = ops
        self._labels = labels

    def labels(self, *values: str) -> _ForwardedMetric:
        return _ForwardedMetric(self._name, self._ops, tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0) -> None:
        self._ops.append([self._name, list(self._labels), "inc", amount])

    def observe(self, value: float) -> None:
        self._ops.append([self._name, list(self._labels), "observe", value])

    def set(self, value: float) -> None:
        self._ops.append([self._name, list(self._labels), "set", value])


FORWARDED_METRICS = (
    "requests_total",
    "internal_errors",
    "request_duration",
    "backend_timeouts",
    "client_send_timeouts",
    "connections_open",
    "connections_refused",
)


class ForwardedMetrics:
    """The metrics a worker's app and listener touch, sent to the controller in batches."""

    def __init__(self) -> None:
        self.ops: list[list[Any]] = []
        for name in FORWARDED_METRICS:
            setattr(self, name, _ForwardedMetric(name, self.ops))

    def take(self) -> list[list[Any]]:
        ops, self.ops[:] = list(self.ops), []
        return ops


class WorkerApp(LlmuxApp):
    """The proxy with a RemoteFleet: same edge, same data plane, no switcher of its own."""

    def __init__(self, config: Config, remote: RemoteFleet, metrics: ForwardedMetrics) -> None:
        super().__init__(config, remote, metrics)
        self.remote = remote
        self._stop = trio.Event()

    async def _answer_here(
        self, match: RouteMatch, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Ask the controller's app, which answers these from the switcher's own state."""
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": pack(scope.get("raw_path") or b""),
            "query_string": pack(scope.get("query_string", b"")),
            "headers": pack_headers(scope["headers"]),
            "body": pack(body),
        }
        answer = await self.remote.ask({"op": "control", "request": request})
        if "control" not in answer:
            status, headers, content = 503, [(b"content-type", b"application/json")], b"{}"
        else:
            control = answer["control"]
            status = control["status"]
            headers = unpack_headers(control["headers"])
            content = unpack(control["body"])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def stop_when_drained(self) -> None:
        self._stop.set()

    async def shutdown_trigger(self) -> None:
        """Once the controller says so: new requests get 503 from it; this worker's requests
        in flight finish (the controller bounds the drain), then its listener closes."""
        await self._stop.wait()
        while self.remote.in_flight:
            await self.remote.wait_for_release()


async def run_worker(listen_fd: int, channel_fd: int) -> None:
    channel = Channel(trio.socket.socket(fileno=channel_fd))
    hello = await channel.receive()
    config = decode_config(hello["config"])
    remote = RemoteFleet(channel)
    metrics = ForwardedMetrics()
    app = WorkerApp(config, remote, metrics)

    def on_message(message: dict[str, Any]) -> None:
        if message.get("op") == "config":
            app.apply_config(decode_config(message["config"]))
            remote.send_soon({"op": "config_applied", "serial": message["serial"]})
        elif message.get("op") == "shutdown":
            app.stop_when_drained()
        elif message.get("op") == "flush":  # a scrape: every count so far, then say so
            if metrics.ops:
                remote.send_soon({"op": "metrics", "ops": metrics.take()})
            remote.send_soon({"op": "flushed", "serial": message["serial"]})

    remote.on_other = on_message
    sock = socket.socket(fileno=listen_fd)

    # server.max_connections is llmux's, not each worker's: each takes its share.
    share = -(-config.server.max_connections // config.server.workers)
    bounds = ConnectionBounds(share, config.server.client_send_timeout_secs)
    listener = Listener(app, hypercorn_config(config.server), bounds, metrics)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        nursery.start_soon(_flush_metrics, metrics, remote.send_soon)
        nursery.start_soon(app.watchdog.run)

        async def listen(task_status: trio.TaskStatus[str]) -> None:
            await listener.serve(sock, app.shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()

        async def exit_when_controller_gone() -> None:
            await remote.gone.wait()
            nursery.cancel_scope.cancel()  # its slots are released already: nothing to drain

        await nursery.start(listen)
        nursery.start_soon(exit_when_controller_gone)
        remote.send_soon({"op": "ready"})
    if metrics.ops and not remote.gone.is_set():  # the last requests' counts
        with contextlib.suppress(ChannelClosed):
            await channel.send({"op": "metrics", "ops": metrics.take()})
    await app.upstream.aclose()


async def _flush_metrics(
    metrics: ForwardedMetrics, send_soon: Callable[[dict[str, Any]], None]
) -> None:
    while True:
        await trio.sleep(METRICS_FLUSH_SECS)
        if metrics.ops:
            send_soon({"op": "metrics", "ops": metrics.take()})


def worker_main(listen_fd: int, channel_fd: int) -> int:
    """`llmux _worker`: started by the controller, never by hand."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    trio.run(run_worker, listen_fd, channel_fd)
    return 0
