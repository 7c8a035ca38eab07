"""The rules of one group of models as plain code: events in, commands out, no I/O.

Theory of operation
-------------------
A group is the models that share one GPU (or one set of GPUs). Its core keeps, per model, a
record: its state (core/states.py), the requests waiting for it and the number in flight. A
request arrives (`Arrived`), is granted at once if its model is ACTIVE with room and nobody
waits before it, and otherwise queues while the switch policy is consulted. A grant names the
backend as configured at that moment; the request releases its slot when it `Finished` (or
`Left`), on whichever record granted it, even if a reload has replaced that record since.

Everything that changes what is awake is an *operation*, and one runs at a time (the lifecycle
lock): a switch, an idle sleep, an admin sleep, an alive check, the retirement of a record a
reload replaced, reconciling at start-up, preloading. An operation moves through phases; each
phase waits for exactly one thing the core has asked for and will hear about: a hook's end
(`HookDone`, which also comes when a hook could not start), a drain (the last `Finished` of a
draining model), or a timer (`TimerDue`). So no model can stay DRAINING, WAKING or SLEEPING
without something in flight that will move it on.

A switch is wanted when the policy answers `SwitchTo` (or, in a group with a capacity, when a
waiting model fits beside the awake ones: nobody is disturbed, so nobody is asked). It starts
once no operation runs, the back-off after a failed switch is over, the models it will put to
sleep have been active `min_active_secs`, and the target still has someone waiting. Then:

    victims DRAINING (their new requests queue) until none has requests in flight
      (everyone waiting for the target left: called off, the victims serve on)
    -> each victim SLEEPING while its sleep hook runs, one after another
      (a hook fails and the alive hook does not say "not serving": abandoned, victims serve on)
    -> target WAKING while its wake hook runs
      (fails: its sleep hook cleans up, its waiters get 503, back-off)
    -> target ACTIVE: its waiters are granted in arrival order.

Rules
-----
1. A request goes to a model only while the core holds that model ACTIVE. Grants and the
   in-flight count change together, in one transition.
2. Capacity: a record holds its size from the start of its wake until its sleep succeeds (or its
   alive hook says it does not serve), retired records included. A wake starts only when the
   target fits beside everything held once the chosen victims are asleep; when it cannot (the
   victims cannot make room), the switch waits: two models are never awake past the capacity.
3. A sleep that fails leaves the model ACTIVE unless its alive hook answers "not serving". An
   alive hook that times out answers nothing: the model stays as it is.
4. A model found dead by its alive hook is drained before it is put to sleep: requests already
   admitted to it still hold it.
5. Every request ends exactly once: granted then finished (or left), or refused.
6. Timers are set strictly in the future, and only for something that will then happen.
7. A policy's answer is checked: an unknown model, a time that is not a finite number, or an
   exception is logged and treated as Stay (an exception: as FIFO's answer); while requests
   wait, the policy is asked again a second later, so one bad answer strands nobody.
8. Model state changes only through `TRANSITIONS` (core/states.py).
9. A record is not woken while a retired record of the same server is not asleep (a sleep
   that failed on a model never known to serve, a model removed and added back): the
   retirement's sleep would otherwise reach the server the new record serves from.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias

from llmux.config import Config, GroupConfig, ModelConfig
from llmux.core import events as ev
from llmux.core.capacity import choose_evictions
from llmux.core.commands import (
    ClearTimer,
    Command,
    Grant,
    Observe,
    Refuse,
    Reply,
    RunHook,
    SetTimer,
)
from llmux.core.costs import IDLE, SwitchCostTracker
from llmux.core.snapshot import Snapshot, snapshot_of
from llmux.core.states import TRANSITIONS, Cause, HookName, IllegalTransition, ModelState
from llmux.errors import (
    LlmuxError,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    ShuttingDown,
)
from llmux.policies.fifo import FifoPolicy
from llmux.policies.interface import (
    CallAt,
    Decision,
    Policy,
    RequestArrived,
    RequestCompleted,
    Stay,
    SwitchCompleted,
    SwitchTo,
    TimerFired,
)
from llmux.policies.interface import Event as PolicyEvent

FAILED_SWITCH_BACKOFF_SECS = 2.0
DEFAULT_RETRY_AFTER_SECS = 5.0  # Retry-After when no switch to the model was measured yet
MIN_TIMER_SECS = 0.001  # the soonest a policy's CallAt fires
BAD_ANSWER_RETRY_SECS = 1.0  # a policy that answered nonsense is asked again after this
ROOM_EPSILON = 1e-9

# Timer names.
POLICY_TIMER = "policy"  # the policy's CallAt
SWITCH_TIMER = "switch"  # a wanted switch may start (back-off or min_active_secs over)
ALIVE_TIMER = "alive"  # an idle active model's periodic alive check is due
TTL_TIMER = "ttl"  # an idle active model's ttl_secs is over
RETRY_TIMER = "retry"  # a retired model that would not sleep is tried again

# The sleep of a record a reload replaced or removed (or that is held unknown): its last sleep.
# A server llmux started is stopped then, not put to sleep (builtin_driver.py).
RETIRING_ENV = {"LLMUX_RETIRING": "1"}


@dataclass(eq=False)
class Request:
    rid: int
    model: str
    arrival: float
    granted_to: ModelRecord | None = None


@dataclass(eq=False)
class ModelRecord:
    """One model as the core knows it. A reload that changes a model's backend while it is
    awake makes a new record; the old one is retired (drained, put to sleep, forgotten)."""

    config: ModelConfig
    size: float
    state: ModelState = ModelState.ASLEEP
    queue: deque[Request] = field(default_factory=deque)
    in_flight: int = 0
    active_since: float | None = None
    idle_since: float = 0.0
    last_used: float | None = None
    last_alive_check: float = 0.0
    last_alive: bool | None = None  # the latest alive answer (None: none yet, or no hook)
    check_requested: bool = False  # the proxy could not connect: check it soon
    retiring: bool = False
    name: str = field(init=False)  # a plain attribute: policies' snapshots read it often

    def __post_init__(self) -> None:
        self.name = self.config.name


@dataclass(frozen=True)
class ReloadSummary:
    added: list[str]
    removed: list[str]
    changed: list[str]
    policy_replaced: bool = False


@dataclass(frozen=True)
class SwitchView:
    """The switch in progress, for status reports."""

    source: str | None
    target: str
    evicting: tuple[str, ...]
    started: float

    @property
    def from_label(self) -> str:
        return self.source or IDLE


# ----- operations: one runs at a time; each phase waits for one thing -----


class Phase(StrEnum):
    """Where an operation stands: what it waits for next."""

    NEXT = "next"  # about to take its next model
    DRAIN = "drain"  # the last in-flight request of its victims
    SLEEP = "sleep"  # a sleep hook
    SLEEP_CHECK = "sleep_check"  # the alive hook, after a sleep hook failed
    WAKE = "wake"  # a wake hook
    CLEANUP = "cleanup"  # the sleep hook, after a wake failed
    CLEANUP_CHECK = "cleanup_check"  # the alive hook, after that cleanup failed


@dataclass(eq=False)
class _Switch:
    target: ModelRecord
    victims: list[ModelRecord]
    started: float
    phase: Phase = Phase.DRAIN  # then SLEEP (SLEEP_CHECK), WAKE (CLEANUP, CLEANUP_CHECK)
    index: int = 0  # the victim being put to sleep
    job: int | None = None
    drain_started: float = 0.0
    drain_seconds: float = 0.0
    sleep_seconds: float = 0.0
    wake_failure: str = ""

    @property
    def source(self) -> ModelRecord | None:
        return self.victims[0] if self.victims else None


@dataclass(eq=False)
class _Retreat:
    """Drain a model, put it to sleep: for an idle sleep, an admin sleep, a retirement, or a
    model found dead. `reply` (admin) is answered when the whole request is done."""

    purpose: str  # idle, admin, retire, dead, extra
    models: deque[ModelRecord]
    reply: int | None = None
    unknown: set[ModelRecord] = field(default_factory=set)  # never known to serve
    phase: Phase = Phase.NEXT  # then DRAIN, SLEEP (SLEEP_CHECK) per model
    job: int | None = None
    errors: list[LlmuxError] = field(default_factory=list)
    failure: str = ""

    @property
    def model(self) -> ModelRecord:
        return self.models[0]


@dataclass(eq=False)
class _AliveCheck:
    model: ModelRecord
    job: int | None = None


@dataclass(eq=False)
class _Reconcile:
    asked: list[ModelRecord] = field(default_factory=list)  # in config order
    jobs: dict[int, ModelRecord] = field(default_factory=dict)
    serving: set[ModelRecord] = field(default_factory=set)
    unknown: set[ModelRecord] = field(default_factory=set)  # its alive hook timed out


@dataclass(eq=False)
class _Preload:
    names: deque[str]
    model: ModelRecord | None = None
    phase: Phase = Phase.NEXT  # then WAKE (CLEANUP, CLEANUP_CHECK) per model
    job: int | None = None
    failure: str = ""


_Op: TypeAlias = _Switch | _Retreat | _AliveCheck | _Reconcile | _Preload


class GroupCore:
    """The rules of one group (`config` narrowed to it by `Config.group_config`)."""

    def __init__(self, config: Config, policy: Policy, costs: SwitchCostTracker) -> None:
        self.config = config
        self.group: GroupConfig = next(iter(config.groups.values()))
        self.policy = policy
        self.costs = costs
        self.models = {name: self._record(cfg) for name, cfg in config.models.items()}
        self.retiring: list[ModelRecord] = []
        self.requests: dict[int, Request] = {}
        self.now = 0.0
        self.ready = False
        self.closing = False
        self.op: _Op | None = None
        self.pending: deque[_Op] = deque()  # start-up, then admin sleeps, in order asked
        self.last_reload: ReloadSummary | None = None
        self.switch_wanted: str | None = None
        self.retry_at = -math.inf
        self._policy_timer: float | None = None
        self._armed: dict[str, float] = {}
        self._jobs = itertools.count(1)
        self._out: list[Command] = []

    def _record(self, config: ModelConfig) -> ModelRecord:
        return ModelRecord(config, size=self.group.size_of(config))

    # ----- the one entry point -----

    def handle(self, event: ev.Event) -> list[Command]:
        """Apply one event; return what to do about it."""
        self.now = event.now
        self._out = []
        getattr(self, _HANDLERS[type(event)])(event)
        self._advance()
        self._arm_timers()
        return self._out

    # ----- views -----

    @property
    def switching(self) -> bool:
        return self.switch_wanted is not None or isinstance(self.op, _Switch)

    @property
    def current_switch(self) -> SwitchView | None:
        if not isinstance(self.op, _Switch):
            return None
        op = self.op
        source = op.source.name if op.source else None
        evicting = tuple(v.name for v in op.victims)
        return SwitchView(source, op.target.name, evicting, op.started)

    def snapshot(self) -> Snapshot:
        return snapshot_of(
            self.now,
            self.models.values(),
            self.switching,
            self.costs.switches,
            self.costs.cold_starts,
            self.group.room,
            self.costs.wakes,
        )

    def held(self, leaving_out: ModelRecord | None = None) -> float:
        """Capacity held now by every record that is not asleep (retired ones included)."""
        return sum(
            m.size
            for m in (*self.models.values(), *self.retiring)
            if m.state is not ModelState.ASLEEP and m is not leaving_out
        )

    def in_flight_of(self, name: str) -> int:
        """In flight under this name: the current record's and any retired one's."""
        records = [*self.retiring, self.models.get(name)]
        return sum(m.in_flight for m in records if m is not None and m.name == name)

    def refusal(self, name: str) -> LlmuxError | None:
        """Why a request for `name` would be refused at once, if it would."""
        model = self.models.get(name)
        if model is None:
            return ModelNotFound(f"model {name!r} is no longer configured")
        if self.closing:
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

    # ----- requests -----

    def _on_arrived(self, event: ev.Arrived) -> None:
        refused = self.refusal(event.model)
        if refused is not None:
            self._out.append(Refuse(event.rid, refused))
            return
        model = self.models[event.model]
        request = Request(event.rid, event.model, self.now)
        self.requests[event.rid] = request
        if self._may_start_now(model):
            self._grant(model, request)
            return
        model.queue.append(request)
        self._consult(RequestArrived(model.name))

    def _on_left(self, event: ev.Left) -> None:
        request = self.requests.get(event.rid)
        if request is None:
            return  # already ended (refused, or failed while it waited)
        if request.granted_to is not None:
            self._release(request)
            return
        del self.requests[event.rid]
        model = self.models.get(request.model)
        if model is not None and request in model.queue:
            model.queue.remove(request)

    def _on_finished(self, event: ev.Finished) -> None:
        request = self.requests.get(event.rid)
        if request is not None and request.granted_to is not None:
            self._release(request)

    def _may_start_now(self, model: ModelRecord) -> bool:
        return model.state is ModelState.ACTIVE and not model.queue and self._has_room(model)

    def _has_room(self, model: ModelRecord) -> bool:
        limit = self.config.server.max_in_flight_per_model
        return limit is None or model.in_flight < limit

    def _grant(self, model: ModelRecord, request: Request) -> None:
        model.in_flight += 1
        model.last_used = self.now
        request.granted_to = model
        self._out.append(Grant(request.rid, model.config, self.now - request.arrival))

    def _grant_waiting(self, model: ModelRecord) -> None:
        """Give waiters of an ACTIVE model slots, in arrival order, while it has room."""
        while model.queue and model.state is ModelState.ACTIVE and self._has_room(model):
            self._grant(model, model.queue.popleft())

    def _release(self, request: Request) -> None:
        model = request.granted_to
        assert model is not None
        del self.requests[request.rid]
        model.in_flight -= 1
        model.last_used = self.now
        if model.in_flight == 0:
            model.idle_since = self.now
        if model.queue and model.state is ModelState.ACTIVE:
            self._grant_waiting(model)  # one held back by max_in_flight_per_model
        self._consult(RequestCompleted(model.name))

    def _fail_queue(self, model: ModelRecord, error: LlmuxError) -> None:
        while model.queue:
            request = model.queue.popleft()
            del self.requests[request.rid]
            self._out.append(Refuse(request.rid, error))

    # ----- the policy -----

    def _consult(self, event: PolicyEvent) -> None:
        if not self.ready or self.closing:
            return
        if self.group.capacity is not None and not self.switching:
            # Waking a model into free room disturbs nobody: no policy decision to make.
            waiting = [m for m in self._waiting() if m.state is ModelState.ASLEEP]
            for model in sorted(waiting, key=lambda m: m.queue[0].arrival):
                if self._fits(model, []):
                    self.switch_wanted = model.name
                    return
        snapshot = self.snapshot()
        try:
            decision = self.policy.decide(event, snapshot)
        except Exception as exc:
            self._observe(
                "policy_failed", f"policy {self.policy!r} failed ({exc!r}); FIFO decides this "
                "once", level="error",
            )  # fmt: skip
            decision = FifoPolicy().decide(event, snapshot)
        self._apply(self._checked(decision))

    def _checked(self, decision: Decision) -> Decision:
        """The decision if it makes sense, else Stay (rule 7)."""
        if isinstance(decision, SwitchTo):
            if isinstance(decision.model, str) and decision.model in self.models:
                return decision
            problem = f"asked to switch to {decision.model!r}, which is not in the group"
        elif isinstance(decision, CallAt):
            when = decision.when
            if isinstance(when, int | float) and not isinstance(when, bool) and math.isfinite(when):
                return decision
            problem = f"asked to be called at {when!r}, not a finite time"
        elif isinstance(decision, Stay):
            return decision
        else:
            problem = f"answered {decision!r}, not Stay, SwitchTo or CallAt"
        if self._waiting():
            # Nobody is stranded by one bad answer: the policy is asked again shortly.
            again = self.now + BAD_ANSWER_RETRY_SECS
            if self._policy_timer is None or self._policy_timer > again:
                self._policy_timer = again
            problem += f"; asked again in {BAD_ANSWER_RETRY_SECS:g}s"
        self._observe("policy_failed", f"policy {problem}: ignored", level="error")
        return Stay()

    def _apply(self, decision: Decision) -> None:
        if isinstance(decision, SwitchTo):
            target = self.models[decision.model]
            if not self.switching and target.state is not ModelState.ACTIVE:
                self.switch_wanted = target.name
        elif isinstance(decision, CallAt):
            # A time not in the future would spin: call again a little later (rule 6).
            self._policy_timer = max(float(decision.when), self.now + MIN_TIMER_SECS)

    # ----- timers -----

    def _on_timer(self, event: ev.TimerDue) -> None:
        self._armed.pop(event.name, None)
        if event.name == POLICY_TIMER:
            self._policy_timer = None
            self._consult(TimerFired())
        # The others are looked at by _advance: what was due starts there.

    def _arm_timers(self) -> None:
        wanted: dict[str, float] = {}
        if self._policy_timer is not None:
            wanted[POLICY_TIMER] = self._policy_timer
        switch_at = self._switch_may_start_at()
        if switch_at is not None and switch_at > self.now:
            wanted[SWITCH_TIMER] = switch_at
        if self.op is None and self.ready and not self.closing:
            # A time already past is not armed: what it was for waits for a wanted switch
            # (which holds it up), and is looked at again when that ends (rule 6).
            for name, at in (
                (ALIVE_TIMER, self._next_alive_check()),
                (TTL_TIMER, self._next_idle_sleep()),
                (RETRY_TIMER, self._next_retirement()),
            ):
                if at is not None and at > self.now:
                    wanted[name] = at
        for name in list(self._armed):
            if name not in wanted:
                del self._armed[name]
                self._out.append(ClearTimer(name))
        for name, at in wanted.items():
            if self._armed.get(name) != at:
                self._armed[name] = at
                self._out.append(SetTimer(name, at))

    # ----- what runs next -----

    def _advance(self) -> None:
        """Move the running operation on if what it waits for has happened; when none runs,
        start the next one that may start. Repeats until nothing changes."""
        while True:
            if self.op is not None:
                if not self._continue_op():
                    return
                continue
            if not self._start_next_op():
                return

    def _start_next_op(self) -> bool:
        if self.pending:
            self.op = self.pending.popleft()
            return True
        if not self.ready:
            return False
        retired = self._due_retirement()
        if retired is not None:
            # Before any switch: a retired model may still be awake (rule 2).
            self.op = _Retreat("retire", deque([retired]))
            return True
        if self.closing:
            return False
        if self.switch_wanted is not None:
            if self._drop_stale_switch():
                return True
            if self._start_switch():
                return True
        if self.switch_wanted is None:
            due = self._due_alive_check()
            if due is not None:
                self.op = _AliveCheck(due)
                return True
            idle = self._due_idle_sleep()
            if idle is not None:
                self._observe(
                    "model_idle_sleep", f"{idle.name} idle for "
                    f"{self.now - max(idle.idle_since, idle.active_since or 0.0):.1f}s "
                    f"(ttl_secs {idle.config.ttl_secs:g}): putting it to sleep",
                    model=idle.name,
                )  # fmt: skip
                self.op = _Retreat("idle", deque([idle]))
                return True
        return False

    def _continue_op(self) -> bool:
        """One step of the running operation; False when it waits for something."""
        op = self.op
        if isinstance(op, _Switch):
            return self._switch_step(op)
        if isinstance(op, _Retreat):
            return self._retreat_step(op)
        if isinstance(op, _AliveCheck):
            return self._alive_step(op)
        if isinstance(op, _Reconcile):
            return self._reconcile_step(op)
        assert isinstance(op, _Preload)
        return self._preload_step(op)

    def _end_op(self) -> None:
        self.op = None
        self._forget_retired()

    # ----- switching -----

    def _drop_stale_switch(self) -> bool:
        """A wanted switch whose target is gone, serves already, or has nobody waiting ends."""
        target = self.models.get(self.switch_wanted or "")
        if target is not None and target.queue and target.state is not ModelState.ACTIVE:
            return False
        name = self.switch_wanted
        self.switch_wanted = None
        if name is not None:
            self._consult(SwitchCompleted(name, False))
        return True

    def _switch_may_start_at(self) -> float | None:
        """When the wanted switch may start (back-off, min_active_secs); None if no switch is
        wanted or something else (an operation, a retirement) holds it up."""
        if self.switch_wanted is None or self.op is not None or self.pending:
            return None
        target = self.models.get(self.switch_wanted)
        if target is None:
            return None
        at = self.retry_at
        victims = self._victims_for(target)
        started = [v.active_since for v in victims if v.active_since is not None]
        if started:
            at = max(at, max(started) + self.config.policy.min_active_secs)
        return at

    def _start_switch(self) -> bool:
        at = self._switch_may_start_at()
        if at is None or at > self.now:
            return False
        target = self.models[self.switch_wanted or ""]
        if self._server_held_by_a_retired_record(target):
            return False  # its retirement's sleep comes first (rule 9)
        victims = self._victims_for(target)
        if not self._room_can_be_made(target, victims):
            return False  # rule 2: wait until it can
        self.switch_wanted = None
        op = _Switch(target, victims, self.now, drain_started=self.now)
        self.op = op
        labels = {"from": op.source.name if op.source else IDLE, "to": target.name}
        evicting = (
            f" (putting {', '.join(v.name for v in victims)} to sleep)" if len(victims) > 1 else ""
        )
        self._observe(
            "switch_started", f"switching {labels['from']} -> {target.name}{evicting}",
            evicting=[v.name for v in victims], **labels,
        )  # fmt: skip
        for victim in victims:
            self._move(victim, Cause.DRAIN)
        return True

    def _switch_step(self, op: _Switch) -> bool:
        if op.job is not None:
            return False  # a hook runs
        if op.phase == Phase.DRAIN:
            return self._switch_drain(op)
        if op.phase == Phase.SLEEP:
            if op.index == len(op.victims):
                op.phase = Phase.WAKE
                return True
            victim = op.victims[op.index]
            self._move(victim, Cause.SLEEP_STARTED)
            if victim.active_since is not None:
                self._observe_quietly(
                    "model_active_duration", model=victim.name,
                    seconds=self.now - victim.active_since,
                )  # fmt: skip
            op.job = self._run(victim, HookName.SLEEP, self._switch_env(victim, op.target))
            return False
        if op.phase == Phase.WAKE:
            target = op.target
            if self.models.get(target.name) is not target:
                # A reload removed or replaced it meanwhile: wake nothing; the policy decides
                # again (the replacement has its waiters).
                self._observe(
                    "switch_cancelled", f"switch to {target.name} called off: a reload "
                    "changed it", **self._labels(op),
                )  # fmt: skip
                self._end_switch(op, ok=False)
                return True
            self._move(target, Cause.WAKE_STARTED)
            target.last_alive = None  # an answer from before the wake says nothing about now
            op.job = self._run(target, HookName.WAKE, self._switch_env(op.source, target))
            return False
        return False

    def _switch_drain(self, op: _Switch) -> bool:
        drained = all(v.in_flight == 0 for v in op.victims)
        if not drained and self.config.policy.drain_before_switch and op.target.queue:
            return False
        op.drain_seconds = self.now - op.drain_started
        for victim in op.victims:
            self._observe_quietly("drain_measured", model=victim.name, seconds=op.drain_seconds)
        if not op.target.queue:
            self._call_off(op)
            return True
        op.phase = Phase.SLEEP
        return True

    def _call_off(self, op: _Switch) -> None:
        source = op.source.name if op.source else IDLE
        self._observe(
            "switch_cancelled", f"switch {source} -> {op.target.name} called off: nobody waits "
            f"for {op.target.name} any more", **{"from": source, "to": op.target.name},
        )  # fmt: skip
        for victim in op.victims:
            self._move(victim, Cause.DRAIN_CALLED_OFF)
            self._grant_waiting(victim)
        self._end_switch(op, ok=False)

    def _end_switch(self, op: _Switch, ok: bool) -> None:
        self._end_op()
        self._observe_quietly("switch_ended", **self._labels(op))
        self._consult(SwitchCompleted(op.target.name, ok))

    def _switch_hook_done(self, op: _Switch, outcome: ev.HookOutcome) -> None:
        op.job = None
        if op.phase == Phase.SLEEP:
            victim = op.victims[op.index]
            if outcome.ok:
                self._slept(victim)
                op.sleep_seconds += outcome.duration
                op.index += 1
            elif victim.config.has_alive:
                op.phase = Phase.SLEEP_CHECK
                op.wake_failure = outcome.failure
                op.job = self._run(victim, HookName.ALIVE)
            else:
                self._abandon(op, outcome.failure, "it has no alive hook to confirm")
        elif op.phase == Phase.SLEEP_CHECK:
            victim = op.victims[op.index]
            victim.last_alive = outcome.ok
            if _says_not_serving(outcome):
                self._observe(
                    "sleep_failed_not_serving", f"sleep hook for {victim.name} failed but it "
                    "no longer serves; continuing", level="warning", model=victim.name,
                )  # fmt: skip
                self._move(victim, Cause.GONE)
                victim.active_since = None
                op.index += 1
                op.phase = Phase.SLEEP
            else:
                self._abandon(op, op.wake_failure, "its alive hook still passes")
        elif op.phase == Phase.WAKE:
            if outcome.ok:
                self._activated(op, outcome)
            else:
                self._wake_failed(op, outcome)
        elif op.phase == Phase.CLEANUP:
            self._cleaned_up(op, outcome)
        elif op.phase == Phase.CLEANUP_CHECK:
            op.target.last_alive = outcome.ok
            if outcome.ok:  # its wake failed, yet it serves
                self._move(op.target, Cause.STILL_SERVING)
                self._activate(op.target)
                self._end_switch(op, ok=True)
            elif outcome.timed_out:
                self._hold_unknown(op.target)
                self._wake_lost(op)
            else:
                self._move(op.target, Cause.GONE)
                self._wake_lost(op)

    def _abandon(self, op: _Switch, failure: str, reason: str) -> None:
        """A victim could not be put to sleep and may still serve: it and the victims not yet
        put to sleep serve on; the target's waiters get 503."""
        victim = op.victims[op.index]
        labels = self._labels(op)
        self._observe(
            "switch_failed", f"switch {victim.name} -> {op.target.name} abandoned: sleep "
            f"failed and {reason}", level="error", reason="sleep_failed",
            **{"from": victim.name, "to": op.target.name},
        )  # fmt: skip
        self._observe_quietly("switch_result", result="abandoned", **labels)
        self._move(victim, Cause.STILL_SERVING)
        self._activate(victim)
        for spared in op.victims[op.index + 1 :]:
            self._move(spared, Cause.DRAIN_CALLED_OFF)
            self._grant_waiting(spared)
        self.retry_at = self.now + FAILED_SWITCH_BACKOFF_SECS
        what = f"{victim.name} could not be put to sleep"
        self._fail_queue(op.target, self._hook_error(op.target, what, failure))
        self._end_switch(op, ok=False)

    def _activated(self, op: _Switch, outcome: ev.HookOutcome) -> None:
        target = op.target
        self._move(target, Cause.WAKE_OK)
        self._activate(target)
        self.costs.observe_wake(target.name, outcome.duration)
        cost = op.sleep_seconds + outcome.duration
        took = self.now - op.started
        source = op.source.name if op.source else None
        estimate = self.costs.observe(source, target.name, cost)
        labels = self._labels(op)
        self._observe(
            "model_activated", f"{labels['from']} -> {target.name}: active after {took:.2f}s",
            model=target.name, switch_seconds=took, cost_seconds=cost,
            drain_seconds=op.drain_seconds, estimate=estimate, **labels,
        )  # fmt: skip
        self._end_switch(op, ok=True)

    def _wake_failed(self, op: _Switch, outcome: ev.HookOutcome) -> None:
        labels = self._labels(op)
        self._observe(
            "switch_failed", f"wake of {op.target.name} failed; running its sleep hook to "
            "clean up", level="error", reason="wake_failed", **labels,
        )  # fmt: skip
        op.wake_failure = outcome.failure
        self._move(op.target, Cause.WAKE_FAILED)
        op.phase = Phase.CLEANUP
        op.job = self._run(op.target, HookName.SLEEP, self._switch_env(op.source, op.target))

    def _cleaned_up(self, op: _Switch, outcome: ev.HookOutcome) -> None:
        if outcome.ok:
            self._move(op.target, Cause.SLEEP_OK)
            self._wake_lost(op)
        elif op.target.config.has_alive:
            op.phase = Phase.CLEANUP_CHECK
            op.job = self._run(op.target, HookName.ALIVE)
        else:
            self._hold_unknown(op.target)
            self._wake_lost(op)

    def _hold_unknown(self, record: ModelRecord) -> None:
        """Neither woken nor surely asleep (its wake and its sleep failed, and it has no alive
        hook to ask): it may hold memory, so it keeps its room but gets no request; a new
        record takes its place and its waiters, and it is put to sleep again later."""
        self._move(record, Cause.STILL_SERVING)
        if self.models.get(record.name) is not record:
            return  # a reload retired it already: it is put to sleep as a retirement
        replacement = self._record(record.config)
        replacement.queue, record.queue = record.queue, deque()
        self.models[record.name] = replacement
        self._retire(record)

    def _wake_lost(self, op: _Switch) -> None:
        op.target.active_since = None
        self._observe_quietly("switch_result", result="failed", **self._labels(op))
        self.retry_at = self.now + FAILED_SWITCH_BACKOFF_SECS
        self._fail_waiters_of(op.target, op.wake_failure)
        self._end_switch(op, ok=False)

    def _fail_waiters_of(self, woken: ModelRecord, failure: str) -> None:
        """The wake of `woken` failed: its model's waiters get 503, unless a reload gave the
        model a new backend meanwhile (its waiters then wait for that one to be tried)."""
        current = self.models.get(woken.name)
        if current is None or (current is not woken and current.config != woken.config):
            return
        what = f"{woken.name} could not be woken"
        self._fail_queue(current, self._hook_error(woken, what, failure))

    def _labels(self, op: _Switch) -> dict[str, str]:
        return {"from": op.source.name if op.source else IDLE, "to": op.target.name}

    @staticmethod
    def _switch_env(source: ModelRecord | None, target: ModelRecord) -> dict[str, str]:
        return {"LLMUX_FROM": source.name if source else "", "LLMUX_TO": target.name}

    # ----- capacity -----

    def _waiting(self) -> list[ModelRecord]:
        return [m for m in self.models.values() if m.queue and m.state is not ModelState.ACTIVE]

    def _fits(self, target: ModelRecord, victims: list[ModelRecord]) -> bool:
        """Whether `target` fits beside everything held once `victims` are asleep."""
        kept = sum(
            m.size
            for m in (*self.models.values(), *self.retiring)
            if m.state is not ModelState.ASLEEP and m is not target and m not in victims
        )
        return kept + target.size <= self.group.room + ROOM_EPSILON

    def _room_can_be_made(self, target: ModelRecord, victims: list[ModelRecord]) -> bool:
        """Whether putting `victims` to sleep makes room for `target` (retired records, and
        what is not awake to be evicted, may hold room no victim frees)."""
        return self._fits(target, victims)

    def _victims_for(self, target: ModelRecord) -> list[ModelRecord]:
        """The awake models to put to sleep so that `target` fits (none if it fits now)."""
        if self._fits(target, []):
            return []
        names = choose_evictions(self.policy, target.name, self.snapshot())
        return [self.models[name] for name in names]

    # ----- putting a model to sleep outside a switch -----

    def _retreat_step(self, op: _Retreat) -> bool:
        if op.job is not None:
            return False
        if op.phase == Phase.NEXT:
            while op.models and op.model.state not in (ModelState.ACTIVE, ModelState.DRAINING):
                self._retreat_done_with(op)  # asleep already: nothing to do
            if not op.models:
                self._end_retreat(op)
                return True
            if op.model.state is ModelState.ACTIVE:
                cause = Cause.FOUND_DEAD if op.purpose == "dead" else Cause.DRAIN
                self._move(op.model, cause)
            op.phase = Phase.DRAIN
            return True
        if op.phase == Phase.DRAIN:
            if op.model.in_flight:
                return False
            self._move(op.model, Cause.SLEEP_STARTED)
            op.phase = Phase.SLEEP
            env = RETIRING_ENV if op.model.retiring else None
            op.job = self._run(op.model, HookName.SLEEP, env)
        return False

    def _retreat_hook_done(self, op: _Retreat, outcome: ev.HookOutcome) -> None:
        op.job = None
        model = op.model
        if op.phase == Phase.SLEEP:
            if outcome.ok:
                self._slept(model)
                self._retreat_done_with(op)
            elif op.purpose == "dead":
                # Its alive hook already said it does not serve (rule 3).
                self._move(model, Cause.GONE)
                model.active_since = None
                self._retreat_done_with(op)
            elif model.config.has_alive:
                op.failure = outcome.failure
                op.phase = Phase.SLEEP_CHECK
                op.job = self._run(model, HookName.ALIVE)
            else:
                self._sleep_refused(op, outcome.failure)
        elif op.phase == Phase.SLEEP_CHECK:
            model.last_alive = outcome.ok
            if _says_not_serving(outcome):
                self._move(model, Cause.GONE)
                model.active_since = None
                self._retreat_done_with(op)
            else:
                self._sleep_refused(op, op.failure)

    def _sleep_refused(self, op: _Retreat, failure: str) -> None:
        model = op.model
        if model in op.unknown:
            # Never known to serve, and now not surely asleep: held, not trusted (rule 2).
            self._observe(
                "sleep_failed", f"{model.name} may still hold memory (its sleep failed); it "
                "serves nothing until it is put to sleep", level="error", model=model.name,
            )  # fmt: skip
            self.retry_at = self.now + FAILED_SWITCH_BACKOFF_SECS
            self._hold_unknown(model)
            op.models.popleft()
            op.phase = Phase.NEXT
            return
        self._move(model, Cause.STILL_SERVING)
        self._activate(model)
        if op.purpose == "retire":
            # It keeps holding its room (rule 2); its retirement is tried again after a pause.
            self._observe(
                "retire_failed", f"retired model {model.name} could not be put to sleep; "
                f"trying again in {FAILED_SWITCH_BACKOFF_SECS:g}s", level="error",
                model=model.name,
            )  # fmt: skip
            self.retry_at = self.now + FAILED_SWITCH_BACKOFF_SECS
            op.models.popleft()
            op.phase = Phase.NEXT
            return
        self._observe(
            "sleep_failed", f"{op.purpose} sleep of {model.name} failed; it stays active",
            level="error", model=model.name,
        )  # fmt: skip
        op.errors.append(
            self._hook_error(model, f"{model.name} could not be put to sleep", failure)
        )
        op.models.popleft()
        op.phase = Phase.NEXT

    def _retreat_done_with(self, op: _Retreat) -> None:
        op.models.popleft()
        op.phase = Phase.NEXT

    def _end_retreat(self, op: _Retreat) -> None:
        self._end_op()
        if op.reply is not None:
            self._out.append(Reply(op.reply, op.errors[0] if op.errors else None))
        self._consult(TimerFired())  # requests that queued meanwhile

    # ----- alive checks -----

    def _due_alive_check(self) -> ModelRecord | None:
        for model in self.models.values():
            if model.state is not ModelState.ACTIVE or not model.config.has_alive:
                continue
            due = model.last_alive_check + model.config.alive_interval_secs
            if model.check_requested or (model.in_flight == 0 and self.now >= due):
                return model
        return None

    def _next_alive_check(self) -> float | None:
        times = [
            m.last_alive_check + m.config.alive_interval_secs
            for m in self.models.values()
            if m.state is ModelState.ACTIVE and m.config.has_alive and m.in_flight == 0
        ]
        return min(times) if times else None

    def _alive_step(self, op: _AliveCheck) -> bool:
        if op.job is None:
            op.model.check_requested = False
            op.job = self._run(op.model, HookName.ALIVE)
        return False

    def _alive_done(self, op: _AliveCheck, outcome: ev.HookOutcome) -> None:
        model = op.model
        model.last_alive_check = self.now
        self._end_op()
        if outcome.ok:
            model.last_alive = True
            return
        if outcome.timed_out:
            self._observe(
                "alive_timeout", f"alive hook for {model.name} timed out; it stays active",
                level="warning", model=model.name,
            )  # fmt: skip
            return
        model.last_alive = False
        self._observe(
            "model_dead", f"{model.name} is active but its alive hook fails: draining it and "
            "putting it to sleep", level="error", model=model.name,
        )  # fmt: skip
        self.op = _Retreat("dead", deque([model]))

    # ----- idle sleep -----

    def _idle_expiry(self, model: ModelRecord) -> float | None:
        if model.state is not ModelState.ACTIVE or model.config.ttl_secs <= 0:
            return None
        if model.in_flight or model.queue:
            return None
        return max(model.idle_since, model.active_since or 0.0) + model.config.ttl_secs

    def _due_idle_sleep(self) -> ModelRecord | None:
        for model in self.models.values():
            expires = self._idle_expiry(model)
            if expires is not None and self.now >= expires:
                return model
        return None

    def _next_idle_sleep(self) -> float | None:
        times = [t for m in self.models.values() if (t := self._idle_expiry(m)) is not None]
        return min(times) if times else None

    # ----- start-up: reconcile, then preload -----

    def _on_started(self, event: ev.Started) -> None:
        op = _Reconcile()
        for model in self.models.values():
            if model.config.has_alive:
                op.asked.append(model)
                op.jobs[self._run(model, HookName.ALIVE)] = model
        self.op = op

    def _reconcile_step(self, op: _Reconcile) -> bool:
        if op.jobs:
            return False
        # An alive hook that timed out leaves it unknown: it may serve, so it is put to sleep
        # before anything else wakes (rule 2). So is a record a reload replaced meanwhile: the
        # answer was about its backend, which is not the one configured now.
        held = [m for m in op.asked if m in op.serving or m in op.unknown]
        if not held:
            self._observe(
                "nothing_serving", f"no model of group {self.group.name} is serving at start-up"
            )
        extra: deque[ModelRecord] = deque()
        for model in held:
            current = self.models.get(model.name) is model
            adopted = current and model in op.serving and self._fits(model, [])
            self._move(model, Cause.ADOPTED)
            if adopted:
                self._activate(model)
                self._observe(
                    "model_activated", f"{model.name} already serves: adopted as an active "
                    "model", model=model.name, adopted=True,
                )  # fmt: skip
                continue
            model.active_since = self.now
            if not current:
                continue  # retired: put to sleep as a retirement
            self._move(model, Cause.DRAIN)  # held, never granted to: it is put to sleep next
            why = (
                "may be serving (its alive hook timed out)"
                if model in op.unknown
                else ("is also serving at start-up")
            )
            self._observe(
                "extra_serving", f"{model.name} {why}; putting it to sleep", level="warning",
                model=model.name,
            )  # fmt: skip
            extra.append(model)
        self._end_op()
        if extra:
            self.pending.appendleft(_Retreat("extra", extra, unknown=op.unknown & set(extra)))
        preload = deque(n for n in self.config.preload if n in self.models)
        self.pending.append(_Preload(preload))
        return True

    def _reconcile_hook_done(self, op: _Reconcile, job: int, outcome: ev.HookOutcome) -> None:
        model = op.jobs.pop(job)
        model.last_alive = outcome.ok
        if outcome.ok:
            op.serving.add(model)
        elif outcome.timed_out:
            op.unknown.add(model)

    def _preload_step(self, op: _Preload) -> bool:
        if op.job is not None:
            return False
        while op.phase == Phase.NEXT:
            if not op.names:
                self._end_op()
                self.ready = True
                # Requests that queued during start-up reach the policy now, oldest first.
                for model in sorted(self._waiting(), key=lambda m: m.queue[0].arrival):
                    self._consult(RequestArrived(model.name))
                return True
            model = self.models.get(op.names.popleft())
            if model is None or model.state is ModelState.ACTIVE:
                continue
            if self._server_held_by_a_retired_record(model):
                self._observe(
                    "preload_skipped", f"preload: {model.name}'s server is to be put to sleep "
                    "first (its sleep failed); left asleep", level="warning", model=model.name,
                )  # fmt: skip
                continue
            if not self._fits(model, []):
                awake = ", ".join(
                    m.name for m in self.models.values() if m.state is ModelState.ACTIVE
                )
                self._observe(
                    "preload_skipped", f"preload: {model.name} does not fit beside {awake} in "
                    f"group {self.group.name}; left asleep", level="warning", model=model.name,
                )  # fmt: skip
                continue
            op.model, op.phase = model, Phase.WAKE
            self._move(model, Cause.WAKE_STARTED)
            op.job = self._run(model, HookName.WAKE, {"LLMUX_FROM": "", "LLMUX_TO": model.name})
        return False

    def _preload_hook_done(self, op: _Preload, outcome: ev.HookOutcome) -> None:
        op.job = None
        model = op.model
        assert model is not None
        if op.phase == Phase.WAKE:
            if outcome.ok:
                self._move(model, Cause.WAKE_OK)
                self._activate(model)
                self.costs.observe_wake(model.name, outcome.duration)
                estimate = self.costs.observe(None, model.name, outcome.duration)
                self._observe(
                    "model_activated", f"{model.name} preloaded in {outcome.duration:.2f}s",
                    model=model.name, preload=True, cost_seconds=outcome.duration,
                    estimate=estimate,
                )  # fmt: skip
                op.phase = Phase.NEXT
                return
            op.failure = outcome.failure
            self._move(model, Cause.WAKE_FAILED)
            op.phase = Phase.CLEANUP
            op.job = self._run(model, HookName.SLEEP, {"LLMUX_FROM": "", "LLMUX_TO": model.name})
        elif op.phase == Phase.CLEANUP:
            if outcome.ok:
                self._move(model, Cause.SLEEP_OK)
                self._preload_failed(op)
            elif model.config.has_alive:
                op.phase = Phase.CLEANUP_CHECK
                op.job = self._run(model, HookName.ALIVE)
            else:
                self._hold_unknown(model)
                self._preload_failed(op)
        elif op.phase == Phase.CLEANUP_CHECK:
            if outcome.ok:  # its wake failed, yet it serves
                self._move(model, Cause.STILL_SERVING)
                self._activate(model)
                op.phase = Phase.NEXT
            elif outcome.timed_out:
                self._hold_unknown(model)
                self._preload_failed(op)
            else:
                self._move(model, Cause.GONE)
                self._preload_failed(op)

    def _preload_failed(self, op: _Preload) -> None:
        model = op.model
        assert model is not None
        self.retry_at = self.now + FAILED_SWITCH_BACKOFF_SECS
        self._fail_waiters_of(model, op.failure)
        op.phase = Phase.NEXT

    # ----- hooks -----

    def _run(self, model: ModelRecord, hook: HookName, env: dict[str, str] | None = None) -> int:
        job = next(self._jobs)
        self._out.append(RunHook(job, model.name, hook, model.config, env or {}))
        return job

    def _on_hook_done(self, event: ev.HookDone) -> None:
        op = self.op
        if isinstance(op, _Reconcile) and event.job in op.jobs:
            self._reconcile_hook_done(op, event.job, event.outcome)
        elif op is None or getattr(op, "job", None) != event.job:
            return  # not a job of the running operation (cannot happen; ignored, not trusted)
        elif isinstance(op, _Switch):
            self._switch_hook_done(op, event.outcome)
        elif isinstance(op, _Retreat):
            self._retreat_hook_done(op, event.outcome)
        elif isinstance(op, _AliveCheck):
            self._alive_done(op, event.outcome)
        elif isinstance(op, _Preload):
            self._preload_hook_done(op, event.outcome)

    def _hook_error(self, model: ModelRecord, what: str, failure: str) -> ModelUnavailable:
        if self.config.server.expose_hook_errors and failure:
            return ModelUnavailable(f"model {model.name!r} unavailable: {what}: {failure}")
        return ModelUnavailable(f"model {model.name!r} unavailable: {what} (see llmux's log)")

    # ----- states -----

    def _move(self, model: ModelRecord, cause: Cause) -> None:
        """The only way a model's state changes (rule 8)."""
        new = TRANSITIONS.get((model.state, cause))
        if new is None:
            raise IllegalTransition(f"{model.name}: {model.state} --{cause}--> ?")
        model.state = new

    def _activate(self, model: ModelRecord) -> None:
        model.active_since = self.now
        model.last_alive_check = self.now
        model.idle_since = self.now
        self._grant_waiting(model)

    def _slept(self, model: ModelRecord) -> None:
        self._move(model, Cause.SLEEP_OK)
        model.active_since = None

    # ----- admin, unreachable backends, reload, shutdown -----

    def _on_sleep_asked(self, event: ev.SleepAsked) -> None:
        if event.model is None:
            names = [n for n, m in self.models.items() if m.state is ModelState.ACTIVE]
        else:
            names = [event.model] if event.model in self.models else []
        self.pending.append(_Retreat("admin", deque(self.models[n] for n in names), event.reply))

    def _on_unreachable(self, event: ev.Unreachable) -> None:
        model = self.models.get(event.model)
        if model is not None and model.state is ModelState.ACTIVE:
            model.check_requested = True

    def _on_reloaded(self, event: ev.Reloaded) -> None:
        self.last_reload = self.reconfigure(event.config, event.policy)

    def reconfigure(self, config: Config, policy: Policy | None = None) -> ReloadSummary:
        """Apply a new, validated config without dropping a request in flight or queued.

        A model whose backend (port, wake or sleep hook) changed while it is awake gets a new
        record; its queue moves over, and the old record is retired: drained and put to sleep
        with its old hooks before any switch of the group starts. A removed model's waiters
        get 404 at once, and its record is retired if awake."""
        old = dict(self.models)
        self.config = config
        self.group = next(iter(config.groups.values()))
        if policy is not None:
            self.policy = policy
        records: dict[str, ModelRecord] = {}
        changed = []
        for name, cfg in config.models.items():
            record = old.get(name)
            if record is None:
                record = self._record(cfg)
            elif record.config != cfg:
                changed.append(name)
                awake = record.state is not ModelState.ASLEEP or record in self._in_use()
                if awake and _needs_restart(record.config, cfg):
                    replacement = self._record(cfg)
                    replacement.queue, record.queue = record.queue, deque()
                    self._retire(record)
                    record = replacement
                else:
                    record.config = cfg
                    record.size = self.group.size_of(cfg)
            records[name] = record
        removed = [record for name, record in old.items() if name not in config.models]
        for record in removed:
            self._fail_queue(
                record, ModelNotFound(f"model {record.name!r} was removed from the config")
            )
            self._retire(record)
        self.models = records
        if self.switch_wanted is not None and self.switch_wanted not in records:
            self._drop_stale_switch()
        self._consult(TimerFired())
        return ReloadSummary(
            added=[n for n in config.models if n not in old],
            removed=[r.name for r in removed],
            changed=changed,
        )

    def _server_held_by_a_retired_record(self, model: ModelRecord) -> bool:
        """Whether a retired record of the very server `model` would wake is not asleep yet: its
        retirement would put that server to sleep under the woken model (rule 9)."""
        server = _backend_identity(model.config)
        return any(
            r is not model
            and r.state is not ModelState.ASLEEP
            and _backend_identity(r.config) == server
            for r in self.retiring
        )

    def _retire(self, record: ModelRecord) -> None:
        record.retiring = True
        if record.state is not ModelState.ASLEEP or record in self._in_use():
            self.retiring.append(record)  # drained and put to sleep before any switch

    def _in_use(self) -> set[ModelRecord]:
        """The records the running operation acts on: a hook may be running for them."""
        op = self.op
        if isinstance(op, _Switch):
            return {op.target, *op.victims}
        if isinstance(op, _Retreat):
            return set(op.models)
        if isinstance(op, _AliveCheck):
            return {op.model}
        if isinstance(op, _Reconcile):
            return set(op.asked)
        if isinstance(op, _Preload) and op.model is not None:
            return {op.model}
        return set()

    def _forget_retired(self) -> None:
        """Retired records that are asleep and that no operation acts on are done with."""
        in_use = self._in_use()
        for record in list(self.retiring):
            if record.state is ModelState.ASLEEP and record not in in_use and not record.in_flight:
                self.retiring.remove(record)
                self._observe_quietly("record_forgotten", model=record.name)

    def _due_retirement(self) -> ModelRecord | None:
        """A retired record to drain and put to sleep now (an operation may hold the others)."""
        if self.now < self.retry_at:
            return None
        for record in self.retiring:
            if record.state is ModelState.ACTIVE:
                return record
        return None

    def _next_retirement(self) -> float | None:
        if any(r.state is ModelState.ACTIVE for r in self.retiring):
            return self.retry_at
        return None

    def _on_shutdown(self, event: ev.ShutdownBegun) -> None:
        self.closing = True
        self.switch_wanted = None
        for model in self.models.values():
            self._fail_queue(model, ShuttingDown("llmux is shutting down"))

    # ----- observations -----

    def _observe(self, name: str, message: str, level: str = "info", **fields: object) -> None:
        self._out.append(Observe(name, message, dict(fields), level))

    def _observe_quietly(self, name: str, **fields: object) -> None:
        """A figure for a metric, not worth a log line."""
        self._out.append(Observe(name, "", dict(fields), "debug"))


def _says_not_serving(outcome: ev.HookOutcome) -> bool:
    """An alive hook that exited non-zero in time: "not serving". A timeout says nothing."""
    return not outcome.ok and not outcome.timed_out


def _needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether an awake model must be put to sleep with its old hooks before the new config
    applies: its backend moved, or the hooks that know how to wake and sleep it changed."""
    return _backend_identity(old) != _backend_identity(new)


def _backend_identity(config: ModelConfig) -> tuple[object, ...]:
    """What decides where a model's server is and how it is woken and put to sleep."""
    return (config.port, config.wake, config.sleep, config.kind, config.cmd, config.sleep_level)


_HANDLERS = {  # event type -> the method that applies it
    ev.Started: "_on_started",
    ev.Arrived: "_on_arrived",
    ev.Left: "_on_left",
    ev.Finished: "_on_finished",
    ev.HookDone: "_on_hook_done",
    ev.TimerDue: "_on_timer",
    ev.Reloaded: "_on_reloaded",
    ev.SleepAsked: "_on_sleep_asked",
    ev.Unreachable: "_on_unreachable",
    ev.ShutdownBegun: "_on_shutdown",
}
