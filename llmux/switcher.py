"""The switcher: which model is awake, which requests wait, and carrying out switches.

Theory of operation
-------------------
Each configured model has a `ModelRuntime`: its state (see `policy.ModelState`), a queue of waiting
requests and a count of in-flight requests. A request asks `serving(model)` for a slot. If the model
is ACTIVE it gets one at once; otherwise it joins the model's queue and the policy is consulted.

The policy (plain code, no I/O) is consulted on every event: a request arrived, a request
completed, a switch completed, a timer it asked for fired. When it answers `SwitchTo(target)` and no
switch is running, one switch task carries it out:

    wait out min_active_secs of the active model (it keeps serving)
    -> active model DRAINING (its new requests queue), wait for its in-flight to reach 0
    -> SLEEPING: its sleep hook      (fails and alive still passes: abandon, old model stays ACTIVE)
    -> target WAKING: its wake hook  (fails: target's sleep hook cleans up, llmux idle, waiters 503)
    -> target ACTIVE: its queue is released in arrival order, each one's slot taken atomically.

Rules
-----
1. A request is forwarded only while its model is ACTIVE. Granting a slot and counting it in flight
   happen in one step with no checkpoint between, so a drain can never miss a request.
2. One switch at a time; the hooks of a switch run one after another, and alive checks never run
   beside them (one lifecycle lock).
3. A switch whose target no longer has anyone waiting (they all left or timed out) stops before it
   puts anything to sleep.
4. A switcher serves one group of models. Models not ASLEEP hold their size of the group's
   capacity; without a capacity each holds all of it (one model awake at a time). A switch first
   drains and puts to sleep the awake models the target does not fit beside (the policy's
   `evict`, or `policy.default_evictions`), then wakes it. In a group with a capacity, a model
   that fits beside the awake ones is woken without asking the policy: nobody is disturbed.
5. An ACTIVE model idle for its `ttl_secs` is drained and put to sleep (under the same lock).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from llmux.config import Config, GroupConfig, ModelConfig
from llmux.costs import IDLE, SwitchCostTracker
from llmux.errors import (
    LlmuxError,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from llmux.hook_registry import HookRegistry
from llmux.hooks import HookResult, run_hook
from llmux.logs import log_event
from llmux.metrics import Metrics
from llmux.policy import (
    CallAt,
    Decision,
    Event,
    FifoPolicy,
    ModelState,
    Policy,
    RequestArrived,
    RequestCompleted,
    Snapshot,
    SwitchCompleted,
    SwitchTo,
    TimerFired,
    choose_evictions,
    snapshot_of,
)

log = logging.getLogger("llmux.switcher")

FAILED_SWITCH_BACKOFF_SECS = 2.0
DEFAULT_RETRY_AFTER_SECS = 5.0  # Retry-After when no switch to the model was measured yet
MIN_TIMER_SECS = 0.001  # the soonest a policy's CallAt fires


@dataclass(eq=False)
class Waiter:
    """One queued request: released with a slot, or failed with an error."""

    model: str
    arrival: float
    done: trio.Event = field(default_factory=trio.Event)
    granted: bool = False
    error: LlmuxError | None = None


@dataclass
class SwitchInProgress:
    source: str | None
    target: str
    evicting: tuple[str, ...] = ()  # every model put to sleep for it (source is the first)
    started: float = field(default_factory=trio.current_time)
    started_wall: float = field(default_factory=time.time)

    @property
    def from_label(self) -> str:
        return self.source or IDLE


@dataclass(frozen=True)
class ReloadSummary:
    added: list[str]
    removed: list[str]
    changed: list[str]


@dataclass(frozen=True)
class Slot:
    """A granted in-flight slot: how long it queued, and the backend to send to."""

    waited: float
    backend: ModelConfig


@dataclass(eq=False)
class ModelRuntime:
    config: ModelConfig
    state: ModelState = ModelState.ASLEEP
    queue: deque[Waiter] = field(default_factory=deque)
    in_flight: int = 0
    active_since: float | None = None
    last_alive_check: float = 0.0
    last_alive: bool | None = None  # the latest alive hook answer (None: never run, or no hook)
    retiring: bool = False  # removed or replaced by a reload: drained, slept, then forgotten
    size: float = 1.0  # what it takes of its group's capacity while not ASLEEP
    idle_since: float = 0.0  # when its in-flight count last reached 0 (for ttl_secs)
    last_used: float | None = None
    check_requested: bool = False  # the proxy could not connect: run its alive hook soon

    @property
    def name(self) -> str:
        return self.config.name


class Switcher:
    """The models of one group (`config` narrowed to it by `Config.group_config`)."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        metrics: Metrics,
        costs: SwitchCostTracker,
        hook_registry: HookRegistry,
    ) -> None:
        self.config = config
        self.group: GroupConfig = next(iter(config.groups.values()))
        self.policy = policy
        self.metrics = metrics
        self.costs = costs
        self.models = {name: self._runtime(cfg) for name, cfg in config.models.items()}
        self._nursery: trio.Nursery | None = None
        self._ready = False
        self._closing = False
        self._switch_running = False
        self._retry_at = -math.inf
        self._lifecycle_lock = trio.Lock()
        self._changed = trio.Event()
        self._timer_deadline = math.inf
        self._timer_scope: trio.CancelScope | None = None
        self.current_switch: SwitchInProgress | None = None
        self._retiring: list[ModelRuntime] = []  # removed or replaced by a reload, still awake
        self.hook_registry = hook_registry  # shared by all groups (see Fleet)

    def _runtime(self, config: ModelConfig) -> ModelRuntime:
        return ModelRuntime(config, size=self.group.size_of(config))

    # ----- running -----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile with the backends' real state, then carry out decisions until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self.reconcile()
            await self.preload()
            self._ready = True
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._alive_loop)
            nursery.start_soon(self._ttl_loop)
            # Requests that queued during reconciliation reach the policy now, oldest first.
            waiting = sorted(
                (m for m in self.models.values() if m.queue), key=lambda m: m.queue[0].arrival
            )
            for model in waiting:
                self._consult(RequestArrived(model.name))

    async def reconcile(self) -> None:
        """Adopt the models that already serve, in config order while they fit, and put the
        others to sleep (one at a time: the first in config order is kept)."""
        alive: dict[str, bool | None] = {}

        async def check(model: ModelRuntime) -> None:
            alive[model.name] = await self._check_alive(model)

        async with self._lifecycle_lock, trio.open_nursery() as nursery:
            for model in self.models.values():
                nursery.start_soon(check, model)
        awake = [name for name in self.models if alive.get(name)]
        if not awake:
            log.info("no model of group %s is serving at start-up", self.group.name)
            return
        extra = []
        for name in awake:
            model = self.models[name]
            if not self._fits(model):
                extra.append(name)
                continue
            self._activate(model)
            log_event(
                log, "model_activated", f"{name} already serves: adopted as an active model",
                model=name, adopted=True,
            )  # fmt: skip
        async with self._lifecycle_lock:
            for name in extra:
                log.warning("%s is also serving at start-up; putting it to sleep", name)
                result = await self._run_hook(self.models[name], "sleep")
                if not result.ok:
                    log.error(
                        "could not put %s to sleep at start-up: more models may be awake than "
                        "fit", name
                    )  # fmt: skip

    async def preload(self) -> None:
        """Wake the configured `preload` models, in order, while they fit; requests that arrive
        meanwhile queue until it is done."""
        for name in self.config.preload:
            model = self.models[name]
            if model.state is ModelState.ACTIVE:
                continue
            if not self._fits(model):
                awake = ", ".join(m.name for m in self._awake())
                log.warning(
                    "preload: %s does not fit beside %s in group %s; left asleep",
                    name, awake, self.group.name,
                )  # fmt: skip
                continue
            async with self._lifecycle_lock:
                result = await self._wake(model, None)
                if not result.ok:
                    continue
                self._activate(model)
                self.costs.observe_wake(name, result.duration)
                estimate = self.costs.observe(None, name, result.duration)
                self.metrics.switch_cost_ema.labels(IDLE, name).set(estimate)
            log_event(
                log, "model_activated", f"{name} preloaded in {result.duration:.2f}s",
                model=name, preload=True, cost_seconds=result.duration,
            )  # fmt: skip

    # ----- requests -----

    @asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[Slot]:
        """Hold an in-flight slot on `name` for the body of the block."""
        model = self.models.get(name)
        if model is None or model.retiring:
            raise ModelNotFound(f"model {name!r} is no longer configured")
        waited = await self._acquire(model)
        try:
            # The model's config as it is now: a reload while it queued may have changed its port.
            yield Slot(waited, model.config)
        finally:
            self._release(model)

    def refusal(self, name: str) -> LlmuxError | None:
        """Why a request for `name` would be refused at once, if it would: lets the app answer
        before it reads the rest of a large body."""
        model = self.models.get(name)
        if model is None or model.retiring:
            return ModelNotFound(f"model {name!r} is no longer configured")
        if self._closing:
            return ShuttingDown("llmux is shutting down")
        if self._may_start_now(model):
            return None
        limit = self.config.server.max_queue_per_model
        if len(model.queue) >= limit:
            estimate = self.snapshot().estimated_cost(name) or DEFAULT_RETRY_AFTER_SECS
            return QueueFull(
                f"{limit} requests already wait for {name!r} (server.max_queue_per_model)",
                retry_after=max(1, math.ceil(estimate)),
            )
        return None

    def _may_start_now(self, model: ModelRuntime) -> bool:
        return model.state is ModelState.ACTIVE and not model.queue and self._has_room(model)

    async def _acquire(self, model: ModelRuntime) -> float:
        name = model.name
        refused = self.refusal(name)
        if refused is not None:
            raise refused
        if self._may_start_now(model):
            self._start_request(model)
            self.metrics.queue_wait.labels(name).observe(0.0)
            return 0.0
        waiter = Waiter(model=name, arrival=trio.current_time())
        model.queue.append(waiter)
        self._queue_changed(model)
        self._consult(RequestArrived(name))
        timeout = self.config.policy.request_timeout_secs
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await waiter.done.wait()
        except BaseException:
            self._leave_queue(model, waiter)
            raise
        waited = trio.current_time() - waiter.arrival
        if not waiter.done.is_set():
            self._leave_queue(model, waiter)
            log_event(
                log, "request_timeout", f"request for {name} waited {waited:.1f}s: 504",
                logging.WARNING, model=name, waited=waited,
            )  # fmt: skip
            raise QueueTimeout(
                f"model {name!r} did not become active within {timeout:g}s "
                "(policy.request_timeout_secs)"
            )
        self.metrics.queue_wait.labels(name).observe(waited)
        if waiter.error is not None:
            raise waiter.error
        return waited

    def _leave_queue(self, model: ModelRuntime, waiter: Waiter) -> None:
        """A waiter is gone (client left, timed out): drop it, or return a slot it was granted."""
        if waiter.granted:
            self._release(model)
            return
        if waiter in model.queue:
            model.queue.remove(waiter)
            self._queue_changed(model)

    def _start_request(self, model: ModelRuntime) -> None:
        model.in_flight += 1
        model.last_used = trio.current_time()
        self._update_in_flight_gauge(model.name)

    def _release(self, model: ModelRuntime) -> None:
        model.in_flight -= 1
        model.last_used = trio.current_time()
        if model.in_flight == 0:
            model.idle_since = model.last_used
        self._update_in_flight_gauge(model.name)
        if model.queue and model.state is ModelState.ACTIVE:
            self._grant_waiting(model)  # a request held back by max_in_flight_per_model
        self._notify()
        self._consult(RequestCompleted(model.name))

    def _queue_changed(self, model: ModelRuntime) -> None:
        self.metrics.queue_depth.labels(model.name).set(len(model.queue))
        self._notify()

    def _has_room(self, model: ModelRuntime) -> bool:
        limit = self.config.server.max_in_flight_per_model
        return limit is None or model.in_flight < limit

    def _grant_waiting(self, model: ModelRuntime) -> None:
        """Give waiters of an ACTIVE model slots, in arrival order, while it has room."""
        granted = False
        while model.queue and self._has_room(model):
            waiter = model.queue.popleft()
            self._start_request(model)
            waiter.granted = True
            waiter.done.set()
            granted = True
        if granted:
            self._queue_changed(model)

    def _fail_queue(self, model: ModelRuntime, error: LlmuxError) -> None:
        while model.queue:
            waiter = model.queue.popleft()
            waiter.error = error
            waiter.done.set()
        self._queue_changed(model)

    def report_unreachable(self, name: str) -> None:
        """The proxy could not connect to an ACTIVE model: check at once whether it still serves."""
        if self.models[name].state is ModelState.ACTIVE:
            self.models[name].check_requested = True
            self._notify()

    # ----- reload -----

    def reconfigure(self, config: Config, policy: Policy | None = None) -> ReloadSummary:
        """Apply a new, already validated config without dropping in-flight or queued requests.

        A model whose timeouts or alive hook changed takes them from its next use on. A model
        whose port, wake or sleep hook changed while awake is replaced: the old one is drained
        and put to sleep with its old hooks, and its queue moves to the new one, which starts
        asleep. A removed model's queued requests get 404; if it is awake it is drained and put
        to sleep. No switch starts until those retirements are done, so two models are never
        awake at once."""
        old_configs = {name: model.config for name, model in self.models.items()}
        self.config = config
        self.group = next(iter(config.groups.values()))
        if policy is not None:
            self.policy = policy
        runtimes: dict[str, ModelRuntime] = {}
        changed = []
        for name, cfg in config.models.items():
            runtime = self.models.get(name)
            if runtime is None:
                runtime = self._runtime(cfg)
                self.metrics.add_model(name)
            elif runtime.config != cfg:
                changed.append(name)
                if runtime.state is not ModelState.ASLEEP and _needs_restart(runtime.config, cfg):
                    replacement = self._runtime(cfg)
                    replacement.queue, runtime.queue = runtime.queue, deque()
                    self._retire(runtime)
                    runtime = replacement
                    self.metrics.set_state(name, ModelState.ASLEEP)
                runtime.config = cfg
                runtime.size = self.group.size_of(cfg)
            runtimes[name] = runtime
        removed = [model for name, model in self.models.items() if name not in config.models]
        for model in removed:
            self._fail_queue(
                model, ModelNotFound(f"model {model.name!r} was removed from the config")
            )
            self._retire(model)
        self.models = runtimes
        self._notify()
        self._consult(TimerFired())
        return ReloadSummary(
            added=[n for n in config.models if n not in old_configs],
            removed=[m.name for m in removed],
            changed=changed,
        )

    def _retire(self, model: ModelRuntime) -> None:
        model.retiring = True
        self._retiring.append(model)
        assert self._nursery is not None
        self._nursery.start_soon(self._put_retired_to_sleep, model)

    async def _put_retired_to_sleep(self, model: ModelRuntime) -> None:
        """Drain and put to sleep a model a reload removed or replaced, then forget it."""
        async with self._lifecycle_lock:
            if model.state is not ModelState.ASLEEP:
                result = await self._drain_and_sleep(model)
                if not result.ok:
                    log.error("retired model %s could not be put to sleep", model.name)
                self._set_state(model, ModelState.ASLEEP)
            self._retiring.remove(model)
            if model.name not in self.models:
                self.metrics.forget_model(model.name)
        self._notify()
        self._consult(TimerFired())

    async def put_to_sleep(self, name: str) -> None:
        """Admin API: drain the model and run its sleep hook, waking nothing in its place.
        Requests that arrive meanwhile queue, and the policy decides what to wake next."""
        model = self.models[name]
        async with self._lifecycle_lock:
            if model.state is not ModelState.ACTIVE:
                return
            result = await self._drain_and_sleep(model)
            if not result.ok and await self._check_alive(model) is not False:
                self._activate(model)
                raise self._hook_error(model, f"{name} could not be put to sleep", result)
            self._set_state(model, ModelState.ASLEEP)
            model.active_since = None
        self._consult(TimerFired())

    async def sleep_all(self) -> None:
        for name, model in list(self.models.items()):
            if model.state is ModelState.ACTIVE:
                await self.put_to_sleep(name)

    async def _drain_and_sleep(self, model: ModelRuntime) -> HookResult:
        """DRAINING until nothing is in flight, then SLEEPING while its sleep hook runs."""
        self._set_state(model, ModelState.DRAINING)
        await self._wait_until(lambda: model.in_flight == 0)
        self._set_state(model, ModelState.SLEEPING)
        return await self._run_hook(model, "sleep")

    # ----- shutdown -----

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, answer queued requests 503, and let in-flight ones finish (bounded)."""
        self._closing = True
        for model in self.models.values():
            self._fail_queue(model, ShuttingDown("llmux is shutting down"))
        with trio.move_on_after(timeout):
            await self._wait_until(lambda: self.total_in_flight() == 0)
        if self.total_in_flight():
            log.warning(
                "shutdown: %d requests still in flight after %gs", self.total_in_flight(), timeout
            )

    def total_in_flight(self) -> int:
        return sum(model.in_flight for model in self.models.values())

    @property
    def closing(self) -> bool:
        return self._closing

    # ----- policy -----

    def snapshot(self) -> Snapshot:
        return snapshot_of(
            trio.current_time(),
            self.models.values(),
            self._switch_running,
            self.costs.switches,
            self.costs.cold_starts,
            self.group.room,
            self.costs.wakes,
        )

    def _consult(self, event: Event) -> None:
        if not self._ready or self._closing:
            return
        if self.group.capacity is not None and not self._switch_running:
            # Waking a model into free room disturbs nobody: no policy decision to make.
            for model in sorted(self._waiting(), key=lambda m: m.queue[0].arrival):
                if model.state is ModelState.ASLEEP and self._fits(model):
                    self._apply(SwitchTo(model.name))
                    return
        snapshot = self.snapshot()
        try:
            decision = self.policy.decide(event, snapshot)
        except Exception:
            log.exception("policy %r failed; falling back to FIFO for this decision", self.policy)
            decision = FifoPolicy().decide(event, snapshot)
        self._apply(decision)

    def _apply(self, decision: Decision) -> None:
        if isinstance(decision, SwitchTo):
            target = self.models.get(decision.model)
            if target is None:
                log.error("policy asked to switch to unknown model %r; ignored", decision.model)
            elif not self._switch_running and target.state is not ModelState.ACTIVE:
                assert self._nursery is not None
                self._switch_running = True
                self._nursery.start_soon(self._switch, target)
        elif isinstance(decision, CallAt):
            # A time not in the future would spin the timer: call again a little later.
            when = max(decision.when, trio.current_time() + MIN_TIMER_SECS)
            self._timer_deadline = when
            if self._timer_scope is not None:
                self._timer_scope.deadline = when

    async def _timer_loop(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._timer_deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_deadline = math.inf
            self._timer_scope = None
            self._consult(TimerFired())

    # ----- switching -----

    async def _switch(self, target: ModelRuntime) -> None:
        ok = False
        try:
            ok = await self._carry_out_switch(target)
        except Exception:
            # A bug must not take the whole server down: fail this switch, keep serving.
            log.exception("switch to %s failed unexpectedly", target.name)
            if target.state is ModelState.WAKING:
                self._set_state(target, ModelState.ASLEEP)
            self._retry_at = trio.current_time() + FAILED_SWITCH_BACKOFF_SECS
            self._fail_queue(
                target, ModelUnavailable(f"model {target.name!r} unavailable: internal error")
            )
        finally:
            self._switch_running = False
            self._notify()
        self._consult(SwitchCompleted(target.name, ok))

    async def _carry_out_switch(self, target: ModelRuntime) -> bool:
        """Drain, sleep, wake; returns whether the target ended up ACTIVE."""
        policy = self.config.policy
        await trio.sleep_until(self._retry_at)
        if not target.queue or target.state is ModelState.ACTIVE:
            return False  # stale: everyone who wanted it left, or it is already serving
        victims = self._victims_for(target)
        started = [v.active_since for v in victims if v.active_since is not None]
        if started:
            serve_until = max(started) + policy.min_active_secs
            with trio.move_on_at(serve_until):
                await self._wait_until(lambda: not target.queue)
            if not target.queue:
                return False
        # A model a reload retired may still be awake: never wake another beside it.
        await self._wait_until(lambda: not self._retiring)
        async with self._lifecycle_lock:
            if not target.queue or target.state is ModelState.ACTIVE:
                return False
            # Again: an alive check or an idle sleep may have changed what is awake meanwhile.
            victims = self._victims_for(target)
            source = victims[0] if victims else None
            self.current_switch = SwitchInProgress(
                source.name if source else None, target.name, tuple(v.name for v in victims)
            )
            labels = (self.current_switch.from_label, target.name)
            self.metrics.switch_in_progress.labels(*labels).set(self.current_switch.started_wall)
            try:
                return await self._drain_sleep_wake(victims, target)
            finally:
                self.metrics.switch_in_progress.remove(*labels)
                self.current_switch = None

    async def _drain_sleep_wake(self, victims: list[ModelRuntime], target: ModelRuntime) -> bool:
        switch = self.current_switch
        assert switch is not None
        source = victims[0] if victims else None
        from_label = switch.from_label
        fields = {"from": from_label, "to": target.name}
        evicting = f" (putting {', '.join(switch.evicting)} to sleep)" if len(victims) > 1 else ""
        log_event(
            log, "switch_started", f"switching {from_label} -> {target.name}{evicting}",
            evicting=list(switch.evicting), **fields,
        )  # fmt: skip
        sleep_seconds = drain_seconds = 0.0
        if victims:
            drained = await self._drain(victims, target)
            if drained is None:
                return False
            drain_seconds = drained
            for index, victim in enumerate(victims):
                sleep_result = await self._put_to_sleep(victim, target)
                if sleep_result is None:
                    # The target cannot fit now: the victims not yet put to sleep serve on.
                    for spared in victims[index + 1 :]:
                        self._set_state(spared, ModelState.ACTIVE)
                        self._grant_waiting(spared)
                    self.metrics.switch_total.labels(from_label, target.name, "abandoned").inc()
                    return False
                sleep_seconds += sleep_result.duration
        wake_result = await self._wake(target, source)
        if not wake_result.ok:
            self.metrics.switch_total.labels(from_label, target.name, "failed").inc()
            return False
        self._activate(target)
        self.costs.observe_wake(target.name, wake_result.duration)
        cost = sleep_seconds + wake_result.duration
        took = trio.current_time() - switch.started
        estimate = self.costs.observe(source.name if source else None, target.name, cost)
        self.metrics.switch_cost_ema.labels(from_label, target.name).set(estimate)
        self.metrics.switch_total.labels(from_label, target.name, "ok").inc()
        self.metrics.switch_duration.labels(from_label, target.name).observe(took)
        self.metrics.last_switch_duration.labels(target.name).set(took)
        log_event(
            log, "model_activated", f"{from_label} -> {target.name}: active after {took:.2f}s",
            model=target.name, switch_seconds=took, cost_seconds=cost,
            drain_seconds=drain_seconds, **fields,
        )  # fmt: skip
        return True

    async def _drain(self, victims: list[ModelRuntime], target: ModelRuntime) -> float | None:
        """Stop admitting to the victims and wait for their in-flight requests; returns how long
        that took, or None if the target's waiters all left meanwhile (the switch is called off
        and the victims serve on)."""
        for victim in victims:
            self._set_state(victim, ModelState.DRAINING)
        began = trio.current_time()
        if self.config.policy.drain_before_switch:
            await self._wait_until(
                lambda: all(v.in_flight == 0 for v in victims) or not target.queue
            )
        drained = trio.current_time() - began
        for victim in victims:
            self.metrics.switch_drain_duration.labels(victim.name).observe(drained)
        if not target.queue:
            source = victims[0].name
            log_event(
                log, "switch_cancelled", f"switch {source} -> {target.name} called off: "
                f"nobody waits for {target.name} any more",
                **{"from": source, "to": target.name},
            )  # fmt: skip
            for victim in victims:
                self._set_state(victim, ModelState.ACTIVE)
                self._grant_waiting(victim)
            return None
        return drained

    async def _put_to_sleep(self, source: ModelRuntime, target: ModelRuntime) -> HookResult | None:
        """Run the source's sleep hook; None if it failed and the model may still be awake, in
        which case it stays ACTIVE and the target's waiters get 503."""
        self._set_state(source, ModelState.SLEEPING)
        if source.active_since is not None:
            self.metrics.model_active_duration.labels(source.name).observe(
                trio.current_time() - source.active_since
            )
        result = await self._run_hook(source, "sleep", self._switch_env(source, target))
        if result.ok:
            self._set_state(source, ModelState.ASLEEP)
            source.active_since = None
            return result
        still_alive = await self._check_alive(source)
        if still_alive is False:
            log.warning("sleep hook for %s failed but it no longer serves; continuing", source.name)
            self._set_state(source, ModelState.ASLEEP)
            source.active_since = None
            return result
        reason = "its alive hook still passes" if still_alive else "it has no alive hook to confirm"
        log_event(
            log, "switch_failed", f"switch {source.name} -> {target.name} abandoned: sleep failed "
            f"and {reason}", logging.ERROR, reason="sleep_failed",
            **{"from": source.name, "to": target.name},
        )  # fmt: skip
        self._activate(source)
        self._retry_at = trio.current_time() + FAILED_SWITCH_BACKOFF_SECS
        self._fail_queue(
            target, self._hook_error(target, f"{source.name} could not be put to sleep", result)
        )
        return None

    async def _wake(self, target: ModelRuntime, source: ModelRuntime | None) -> HookResult:
        self._set_state(target, ModelState.WAKING)
        env = self._switch_env(source, target)
        result = await self._run_hook(target, "wake", env)
        target.last_alive = None  # an answer from before the wake says nothing about now
        if not result.ok:
            log_event(
                log, "switch_failed", f"wake of {target.name} failed; running its sleep hook to "
                "clean up", logging.ERROR, reason="wake_failed",
                **{"from": source.name if source else IDLE, "to": target.name},
            )  # fmt: skip
            await self._run_hook(target, "sleep", env)
            self._set_state(target, ModelState.ASLEEP)
            self._retry_at = trio.current_time() + FAILED_SWITCH_BACKOFF_SECS
            self._fail_queue(
                target, self._hook_error(target, f"{target.name} could not be woken", result)
            )
        return result

    def _activate(self, model: ModelRuntime) -> None:
        model.active_since = trio.current_time()
        model.last_alive_check = model.active_since
        self._set_state(model, ModelState.ACTIVE)
        self._grant_waiting(model)

    def _hook_error(self, model: ModelRuntime, what: str, result: HookResult) -> ModelUnavailable:
        if self.config.server.expose_hook_errors:
            return ModelUnavailable(
                f"model {model.name!r} unavailable: {what}: {result.describe_failure()}"
            )
        return ModelUnavailable(f"model {model.name!r} unavailable: {what} (see llmux's log)")

    @staticmethod
    def _switch_env(source: ModelRuntime | None, target: ModelRuntime) -> dict[str, str]:
        return {"LLMUX_FROM": source.name if source else "", "LLMUX_TO": target.name}

    # ----- alive checks -----

    async def _alive_loop(self) -> None:
        """While a model is ACTIVE and idle, check every alive_interval_secs that it still serves;
        a failed check marks it ASLEEP so the next request wakes it instead of getting 502s."""
        while True:
            deadline = math.inf
            due = None
            if not self._switch_running:
                for model in self._awake():
                    if model.config.alive is None:
                        continue
                    due_at = model.last_alive_check + model.config.alive_interval_secs
                    idle = model.in_flight == 0
                    if model.check_requested or (idle and trio.current_time() >= due_at):
                        due = model
                        break
                    if idle:
                        deadline = min(deadline, due_at)
            if due is not None:
                due.check_requested = False
                await self._periodic_alive_check(due)
                continue
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()

    async def _ttl_loop(self) -> None:
        """Put an ACTIVE model to sleep once it has been idle for its ttl_secs."""
        while True:
            deadline = math.inf
            due = None
            for model in self._awake():
                if model.config.ttl_secs <= 0 or model.in_flight or model.queue:
                    continue
                expires = max(model.idle_since, model.active_since or 0.0) + model.config.ttl_secs
                if trio.current_time() >= expires and not self._switch_running:
                    due = model
                    break
                deadline = min(deadline, expires)
            if due is not None:
                await self._idle_sleep(due)
                continue
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()

    async def _idle_sleep(self, model: ModelRuntime) -> None:
        async with self._lifecycle_lock:
            if model.state is not ModelState.ACTIVE or model.in_flight or model.queue:
                return  # it got work while we waited for the lock
            idle = trio.current_time() - max(model.idle_since, model.active_since or 0.0)
            log_event(
                log, "model_idle_sleep", f"{model.name} idle for {idle:.1f}s (ttl_secs "
                f"{model.config.ttl_secs:g}): putting it to sleep", model=model.name, idle=idle,
            )  # fmt: skip
            result = await self._drain_and_sleep(model)
            if not result.ok and await self._check_alive(model) is not False:
                log.error("idle sleep of %s failed; it stays active", model.name)
                self._activate(model)
                return
            self._set_state(model, ModelState.ASLEEP)
            model.active_since = None
        self._consult(TimerFired())  # requests that queued during the sleep hook

    async def _periodic_alive_check(self, model: ModelRuntime) -> None:
        async with self._lifecycle_lock:
            if model.state is not ModelState.ACTIVE:
                return
            serving = await self._check_alive(model)
        model.last_alive_check = trio.current_time()
        if serving is False and model.state is ModelState.ACTIVE:
            log_event(
                log, "model_dead", f"{model.name} is active but its alive hook fails: marking it "
                "asleep", logging.ERROR, model=model.name,
            )  # fmt: skip
            self.metrics.model_dead.labels(model.name).inc()
            self._set_state(model, ModelState.ASLEEP)
            model.active_since = None
            self._consult(TimerFired())

    async def _check_alive(self, model: ModelRuntime) -> bool | None:
        """Whether the model serves now, by its alive hook; None when it has none."""
        if model.config.alive is None:
            return None
        result = await self._run_hook(model, "alive")
        model.last_alive = result.ok
        return result.ok

    # ----- helpers -----

    async def _run_hook(
        self, model: ModelRuntime, hook: str, extra_env: dict[str, str] | None = None
    ) -> HookResult:
        cfg = model.config
        command = {"wake": cfg.wake, "sleep": cfg.sleep, "alive": cfg.alive}[hook]
        assert command is not None
        timeout = {
            "wake": cfg.wake_timeout_secs,
            "sleep": cfg.sleep_timeout_secs,
            "alive": cfg.alive_timeout_secs,
        }[hook]
        result = await run_hook(
            hook,
            command,
            model=model.name,
            port=cfg.port,
            cwd=self.config.hook_dir,
            timeout=timeout,
            extra_env=extra_env,
            registry=self.hook_registry,
        )
        self.metrics.hook_duration.labels(model.name, hook).observe(result.duration)
        # An alive hook that exits non-zero answered "not serving"; only a timeout is a failure.
        if not result.ok and (hook != "alive" or result.timed_out):
            self.metrics.hook_failures.labels(model.name, hook).inc()
        return result

    def _awake(self) -> list[ModelRuntime]:
        return [m for m in self.models.values() if m.state is ModelState.ACTIVE]

    def _waiting(self) -> list[ModelRuntime]:
        return [m for m in self.models.values() if m.queue and m.state is not ModelState.ACTIVE]

    def _held(self, leaving_out: ModelRuntime | None = None) -> float:
        """Capacity held now by the models not asleep (retiring ones included)."""
        return sum(
            m.size
            for m in (*self.models.values(), *self._retiring)
            if m.state is not ModelState.ASLEEP and m is not leaving_out
        )

    def _fits(self, target: ModelRuntime) -> bool:
        """Whether `target` fits beside every model that holds memory now."""
        return self._held(leaving_out=target) + target.size <= self.group.room + 1e-9

    def _victims_for(self, target: ModelRuntime) -> list[ModelRuntime]:
        """The awake models to put to sleep so that `target` fits (none if it fits now)."""
        if self._fits(target):
            return []
        names = choose_evictions(self.policy, target.name, self.snapshot())
        return [self.models[name] for name in names]

    def _update_in_flight_gauge(self, name: str) -> None:
        """In flight under this name: the current runtime's and any retiring one's."""
        runtimes = [*self._retiring, self.models.get(name)]
        count = sum(m.in_flight for m in runtimes if m is not None and m.name == name)
        self.metrics.in_flight.labels(name).set(count)

    def _set_state(self, model: ModelRuntime, state: ModelState) -> None:
        model.state = state
        if self.models.get(model.name) is model or model.name not in self.models:
            # A replaced model's retirement must not overwrite its successor's state.
            self.metrics.set_state(model.name, state)
        self.metrics.group_used.labels(self.group.name).set(self._held())
        self._notify()

    async def wait_for_change(self) -> None:
        """Return after the next change of any model's state, queue or in-flight count."""
        await self._changed.wait()

    def _notify(self) -> None:
        """Wake every task waiting for some condition on the switcher's state to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            changed = self._changed
            await changed.wait()


def _needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether an awake model must be put to sleep with its old hooks before the new config
    applies: its backend moved, or the hooks that know how to wake and sleep it changed."""
    return (old.port, old.wake, old.sleep) != (new.port, new.wake, new.sleep)
