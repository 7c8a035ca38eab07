"""Run the app under hypercorn on trio: one nursery owns the switcher, the listener and signals.

Shutdown (SIGTERM/SIGINT, or `request_shutdown()`): the listener keeps answering, new requests get
503, queued ones get 503 at once, in-flight ones get up to `shutdown_timeout_secs` to finish; then
the listener closes and the switcher's tasks (and any hook still running) are cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from llmux.app import LlmuxApp
from llmux.config import Config, ServerConfig
from llmux.policy import Policy
from llmux.systemd import Notifier, raise_open_files_limit

log = logging.getLogger("llmux.server")

WATCH_INTERVAL_SECS = 1.0
SETTLE_SECS = 0.2


@dataclass
class RunningServer:
    app: LlmuxApp
    url: str

    def request_shutdown(self) -> None:
        self.app.request_shutdown()


def hypercorn_config(host: str, port: int, server: ServerConfig) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # One timer bounds both an idle keep-alive connection and a request head that trickles in
    # (hypercorn counts a connection as idle until the whole head has arrived). Keep it longer
    # than clients' pool expiry (often 5 s) to avoid the close race.
    config.keep_alive_timeout = server.request_head_timeout_secs
    config.h11_max_incomplete_size = server.max_header_bytes
    config.graceful_timeout = 1.0  # llmux drains before the listener closes; this is a backstop
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


@asynccontextmanager
async def running_server(
    config: Config, policy: Policy | None = None
) -> AsyncIterator[RunningServer]:
    """Start llmux inside the caller's trio run; leaving the block shuts it down gracefully."""
    app = LlmuxApp(config, policy)
    listener_closed = trio.Event()

    async def listen(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn.trio.serve(
                app,
                hypercorn_config(config.host, config.port, config.server),
                shutdown_trigger=app.shutdown_trigger,
                task_status=task_status,
            )
        finally:
            listener_closed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(app.fleet.run)
        urls = await nursery.start(listen)
        try:
            yield RunningServer(app=app, url=urls[0])
        finally:
            app.request_shutdown()
            # hypercorn returns once the trigger has drained and the listener is closed; then
            # the switcher's tasks, and any hook still running, are cancelled.
            await listener_closed.wait()
            await app.upstream.aclose()
            nursery.cancel_scope.cancel()


async def serve_forever(
    config: Config,
    policy: Policy | None = None,
    on_ready: Callable[[RunningServer], None] | None = None,
    watch_config: bool = False,
) -> None:
    """`llmux serve`: run until SIGTERM or SIGINT, then shut down gracefully and return.
    SIGHUP (and, with `watch_config`, a change of the file) reloads the config."""
    notifier = Notifier()
    raise_open_files_limit()
    # The receiver stays open until we return: a second signal must not kill us mid-drain.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as helpers:
            if notifier.watchdog_interval:
                helpers.start_soon(_ping_watchdog, notifier, notifier.watchdog_interval)
            async with running_server(config, policy) as server:
                log.info("llmux listening on %s", server.url)
                notifier.send("READY=1", f"STATUS={describe_state(server.app)}")
                helpers.start_soon(_report_status, server.app, notifier)
                if watch_config:
                    helpers.start_soon(_reload_on_change, server.app, WATCH_INTERVAL_SECS)
                if on_ready is not None:
                    on_ready(server)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: reloading %s", server.app.config.path)
                        server.app.reload()
                        continue
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    break
                notifier.send("STOPPING=1", "STATUS=draining in-flight requests")
            helpers.cancel_scope.cancel()
    notifier.close()


def describe_state(app: LlmuxApp) -> str:
    """One line for systemd's STATUS=: what is awake, or what is happening."""
    switches = app.fleet.current_switches.values()
    if switches:
        return "; ".join(f"switching {s.from_label} -> {s.target}" for s in switches)
    active = [m.name for m in app.fleet.models.values() if m.state == "active"]
    return f"active: {', '.join(active)}" if active else "idle: no model awake"


async def _report_status(app: LlmuxApp, notifier: Notifier) -> None:
    last = describe_state(app)
    while True:
        await app.fleet.wait_for_change()
        now = describe_state(app)
        if now != last:
            notifier.send(f"STATUS={now}")
            last = now


async def _ping_watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


async def _reload_on_change(app: LlmuxApp, interval: float) -> None:
    """`--watch-config`: reload when the file's identity, size or mtime changes."""

    def fingerprint() -> tuple[int, int, int] | None:
        try:
            stat = os.stat(app.config.path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    seen = fingerprint()
    while True:
        await trio.sleep(interval)
        now = fingerprint()
        if now is not None and now != seen:
            await trio.sleep(SETTLE_SECS)  # let an editor finish writing
            seen = fingerprint()
            log.info("%s changed: reloading", app.config.path)
            app.reload()
