"""Run llmux: claim the instance, then one nursery owns the switcher, the listener and signals.

Start-up (see instance.py): the state folder is checked, both instance locks are taken and the
port is bound before any hook runs; only then are survivors stopped and backends reconciled.

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
from dataclasses import dataclass, field

import trio

from llmux.config import Config
from llmux.core.costs import SwitchCostTracker
from llmux.http.app import LlmuxApp
from llmux.http.listener import ConnectionBounds, Listener, hypercorn_config
from llmux.observe.metrics import Metrics
from llmux.policies.interface import Policy
from llmux.policies.loader import policy_factory
from llmux.runtime.fleet import Fleet
from llmux.runtime.gpus import GpuMemory, NvmlBackend
from llmux.runtime.instance import BacklogCap, InstanceGuard, claim_instance, raise_backlog_cap
from llmux.runtime.state_dir import StateDir, open_state_dir, state_dir_path
from llmux.runtime.systemd import Notifier, raise_open_files_limit
from llmux.testing.fake_nvml import fake_nvml_from_env
from llmux.workers.supervisor import Supervisor

log = logging.getLogger("llmux.server")

WATCH_INTERVAL_SECS = 1.0
SETTLE_SECS = 0.2


@dataclass
class RunningServer:
    app: LlmuxApp
    url: str
    supervisor: Supervisor | None = None  # with [server] workers: the data-plane processes
    # One reload at a time: each worker must get the configs in the order they were read.
    _reloading: trio.Lock = field(default_factory=trio.Lock, init=False, repr=False)

    def request_shutdown(self) -> None:
        self.app.request_shutdown()

    async def reload(self) -> bool:
        """Re-read the config; with workers, every one has it before `config_reloaded` (one
        that does not take it within supervisor.ACK_TIMEOUT_SECS is killed and restarted)."""
        async with self._reloading:
            if self.supervisor is None:
                return self.app.reload()
            summary = self.app.apply_reload()
            if summary is None:
                return False
            await self.supervisor.send_config()
            self.app.log_reload(summary)
            return True


@dataclass
class Instance:
    """What this llmux holds before anything runs: its checked state folder, its two locks and
    its bound listening socket (see instance.py for why, and in that order)."""

    state: StateDir
    guard: InstanceGuard

    def release(self) -> None:
        self.guard.release()
        self.state.close()


def start_instance(config: Config) -> Instance:
    """Open the state folder, take the locks, bind the port: raise StateDirError or
    InstanceError (one line each) if another llmux runs or anything is amiss."""
    state = open_state_dir(state_dir_path(config.server.state_dir, config.hook_dir))
    try:
        cap = raise_backlog_cap(config.server.listen_backlog)
        guard = claim_instance(
            state, config.path, config.host, config.port, config.server.listen_backlog
        )
    except BaseException:
        state.close()
        raise
    _say_backlog_cap(cap, config.server.listen_backlog)
    return Instance(state, guard)


def _say_backlog_cap(cap: BacklogCap, backlog: int) -> None:
    if cap.before is not None and cap.after != cap.before:
        log.info(
            "raised net.core.somaxconn from %d to %d for server.listen_backlog",
            cap.before, cap.after,
        )  # fmt: skip
    elif cap.limits(backlog):
        log.warning(
            "net.core.somaxconn is %d, below server.listen_backlog (%d): a burst of new "
            "connections may be dropped; raise it (sysctl -w net.core.somaxconn=%d, or "
            "deploy/sysctl-llmux.conf)", cap.after, backlog, backlog,
        )  # fmt: skip


def build_app(config: Config, policy: Policy | None, state: StateDir) -> LlmuxApp:
    """Assemble llmux: the metrics, the cost estimates, the policy of each group, the reader of
    GPU memory (NVML, or the file LLMUX_FAKE_NVML names, for tests), the fleet of switchers
    with their backend drivers, and the edge that serves from them. An instance given as
    `policy` (tests, embedding) is shared by every group."""
    metrics = Metrics(config.models)
    make_policy = (lambda: policy) if policy is not None else policy_factory(config)
    make_policy()  # fail here, before anything runs, if the policy cannot be built
    gpus = GpuMemory(fake_nvml_from_env() or NvmlBackend(), metrics)
    fleet = Fleet(config, make_policy, metrics, SwitchCostTracker(), state, gpus)
    return LlmuxApp(config, fleet, metrics)


@asynccontextmanager
async def running_server(
    config: Config, policy: Policy | None = None, instance: Instance | None = None
) -> AsyncIterator[RunningServer]:
    """Start llmux inside the caller's trio run; leaving the block shuts it down gracefully.
    Without an `instance`, one is started here (and may raise before anything runs)."""
    instance = instance or start_instance(config)
    try:
        app = build_app(config, policy, instance.state)
        bounds = ConnectionBounds(
            config.server.max_connections, config.server.client_send_timeout_secs
        )
        listener = Listener(app, hypercorn_config(config.server), bounds, app.metrics)
        sock = instance.guard.listener
        assert sock is not None
        listener_closed = trio.Event()

        async def listen(task_status: trio.TaskStatus[str]) -> None:
            try:
                await listener.serve(sock, app.shutdown_trigger, task_status=task_status)
            finally:
                listener_closed.set()

        async with trio.open_nursery() as nursery:
            # Survivors are stopped and backends asked what is awake only now: both locks are
            # held and the port is bound, so no other llmux on this config or port runs.
            await nursery.start(app.fleet.run)
            nursery.start_soon(app.watchdog.run)
            url = await nursery.start(listen)
            try:
                yield RunningServer(app=app, url=url)
            finally:
                app.request_shutdown()
                # The listener returns once the trigger has drained and it is closed; then
                # the switcher's tasks, and any hook still running, are cancelled.
                await listener_closed.wait()
                await app.upstream.aclose()
                nursery.cancel_scope.cancel()
        app.fleet.hook_registry.discard_if_idle()
    finally:
        instance.release()


@asynccontextmanager
async def running_controller(
    config: Config, policy: Policy | None, instance: Instance
) -> AsyncIterator[RunningServer]:
    """`llmux serve` with `[server] workers` above 1: this process keeps the switcher, hooks,
    policy and metrics; the workers accept on the socket bound here and carry the requests."""
    try:
        app = build_app(config, policy, instance.state)
        sock = instance.guard.listener
        assert sock is not None
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        supervisor = Supervisor(app, sock, config.server.workers)
        async with trio.open_nursery() as nursery:
            await nursery.start(app.fleet.run)
            await nursery.start(supervisor.run)
            try:
                yield RunningServer(app=app, url=url, supervisor=supervisor)
            finally:
                app.request_shutdown()
                log.info("shutting down: answering new requests 503, letting in-flight ones finish")
                timeout = app.config.server.shutdown_timeout_secs
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as stopping:
                        stopping.start_soon(supervisor.stop, timeout)
                        await app.fleet.shutdown(timeout)
                    await app.upstream.aclose()
                nursery.cancel_scope.cancel()
        app.fleet.hook_registry.discard_if_idle()
    finally:
        instance.release()


async def serve_forever(
    config: Config,
    policy: Policy | None = None,
    on_ready: Callable[[RunningServer], None] | None = None,
    watch_config: bool = False,
    instance: Instance | None = None,
) -> None:
    """`llmux serve`: run until SIGTERM or SIGINT, then shut down gracefully and return.
    SIGHUP (and, with `watch_config`, a change of the file) reloads the config."""
    notifier = Notifier()
    raise_open_files_limit()
    instance = instance or start_instance(config)
    # The receiver stays open until we return: a second signal must not kill us mid-drain.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as helpers:
            if notifier.watchdog_interval:
                helpers.start_soon(_ping_watchdog, notifier, notifier.watchdog_interval)
            serving = (
                running_controller(config, policy, instance)
                if config.server.workers > 1
                else running_server(config, policy, instance)
            )
            async with serving as server:
                log.info("llmux listening on %s", server.url)
                notifier.send("READY=1", f"STATUS={describe_state(server.app)}")
                if notifier.enabled:
                    helpers.start_soon(_report_status, server.app, notifier)
                if watch_config:
                    helpers.start_soon(_reload_on_change, server, WATCH_INTERVAL_SECS)
                if on_ready is not None:
                    on_ready(server)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: reloading %s", server.app.config.path)
                        helpers.start_soon(server.reload)  # a SIGTERM is not kept waiting
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
        await app.fleet.wait_for_lifecycle_change()
        now = describe_state(app)
        if now != last:
            notifier.send(f"STATUS={now}")
            last = now


async def _ping_watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


async def _reload_on_change(server: RunningServer, interval: float) -> None:
    """`--watch-config`: reload when the file's identity, size or mtime changes."""
    app = server.app

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
            await server.reload()
