"""The trio driver of one group: feeds the core its events and carries out its commands.

It owns the group's nursery: hooks run there as tasks (through a backend driver), one task keeps
the core's timers, and a request waiting for a slot is its own HTTP task, parked on an event the
core's `Grant` or `Refuse` sets. Every outcome, a failed or cancelled hook included, goes back to
the core as an event. Metrics and log lines of the group are made here, in one place, from the
core's `Observe` commands and from its state after each event.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from llmux.config import Config, ModelConfig
from llmux.core import events as ev
from llmux.core.commands import (
    CancelHook,
    ClearTimer,
    Command,
    Grant,
    Observe,
    ReadGpuMemory,
    Refuse,
    Reply,
    RunHook,
    SetTimer,
)
from llmux.core.costs import COLD, IDLE, SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.host_ram import HostRam
from llmux.core.records import ModelRecord, ReloadSummary, SwitchView
from llmux.core.snapshot import Snapshot
from llmux.core.states import HookName, ModelState
from llmux.core.waiting import WaitView, where_waiting
from llmux.errors import LlmuxError, QueueTimeout
from llmux.observe.logs import log_event
from llmux.observe.metrics import Metrics
from llmux.policies.interface import Policy
from llmux.runtime.backends import BackendDriver, run_on
from llmux.runtime.hooks import EXIT_CANNOT_START, HookResult

log = logging.getLogger("llmux.switcher")

SLOW_EVENT_SECS = 0.25  # an event the core takes longer than this to handle is said
SLOW_EVENT_SAID_EVERY_SECS = 60.0  # at most once a minute

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


@dataclass(frozen=True)
class Slot:
    """A granted in-flight slot: how long it queued, and the backend to send to."""

    waited: float
    backend: ModelConfig


@dataclass(eq=False)
class WaitTicket:
    """Handed to `serving()` by whoever wants to ask, while the request waits, where it stands
    in line (a waiting stream's notices): `serving()` fills it in as the request joins."""

    model: str = ""
    rid: int | None = None


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    backend: ModelConfig | None = None
    waited: float = 0.0
    error: LlmuxError | None = None


@dataclass(eq=False)
class _Answer:
    done: trio.Event = field(default_factory=trio.Event)
    error: LlmuxError | None = None


class GroupDriver:
    """One group's models, live (`config` narrowed to the group by `Config.group_config`)."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        metrics: Metrics,
        costs: SwitchCostTracker,
        backends: BackendDriver,
        host_ram: HostRam | None = None,
    ) -> None:
        self.core = GroupCore(config, policy, costs, host_ram)
        self.metrics = metrics
        self.backends = backends
        self._nursery: trio.Nursery | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._answers: dict[int, _Answer] = {}
        self._ids = itertools.count(1)
        self._timers: dict[str, float] = {}
        self._timers_changed = trio.Event()
        self._changed = trio.Event()  # after every event (a drain watches in-flight counts)
        # After a change of what is awake or switching only: what systemd's STATUS= shows.
        # Not set per request, so that its watcher costs nothing on the hot path.
        self._lifecycle_changed = trio.Event()
        self._lifecycle_shown: tuple[object, ...] = ()
        self._shown: dict[str, tuple[ModelState, int, int]] = {}
        self._switch_labels: tuple[str, str] | None = None
        self._slow_said_at = -math.inf
        self._hook_scopes: dict[int, trio.CancelScope] = {}  # running hooks, by job
        # Called when the core is done with a retired record: its server may be left behind.
        self.on_record_forgotten: Callable[[], None] | None = None
        # GiB free on some GPUs (runtime/gpus.py), for the check before a switch's wake.
        self.read_gpu_free_gb: Callable[[Sequence[int]], tuple[float, ...] | None] | None = None

    # ----- running -----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Find out what serves, preload, then carry out the core's commands until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_timers)
            task_status.started()
            self._feed(ev.Started(trio.current_time()))

    def _feed(self, event: ev.Event) -> None:
        # The core never raises: a failure inside it is aborted through its own path, and the
        # commands it made are returned with the one that says so (`core_failed`).
        began = time.perf_counter()
        commands = self.core.handle(event)
        took = time.perf_counter() - began
        if took > SLOW_EVENT_SECS:
            self._slow_event(event, took)
        for command in commands:
            self._execute(command)
        self._show_state()
        self._changed.set()
        self._changed = trio.Event()
        lifecycle = (self.core.current_switch, *(m.state for m in self.core.models.values()))
        if lifecycle != self._lifecycle_shown:
            self._lifecycle_shown = lifecycle
            self._lifecycle_changed.set()
            self._lifecycle_changed = trio.Event()

    def _slow_event(self, event: ev.Event, took: float) -> None:
        """The core runs in the event loop: a slow policy holds every request meanwhile."""
        now = time.monotonic()
        if now - self._slow_said_at < SLOW_EVENT_SAID_EVERY_SECS:
            return
        self._slow_said_at = now
        log_event(
            log, "core_slow", f"group {self.core.group.name} took {took:.2f}s to decide on "
            f"{type(event).__name__} (policy {self.core.config.policy.name}): every request of "
            "the group waited meanwhile; a policy's decide must be quick", logging.WARNING,
            group=self.core.group.name, seconds=took,
        )  # fmt: skip

    def _execute(self, command: Command) -> None:
        if isinstance(command, Grant):
            waiter = self._waiters.get(command.rid)
            if waiter is not None:
                waiter.backend, waiter.waited = command.backend, command.waited
                waiter.done.set()
        elif isinstance(command, Refuse):
            waiter = self._waiters.get(command.rid)
            if waiter is not None:
                waiter.error = command.error
                waiter.done.set()
        elif isinstance(command, RunHook):
            assert self._nursery is not None
            self._nursery.start_soon(self._run_hook, command)
        elif isinstance(command, CancelHook):
            scope = self._hook_scopes.get(command.job)
            if scope is not None:
                scope.cancel()
        elif isinstance(command, ReadGpuMemory):
            assert self._nursery is not None
            self._nursery.start_soon(self._read_gpus, command)
        elif isinstance(command, SetTimer):
            self._timers[command.name] = command.at
            self._timers_changed.set()
        elif isinstance(command, ClearTimer):
            self._timers.pop(command.name, None)
            self._timers_changed.set()
        elif isinstance(command, Reply):
            answer = self._answers.pop(command.reply, None)
            if answer is not None:
                answer.error = command.error
                answer.done.set()
        else:
            self._observe(command)

    async def _run_hook(self, command: RunHook) -> None:
        started = trio.current_time()
        stop = self._hook_scopes[command.job] = trio.CancelScope()
        env = command.env
        if command.level is not None:
            env = {**env, "LLMUX_SLEEP_LEVEL": str(command.level)}
        try:
            with stop:
                result = await run_on(self.backends, command.hook, command.backend, env)
        except Exception as exc:  # a hook that cannot be run is a failed hook, not a crash
            log.exception("%s of %s could not run", command.hook, command.model)
            result = HookResult(
                hook=command.hook, model=command.model, exit_code=EXIT_CANNOT_START,
                timed_out=False, duration=trio.current_time() - started, stdout_tail="",
                stderr_tail=repr(exc),
            )  # fmt: skip
        finally:
            self._hook_scopes.pop(command.job, None)
        if stop.cancelled_caught:  # the core asked: nobody waits for this cold start
            self._hook_cancelled(command, trio.current_time() - started)
            return
        self.metrics.hook_duration.labels(command.model, command.hook.value).observe(
            result.duration
        )
        # An alive hook that exits non-zero answered "not serving"; only a timeout is a failure.
        if not result.ok and (command.hook is not HookName.ALIVE or result.timed_out):
            self.metrics.hook_failures.labels(command.model, command.hook.value).inc()
        outcome = ev.HookOutcome(
            ok=result.ok,
            timed_out=result.timed_out,
            duration=result.duration,
            failure="" if result.ok else result.describe_failure(),
            cold=result.cold_start,
            host_gb=result.host_gb,
        )
        self._feed(ev.HookDone(trio.current_time(), command.job, outcome))

    async def _read_gpus(self, command: ReadGpuMemory) -> None:
        """NVML's figure (microseconds; None without a reader), answered as an event of its
        own: the core is not fed again from inside the carrying out of its commands."""
        read = self.read_gpu_free_gb
        free = None
        try:
            free = read(command.gpus) if read is not None else None
        except Exception:  # a driver's odd answer must not take the switching down
            log.exception("reading the memory of GPUs %s failed", list(command.gpus))
        self._feed(ev.GpuMemoryRead(trio.current_time(), command.job, free))

    def _hook_cancelled(self, command: RunHook, took: float) -> None:
        log_event(
            log, "hook_cancelled", f"{command.hook} of {command.model} stopped after "
            f"{took:.2f}s: nobody waits for it any more", model=command.model,
            hook=command.hook.value, duration=took,
        )  # fmt: skip
        outcome = ev.HookOutcome(ok=False, duration=took, cancelled=True)
        self._feed(ev.HookDone(trio.current_time(), command.job, outcome))

    async def _keep_timers(self) -> None:
        """Send `TimerDue` for each timer the core set, when it is due."""
        while True:
            changed = self._timers_changed
            if not self._timers:
                await changed.wait()
                self._timers_changed = trio.Event()
                continue
            name, at = min(self._timers.items(), key=lambda item: item[1])
            with trio.move_on_at(at):
                await changed.wait()
            if changed.is_set():
                self._timers_changed = trio.Event()
                continue  # set or cleared meanwhile: look again
            if self._timers.get(name) == at:
                del self._timers[name]
                self._feed(ev.TimerDue(trio.current_time(), name))

    # ----- requests -----

    @asynccontextmanager
    async def serving(self, name: str, ticket: WaitTicket | None = None) -> AsyncIterator[Slot]:
        """Hold an in-flight slot on `name` for the body of the block."""
        rid = next(self._ids)
        if ticket is not None:
            ticket.model, ticket.rid = name, rid
        waiter = _Waiter()
        self._waiters[rid] = waiter
        self._feed(ev.Arrived(trio.current_time(), rid, name))
        timeout = self.core.config.policy.request_timeout_secs
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await waiter.done.wait()
        except BaseException:  # the client went away while it waited
            self._waiters.pop(rid, None)
            self._feed(ev.Left(trio.current_time(), rid))
            raise
        self._waiters.pop(rid, None)
        if not waiter.done.is_set():
            self._feed(ev.Left(trio.current_time(), rid))
            log_event(
                log, "request_timeout", f"request for {name} waited {timeout:g}s: 504",
                logging.WARNING, model=name, waited=timeout,
            )  # fmt: skip
            raise QueueTimeout(
                f"model {name!r} did not become active within {timeout:g}s "
                "(policy.request_timeout_secs)"
            )
        if waiter.error is not None:
            raise waiter.error
        assert waiter.backend is not None
        self.metrics.queue_wait.labels(name).observe(waiter.waited)
        try:
            yield Slot(waiter.waited, waiter.backend)
        finally:
            self._feed(ev.Finished(trio.current_time(), rid))

    def refusal(self, name: str) -> LlmuxError | None:
        return self.core.refusal(name, trio.current_time())

    def where(self, rid: int) -> WaitView | None:
        """Where request `rid` waits (None: it does not)."""
        return where_waiting(self.core, rid, trio.current_time())

    def report_unreachable(self, name: str) -> None:
        self._feed(ev.Unreachable(trio.current_time(), name))

    def report_exit(self, name: str, port: int | None = None) -> None:
        """The server llmux started for `name` exited on its own: it serves nothing now."""
        self._feed(ev.ServerExited(trio.current_time(), name, port))

    # ----- admin, reload, shutdown -----

    async def put_to_sleep(self, name: str | None) -> None:
        """Drain the model (None: every awake one) and put it to sleep, waking nothing in its
        place. The core carries it out whatever happens to the caller meanwhile."""
        reply = next(self._ids)
        answer = _Answer()
        self._answers[reply] = answer
        self._feed(ev.SleepAsked(trio.current_time(), name, reply))
        await answer.done.wait()
        if answer.error is not None:
            raise answer.error

    async def sleep_all(self) -> None:
        await self.put_to_sleep(None)

    def reconfigure(self, config: Config, policy: Policy | None = None) -> ReloadSummary:
        for name in config.models:
            if name not in self.core.models:
                self.metrics.add_model(name)
        self._feed(ev.Reloaded(trio.current_time(), config, policy))
        summary = self.core.last_reload
        assert summary is not None
        return summary

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, answer queued requests 503, and let in-flight ones finish (bounded)."""
        self._feed(ev.ShutdownBegun(trio.current_time()))
        with trio.move_on_after(timeout):
            while self.total_in_flight():
                await self.wait_for_change()
        if self.total_in_flight():
            log.warning(
                "shutdown: %d requests still in flight after %gs", self.total_in_flight(), timeout
            )

    # ----- state -----

    @property
    def models(self) -> dict[str, ModelRecord]:
        return self.core.models

    @property
    def closing(self) -> bool:
        return self.core.closing

    @property
    def current_switch(self) -> SwitchView | None:
        return self.core.current_switch

    def snapshot(self) -> Snapshot:
        return self.core.snapshot()

    def total_in_flight(self) -> int:
        return sum(m.in_flight for m in (*self.core.models.values(), *self.core.retiring))

    async def wait_for_change(self) -> None:
        """Return after the next event the core handled."""
        await self._changed.wait()

    async def wait_for_lifecycle_change(self) -> None:
        """Return after a model's state or the running switch changes."""
        await self._lifecycle_changed.wait()

    # ----- metrics and logs, in one place -----

    def _show_state(self) -> None:
        """Bring the per-model gauges in line with the core's state."""
        core = self.core
        for name, model in core.models.items():
            shown = (model.state, len(model.queue), core.in_flight_of(name))
            if self._shown.get(name) == shown:
                continue
            before = self._shown.get(name)
            self._shown[name] = shown
            if before is None or before[0] is not shown[0]:
                self.metrics.set_state(name, shown[0])
            self.metrics.queue_depth.labels(name).set(shown[1])
            self.metrics.in_flight.labels(name).set(shown[2])
        for name in list(self._shown):
            if name not in core.models and not any(r.name == name for r in core.retiring):
                del self._shown[name]
                self.metrics.forget_model(name)
        self.metrics.group_used.labels(core.group.name).set(core.held())

    def _observe(self, observed: Observe) -> None:
        fields = dict(observed.fields)
        estimate = fields.pop("estimate", None)
        name = observed.name
        if name == "switch_started":
            self._switch_labels = (str(fields["from"]), str(fields["to"]))
            self.metrics.switch_in_progress.labels(*self._switch_labels).set(time.time())
        elif name == "switch_ended" and self._switch_labels is not None:
            self.metrics.switch_in_progress.remove(*self._switch_labels)
            self._switch_labels = None
        elif name == "switch_result":
            labels = (str(fields["from"]), str(fields["to"]), str(fields["result"]))
            self.metrics.switch_total.labels(*labels).inc()
            self.metrics.switch_last_time.labels(*labels).set(time.time())
        elif name == "sleep_measured":
            self.metrics.sleep_seconds.labels(fields["model"], str(fields["level"])).observe(
                fields["seconds"]
            )
        elif name == "wake_measured":
            self.metrics.wake_seconds.labels(fields["model"], fields["level"]).observe(
                fields["seconds"]
            )
        elif name == "drain_measured":
            self.metrics.switch_drain_duration.labels(fields["model"]).observe(fields["seconds"])
        elif name == "model_active_duration":
            self.metrics.model_active_duration.labels(fields["model"]).observe(fields["seconds"])
        elif name == "model_dead":
            self.metrics.model_dead.labels(fields["model"]).inc()
        elif name == "policy_failed":
            self.metrics.policy_errors.labels(self.core.group.name, fields["answer"]).inc()
        elif name == "gpu_memory_not_freed":
            for sleeper in fields["sleepers"]:  # type: ignore[attr-defined]
                self.metrics.gpu_memory_not_freed.labels(sleeper).inc()
        elif name == "record_forgotten" and self.on_record_forgotten is not None:
            self.on_record_forgotten()
        elif name == "model_activated" and estimate is not None:
            self._count_activation(fields, estimate)
        error = fields.pop("error", None)
        if observed.message:
            level = LEVELS[observed.level]
            log.log(
                level, observed.message, exc_info=error, extra={"event": name, "fields": fields}
            )

    def _count_activation(self, fields: dict[str, object], estimate: float) -> None:
        model = str(fields["model"])
        kind = COLD if fields.get("cold") else IDLE
        if fields.get("preload"):
            self.metrics.switch_cost_ema.labels(kind, model).set(estimate)
            return
        source, took = str(fields["from"]), float(fields["switch_seconds"])  # type: ignore[arg-type]
        self.metrics.switch_cost_ema.labels(kind if fields.get("cold") else source, model).set(
            estimate
        )
        self.metrics.switch_total.labels(source, model, "ok").inc()
        self.metrics.switch_last_time.labels(source, model, "ok").set(time.time())
        self.metrics.switch_duration.labels(source, model).observe(took)
        self.metrics.last_switch_duration.labels(model).set(took)
