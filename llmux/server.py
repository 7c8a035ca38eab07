"""Run the app under hypercorn on trio: one nursery owns the switcher, the listener and signals.

Shutdown (SIGTERM/SIGINT, or `request_shutdown()`): the listener keeps answering, new requests get
503, queued ones get 503 at once, in-flight ones get up to `shutdown_timeout_secs` to finish; then
the listener closes and the switcher's tasks (and any hook still running) are cancelled.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from llmux.app import LlmuxApp
from llmux.config import Config
from llmux.policy import Policy

log = logging.getLogger("llmux.server")

KEEP_ALIVE_SECS = 75.0  # longer than common client pool expiry (5 s) to avoid the close race


@dataclass
class RunningServer:
    app: LlmuxApp
    url: str

    def request_shutdown(self) -> None:
        self.app.request_shutdown()


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = KEEP_ALIVE_SECS
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
                hypercorn_config(config.host, config.port),
                shutdown_trigger=app.shutdown_trigger,
                task_status=task_status,
            )
        finally:
            listener_closed.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(app.switcher.run)
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
) -> None:
    """`llmux serve`: run until SIGTERM or SIGINT, then shut down gracefully and return."""
    # The receiver stays open until we return: a second signal must not kill us mid-drain.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with running_server(config, policy) as server:
            log.info("llmux listening on %s", server.url)
            if on_ready is not None:
                on_ready(server)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
