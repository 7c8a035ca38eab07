"""The rules of one group of models as plain code: events in, commands out, no I/O.

Theory of operation
-------------------
A group is the models that share one GPU (or one set of GPUs). Its core keeps, per model, a
record (core/records.py): its state (core/states.py), the requests waiting for it and the number
in flight. A request arrives (`Arrived`), is granted at once if its model is ACTIVE with room
and nobody waits before it, and otherwise queues while the switch policy is consulted. A grant
names the backend as configured at that moment; the request releases its slot when it
`Finished` (or `Left`), on whichever record granted it, even if a reload has replaced that
record since.

Everything that changes what is awake is an *operation* (core/operation.py), and one runs at a
time (the lifecycle lock), each in its own module: a switch (switch.py), a retreat that puts
models to sleep for an idle sleep, an admin sleep, a retirement or a dead server
(retreat.py), an alive check (alive_check.py), reconciling at start-up and recovering
(reconcile.py), preloading (preload.py). An operation moves through phases; each phase waits
for exactly one thing the core has asked for and will hear about: a hook's end (`HookDone`,
which also comes when a hook could not start), a drain (the last `Finished` of a draining
model), or a timer (`TimerDue`). So no model can stay DRAINING, WAKING or SLEEPING without
something in flight that will move it on.

This module decides what runs next: a switch is wanted when the policy answers `SwitchTo` (or,
in a group with a capacity, when a waiting model fits beside the awake ones: nobody is
disturbed, so nobody is asked). It starts once no operation runs, the back-off after a failed
switch is over, the models it will put to sleep have been active `min_active_secs`, and the
target still has someone waiting. A server that exits (`ServerExited`) stops serving at once,
whatever is wanted or waiting: it drains and is put to sleep before anything else starts.

A model whose `cmd` server failed to start (a wake that had to start it failed) is backed off
on its own (core/start_backoff.py): not woken again until the pause is over, a success or a
reload that changes its config ends it; its waiters, and requests that come meanwhile, are
refused at once, told when to come back (ServerNotStarted). The group's short back-off after
any failed switch is another thing: it only delays the next switch.

When handling an event raises (a bug: the stateful test is there so that it does not), the core
aborts the running operation through one path (`_abort`): the models it acted on are held
UNKNOWN (they keep their room and get no request), grants of that event to them are taken
back (the requests queue again), hooks still running are handed to a recovery, and whoever
waits for the operation is answered. The recovery is the start-up reconcile path; the group
serves on meanwhile.

Rules
-----
1. A request goes to a model only while the core holds that model ACTIVE. Grants and the
   in-flight count change together, in one transition.
2. Capacity: a record holds its size from the start of its wake until its sleep succeeds (or its
   alive hook says it does not serve), retired and unknown records included. A wake starts only
   when the target fits beside everything held once the chosen victims are asleep; when it
   cannot (the victims cannot make room), the switch waits: two models are never awake past the
   capacity.
3. A sleep that fails leaves the model ACTIVE unless its alive hook answers "not serving". An
   alive hook that times out answers nothing: the model stays as it is.
4. A model found dead (its alive hook, or its server's exit) is drained before it is put to
   sleep: requests already admitted to it still hold it. It gets no new request from then on.
5. Every request ends exactly once: granted then finished (or left), or refused.
6. Timers are set strictly in the future, and only for something that will then happen.
7. A policy's every answer is checked in one place (core/policy_answers.py): an unknown model, a
   time that is not a finite number, evictions that are not distinct awake models making room,
   or an exception is logged (once per kind of problem) and replaced by the default answer;
   while requests wait, the policy is asked again a second later, so one bad answer strands
   nobody.
8. Model state changes only through `TRANSITIONS` (core/states.py).
9. A record is not woken while a retired record of the same server is not asleep (a sleep
   that failed on a model never known to serve, a model removed and added back): the
   retirement's sleep would otherwise reach the server the new record serves from.
10. A model is not woken while its start back-off holds, and no request waits for it then:
   each is refused at once (a switch wanted for it ends, its waiters answered).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque

from llmux.config import Config, GroupConfig, ModelConfig
from llmux.core import events as ev
from llmux.core.alive_check import AliveCheck
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
from llmux.core.costs import SwitchCostTracker
from llmux.core.group_view import snapshot_of
from llmux.core.host_ram import HostRam
from llmux.core.operation import FAILED_SWITCH_BACKOFF_SECS, Operation
from llmux.core.policy_answers import (
    Checked,
    checked_decision,
    checked_depth,
    checked_evictions,
)
from llmux.core.reconcile import Reconcile, Recovery
from llmux.core.records import ModelRecord, ReloadSummary, Request, SwitchView
from llmux.core.retreat import Retreat
from llmux.core.snapshot import Snapshot
from llmux.core.start_backoff import StartBackoff
from llmux.core.states import TRANSITIONS, Cause, HookName, IllegalTransition, ModelState
from llmux.core.switch import Switch
from llmux.errors import (
    LlmuxError,
    ModelNotFound,
    ModelUnavailable,
    QueueFull,
    ServerNotStarted,
    ShuttingDown,
)
from llmux.policies.interface import (
    CallAt,
    Decision,
    Policy,
    RequestArrived,
    RequestCompleted,
    SwitchCompleted,
    SwitchTo,
    TimerFired,
)
from llmux.policies.interface import Event as PolicyEvent

DEFAULT_RETRY_AFTER_SECS = 5.0  # Retry-After when no switch to the model was measured yet
MIN_TIMER_SECS = 0.001  # the soonest a policy's CallAt fires
BAD_ANSWER_RETRY_SECS = 1.0  # a policy that answered nonsense is asked again after this
ROOM_EPSILON = 1e-9
ATTEMPTS_PER_EVENT = 3  # an event whose handling keeps failing is given up after this
# Retry-After of a refusal a retry may get past: once the group's back-off after a failed switch
# is over, the switch is tried again.
RETRY_AFTER_FAILED_SWITCH = math.ceil(FAILED_SWITCH_BACKOFF_SECS)

# Timer names.
POLICY_TIMER = "policy"  # the policy's CallAt
SWITCH_TIMER = "switch"  # a wanted switch may start (back-off or min_active_secs over)
GPU_TIMER = "gpu"  # a switch whose target did not fit on its GPUs reads their memory again
ALIVE_TIMER = "alive"  # an idle active model's periodic alive check is due
TTL_TIMER = "ttl"  # an idle active model's ttl_secs is over
RETRY_TIMER = "retry"  # a retired or unknown model that would not sleep is tried again


class GroupCore:
    """The rules of one group (`config` narrowed to it by `Config.group_config`)."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        costs: SwitchCostTracker,
        host_ram: HostRam | None = None,
    ) -> None:
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
        self.op: Operation | None = None
        self.pending: deque[Operation] = deque()  # start-up, admin sleeps, dead servers
        self.last_reload: ReloadSummary | None = None
        self.switch_wanted: str | None = None
        self.retry_at = -math.inf
        self._policy_timer: float | None = None
        self._armed: dict[str, float] = {}
        self._jobs = itertools.count(1)
        self._running: dict[int, tuple[ModelRecord, HookName]] = {}  # job -> its model, hook
        self._policy_problems_told: set[tuple[str, str]] = set()
        self._out: list[Command] = []
        self.host_ram = host_ram if host_ram is not None else HostRam()
        self.host_ram.register(self.host_ram_held, self._largest_known_weights)

    def _record(self, config: ModelConfig) -> ModelRecord:
        return ModelRecord(config, size=self.group.size_of(config))

    # ----- the one entry point -----

    def handle(self, event: ev.Event) -> list[Command]:
        """Apply one event; return what to do about it. Never raises: a failure is aborted
        through one path and the commands already made are returned."""
        self.now = event.now
        self._out = []
        for attempt in range(ATTEMPTS_PER_EVENT):
            try:
                if attempt == 0:
                    getattr(self, _HANDLERS[type(event)])(event)
                self._advance()
                self._arm_timers()
                break
            except Exception as error:
                try:
                    self._abort(event, error)
                except Exception as worse:  # nothing is left to try for this event
                    self._observe(
                        "core_failed", f"the switching core could not recover from {error!r}: "
                        f"{worse!r}", level="error", error=worse,
                    )  # fmt: skip
                    break
        return self._out

    # ----- views -----

    @property
    def switching(self) -> bool:
        return self.switch_wanted is not None or isinstance(self.op, Switch)

    @property
    def current_switch(self) -> SwitchView | None:
        return self.op.view() if isinstance(self.op, Switch) else None

    def snapshot(self) -> Snapshot:
        return snapshot_of(
            self.now,
            self.models.values(),
            self.switching,
            self.costs.switches,
            self.costs.cold_starts,
            self.group.room,
            self.costs.wakes,
            self.costs.idle_wakes,
            sleep_costs=self.costs.sleep_steps,
            wake_step_costs=self.costs.wake_steps,
            sleep_levels={name: self.next_sleep_level(m) for name, m in self.models.items()},
            demand={name: m.demand.rate(self.now) for name, m in self.models.items()},
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

    def refusal(self, name: str, now: float | None = None) -> LlmuxError | None:
        """Why a request for `name` would be refused at once, if it would, at `now` (the
        runtime asks before the request's own event: the latest event's time is stale)."""
        model = self.models.get(name)
        if model is None:
            return ModelNotFound(f"model {name!r} is no longer configured")
        if self.closing:
            return ShuttingDown("llmux is shutting down")
        if self._may_start_now(model):
            return None
        backed_off = self.start_refusal(model, self.now if now is None else now)
        if backed_off is not None:
            return backed_off
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
        model.demand.arrived(self.now)
        request = Request(event.rid, event.model, self.now)
        self.requests[event.rid] = request
        if self._may_start_now(model):
            self._grant(model, request)
            return
        model.queue.append(request)
        self.consult(RequestArrived(model.name))

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

    def grant_waiting(self, model: ModelRecord) -> None:
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
            self.grant_waiting(model)  # one held back by max_in_flight_per_model
        self.consult(RequestCompleted(model.name))

    def fail_queue(self, model: ModelRecord, error: LlmuxError) -> None:
        while model.queue:
            request = model.queue.popleft()
            del self.requests[request.rid]
            self._out.append(Refuse(request.rid, error))

    def fail_waiters_of(self, woken: ModelRecord, failure: str, timed_out: bool = False) -> None:
        """The wake of `woken` failed: its model's waiters get 503, unless a reload gave the
        model a new backend meanwhile (its waiters then wait for that one to be tried). A start
        that failed says how long its back-off holds; a wake that timed out, that a retry would
        wait as long again."""
        current = self.models.get(woken.name)
        if current is None or (current is not woken and current.config != woken.config):
            return
        refusal = self.start_refusal(current) or self.hook_error(
            woken, f"{woken.name} could not be woken", failure, retry=not timed_out
        )
        self.fail_queue(current, refusal)

    def start_refusal(
        self, model: ModelRecord, now: float | None = None
    ) -> ServerNotStarted | None:
        """Why `model` is not woken now: its server failed to start and its back-off holds."""
        now = self.now if now is None else now
        backoff = model.start_backoff
        if model.state is ModelState.ACTIVE or not backoff.holds(now):
            return None
        left = math.ceil(backoff.left(now))
        n = backoff.failures
        failures = "1 failed start" if n == 1 else f"{n} failed starts in a row"
        return ServerNotStarted(
            f"{backoff.message}; not started again for {left}s (back-off after {failures}; "
            "a config reload that changes the model ends it)",
            retry_after=max(1, left),
        )

    def _note_start(self, woken: ModelRecord, outcome: ev.HookOutcome) -> None:
        """A wake that had to start the model's `cmd` server failed (not stopped on purpose):
        the model as configured now is backed off, if it is configured as the one that failed
        (a reload since has a new config tried as it comes)."""
        if outcome.ok or outcome.cancelled or not outcome.cold or woken.config.cmd is None:
            return
        current = self.models.get(woken.name)
        if current is None or current.config != woken.config:
            return
        what = f"{woken.name} could not be woken"  # the failure names the step: its start
        backoff = current.start_backoff
        pause = backoff.failed(self.now, self._unavailable(woken, what, outcome.failure))
        self._observe(
            "start_backoff", f"the server of {woken.name} could not start ({backoff.failures} "
            f"in a row): not started again for {pause:g}s, and requests for it are refused "
            "until then", level="warning", model=woken.name, failures=backoff.failures,
            seconds=pause,
        )  # fmt: skip

    def waiting(self) -> list[ModelRecord]:
        return [m for m in self.models.values() if m.queue and m.state is not ModelState.ACTIVE]

    # ----- the policy -----

    def consult(self, event: PolicyEvent) -> None:
        if not self.ready or self.closing:
            return
        if self.group.capacity is not None and not self.switching:
            # Waking a model into free room disturbs nobody: no policy decision to make.
            waiting = [m for m in self.waiting() if m.state is ModelState.ASLEEP]
            for model in sorted(waiting, key=lambda m: m.queue[0].arrival):
                if self.fits(model, []):
                    self.switch_wanted = model.name
                    return
        checked = checked_decision(self.policy, event, self.snapshot(), self.models)
        if checked.problem:
            again = ""
            if checked.fallback == "stay" and self.waiting():
                # Nobody is stranded by one bad answer: the policy is asked again shortly.
                self._ask_again_soon()
                again = f"; asked again in {BAD_ANSWER_RETRY_SECS:g}s"
            instead = "FIFO decides this once" if checked.fallback == "fifo" else "ignored"
            self._policy_problem("decide", checked, f"{instead}{again}")
        self._apply(checked.decision)

    def _ask_again_soon(self) -> None:
        at = self.now + BAD_ANSWER_RETRY_SECS
        if self._policy_timer is None or self._policy_timer > at:
            self._policy_timer = at

    def _policy_problem(self, answer: str, checked: Checked, instead: str) -> None:
        """Say what was wrong with a policy's answer: at error level (with its traceback, if
        it raised) the first time a mistake of its kind is made, quietly after (a policy that
        is wrong once per event would drown the log)."""
        first = (answer, checked.kind) not in self._policy_problems_told
        self._policy_problems_told.add((answer, checked.kind))
        message = f"policy {self.config.policy.name} {checked.problem}: {instead}"
        if not first:
            message += " (a mistake of this kind was logged before)"
        fields: dict[str, object] = {"answer": answer, "kind": checked.kind}
        if first and checked.error is not None:
            fields["error"] = checked.error
        self._observe("policy_failed", message, level="error" if first else "debug", **fields)

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
            self.consult(TimerFired())
        # The others are looked at by _advance: what was due starts there.

    def _arm_timers(self) -> None:
        wanted: dict[str, float] = {}
        if self._policy_timer is not None:
            wanted[POLICY_TIMER] = self._policy_timer
        switch_at = self._switch_may_start_at()
        if switch_at is not None and switch_at > self.now:
            wanted[SWITCH_TIMER] = switch_at
        if isinstance(self.op, Switch) and self.op.read_again_at is not None:
            wanted[GPU_TIMER] = self.op.read_again_at
        if self.op is None and self.ready and not self.closing:
            # A time already past is not armed: what it was for waits for a wanted switch
            # (which holds it up), and is looked at again when that ends (rule 6).
            for name, at in (
                (ALIVE_TIMER, self._next_alive_check()),
                (TTL_TIMER, self._next_idle_sleep()),
                (RETRY_TIMER, self._next_retry()),
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
                if not self.op.step(self):
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
            self.op = Retreat("retire", deque([retired]))
            return True
        unknown = self._due_recovery()
        if unknown:
            self.op = Recovery(unknown)
            return True
        if self.closing:
            return False
        if self.switch_wanted is not None:
            if self._drop_stale_switch():
                return True
            if self._start_switch():
                return True
        requested = self._requested_alive_check()
        if requested is not None:
            # The proxy could not reach it: asked now, even while a switch waits (rule 4).
            self.op = AliveCheck(requested)
            return True
        if self.switch_wanted is None:
            due = self._due_alive_check()
            if due is not None:
                self.op = AliveCheck(due)
                return True
            idle = self._due_idle_sleep()
            if idle is not None:
                self._observe(
                    "model_idle_sleep", f"{idle.name} idle for "
                    f"{self.now - max(idle.idle_since, idle.active_since or 0.0):.1f}s "
                    f"(ttl_secs {idle.config.ttl_secs:g}): putting it to sleep",
                    model=idle.name,
                )  # fmt: skip
                self.op = Retreat("idle", deque([idle]))
                return True
        return False

    def end_op(self, then: Operation | None = None) -> None:
        """The running operation is over; `then` (if any) runs next, before anything else."""
        self.op = None
        self._forget_retired()
        self.op = then

    # ----- switching -----

    def _drop_stale_switch(self) -> bool:
        """A wanted switch whose target is gone, serves already, or has nobody waiting ends."""
        target = self.models.get(self.switch_wanted or "")
        if target is not None and target.queue and target.state is not ModelState.ACTIVE:
            backed_off = self.start_refusal(target)
            if backed_off is None:
                return False
            self.fail_queue(target, backed_off)  # no timer would wake them for its end (rule 10)
        name = self.switch_wanted
        self.switch_wanted = None
        if name is not None:
            self.consult(SwitchCompleted(name, False))
        return True

    def _switch_may_start_at(self) -> float | None:
        """When the wanted switch may start (back-off, min_active_secs); None if no switch is
        wanted or something else (an operation, a retirement) holds it up."""
        if self.switch_wanted is None or self.op is not None or self.pending:
            return None
        target = self.models.get(self.switch_wanted)
        if target is None or target.state is not ModelState.ASLEEP:
            return None  # being recovered or put to sleep: the switch waits for that
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
        if self.server_held_by_a_retired_record(target):
            return False  # its retirement's sleep comes first (rule 9)
        victims = self._victims_for(target)
        if not self.room_can_be_made(target, victims):
            return False  # rule 2: wait until it can
        self.switch_wanted = None
        # What the switch should take, for the wait notices (opt-in: not a snapshot per switch
        # for nobody).
        told = self.config.server.stream_wait_notice
        estimate = self.snapshot().estimated_cost(target.name) if told else None
        self.op = Switch.begin(self, target, victims, estimate)
        return True

    # ----- capacity -----

    def fits(self, target: ModelRecord, victims: list[ModelRecord]) -> bool:
        """Whether `target` fits beside everything held once `victims` are asleep."""
        kept = sum(
            m.size
            for m in (*self.models.values(), *self.retiring)
            if m.state is not ModelState.ASLEEP and m is not target and m not in victims
        )
        return kept + target.size <= self.group.room + ROOM_EPSILON

    def room_can_be_made(self, target: ModelRecord, victims: list[ModelRecord]) -> bool:
        """Whether putting `victims` to sleep makes room for `target` (retired and unknown
        records, and what is not awake to be evicted, may hold room no victim frees)."""
        return self.fits(target, victims)

    def _victims_for(self, target: ModelRecord) -> list[ModelRecord]:
        """The awake models to put to sleep so that `target` fits (none if it fits now)."""
        if self.fits(target, []):
            return []
        names, problem = checked_evictions(self.policy, target.name, self.snapshot())
        if problem is not None:
            self._policy_problem("evict", problem, "the default evictions instead")
        return [self.models[name] for name in names]

    # ----- alive checks and idle sleeps: when they are due -----

    def _requested_alive_check(self) -> ModelRecord | None:
        asked = [m for m in self.models.values() if m.check_requested and m.config.has_alive]
        return next((m for m in asked if m.state is ModelState.ACTIVE), None)

    def _due_alive_check(self) -> ModelRecord | None:
        for model in self.models.values():
            if model.state is not ModelState.ACTIVE or not model.config.has_alive:
                continue
            due = model.last_alive_check + model.config.alive_interval_secs
            if model.in_flight == 0 and self.now >= due:
                return model
        return None

    def _next_alive_check(self) -> float | None:
        times = [
            m.last_alive_check + m.config.alive_interval_secs
            for m in self.models.values()
            if m.state is ModelState.ACTIVE and m.config.has_alive and m.in_flight == 0
        ]
        return min(times) if times else None

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

    # ----- hooks -----

    def run(
        self,
        model: ModelRecord,
        hook: HookName,
        env: dict[str, str] | None = None,
        waiting: int = 0,
    ) -> int:
        """Ask for `hook` of `model`; `waiting`: the requests a sleep keeps waiting (those of
        the model that replaces it), which its depth is chosen by."""
        level = None
        if hook is HookName.SLEEP:
            level = model.sleeping_at = self.sleep_depth(model, waiting)
        elif hook is HookName.WAKE:
            level = model.woken_from or model.config.sleep_level  # moved to WAKING just before
        job = next(self._jobs)  # only now: a hook that is not asked for is not waited for
        self._running[job] = (model, hook)
        self._out.append(RunHook(job, model.name, hook, model.config, env or {}, level))
        return job

    def sleep_depth(self, model: ModelRecord, waiting: int = 0) -> int:
        """The depth `model` is put to sleep at now: its configured `sleep_level`, or for
        "auto" the policy's choice (core/depth.py); level 1 only if its weights fit in host RAM
        beside the other sleepers' (core/host_ram.py), else level 2."""
        config = model.config
        if config.kind != "vllm":
            return config.sleep_level  # only vLLM has depths; the label says what was asked
        if model.retiring:
            return 2  # its last sleep: nothing wakes it through this record, keep nothing
        level = config.sleep_level
        if config.auto_sleep_level:
            level, problem = checked_depth(self.policy, model.name, waiting, self.snapshot())
            if problem is not None:
                self._policy_problem("sleep_depth", problem, "the default depth instead")
        weights = self.weights_of(model)
        if level == 1 and not self.host_ram.fits(weights):
            held, room = self.host_ram.held_gb(), self.host_ram.capacity_gb
            self._observe(
                "sleep_deepened", f"{model.name} sleeps at level 2, not 1: its weights "
                f"({weights:g} GiB) do not fit in host RAM beside the other sleepers' ({held:g} "
                f"of {room:g} GiB)", model=model.name, weights_gb=weights,
            )  # fmt: skip
            level = 2
        return level

    def next_sleep_level(self, model: ModelRecord) -> int | None:
        """The depth `model` would sleep at, as a policy is told (None: chosen when it does)."""
        if model.config.kind == "vllm" and model.config.auto_sleep_level:
            return None
        return model.config.sleep_level

    def weights_of(self, model: ModelRecord) -> float:
        """The host RAM (GiB) its level-1 sleep holds: measured, else configured, else as much
        as the largest known of any group's (so a first sleep of a model with no `weights_gb`
        is not let past the limit once one is known), else 0."""
        known = _known_weights(model)
        return known if known is not None else self.host_ram.largest_known_gb()

    def _largest_known_weights(self) -> float:
        known = [w for m in self.models.values() if (w := _known_weights(m)) is not None]
        return max(known, default=0.0)

    def host_ram_held(self) -> float:
        """What this group's level-1 sleepers hold (from the start of their sleep: the
        weights are copied out while it runs)."""
        return sum(
            self.weights_of(m)
            for m in (*self.models.values(), *self.retiring)
            if m.config.kind == "vllm"
            and (
                (m.state is ModelState.SLEEPING and m.sleeping_at == 1)
                or (m.state is ModelState.ASLEEP and m.slept_level == 1)
            )
        )

    def _on_hook_done(self, event: ev.HookDone) -> None:
        ran = self._running.pop(event.job, None)
        if ran is not None and ran[1] is HookName.WAKE:
            self._note_start(ran[0], event.outcome)  # whichever operation ran it, first
        op = self.op
        if op is None or event.job not in op.jobs():
            return  # not a job of the running operation (cannot happen; ignored, not trusted)
        op.hook_done(self, event.job, event.outcome)

    def hook_error(
        self, model: ModelRecord, what: str, failure: str, retry: bool = True
    ) -> ModelUnavailable:
        """A hook's failure as a client is told it: worth a retry once the group's back-off
        is over, or (`retry` false) not within seconds."""
        message = self._unavailable(model, what, failure)
        if retry:
            return ModelUnavailable(message, retry_after=RETRY_AFTER_FAILED_SWITCH)
        return ModelUnavailable(message, retry=False)

    def _unavailable(self, model: ModelRecord, what: str, failure: str) -> str:
        """What went wrong, with the hook's own words if server.expose_hook_errors allows."""
        if self.config.server.expose_hook_errors and failure:
            return f"model {model.name!r} unavailable: {what}: {failure}"
        return f"model {model.name!r} unavailable: {what} (see llmux's log)"

    def emit_reply(self, reply: int, error: LlmuxError | None) -> None:
        self._out.append(Reply(reply, error))

    def cancel(self, job: int) -> None:
        """Ask the executor to stop a running step; its HookDone still comes."""
        self._out.append(CancelHook(job))

    def read_gpus(self) -> int:
        """Ask for the free memory of the group's GPUs; a GpuMemoryRead answers `job`."""
        job = next(self._jobs)
        self._out.append(ReadGpuMemory(job, self.group.gpus))
        return job

    def gpu_room_needed(self, model: ModelRecord) -> float | None:
        """GiB each of the group's GPUs must have free before `model` wakes: its share of its
        memory_gb (split evenly, as tensor parallelism does), plus the margin; None when
        nothing is checked (no GPUs named, or a size not given as memory_gb)."""
        gpus = self.group.gpus
        if not gpus or model.config.size is None or not model.config.size_in_gib:
            return None
        return model.config.size / len(gpus) + self.config.server.gpu_margin_gb

    def _on_gpu_read(self, event: ev.GpuMemoryRead) -> None:
        if isinstance(self.op, Switch):
            self.op.gpu_read(self, event.job, event.free_gb)

    # ----- states -----

    def move(self, model: ModelRecord, cause: Cause) -> None:
        """The only way a model's state changes (rule 8). The depth it sleeps at is known
        from a sleep that succeeded until it is woken; a wake starts from that depth."""
        new = TRANSITIONS.get((model.state, cause))
        if new is None:
            raise IllegalTransition(f"{model.name}: {model.state} --{cause}--> ?")
        model.state = new
        if cause is Cause.SLEEP_OK:
            model.slept_level = model.sleeping_at
        elif cause is Cause.WAKE_STARTED:
            model.woken_from, model.slept_level = model.slept_level, None
        elif new is not ModelState.ASLEEP and new is not ModelState.WAKING:
            model.slept_level = None
        elif cause is Cause.GONE:
            model.slept_level = None  # it does not serve; how it went is not known
        if new is not ModelState.SLEEPING and new is not ModelState.ASLEEP:
            model.sleeping_at = None  # no sleep of it holds anything now

    def activate(self, model: ModelRecord) -> None:
        model.active_since = self.now
        model.last_alive_check = self.now
        model.idle_since = self.now
        model.exited = False
        model.server_running = True
        model.start_backoff = StartBackoff()  # it serves: whatever failed before is over
        self.grant_waiting(model)

    def slept(self, model: ModelRecord, outcome: ev.HookOutcome) -> None:
        """Its sleep hook succeeded: measured per depth (what evicting it costs), and what its
        level-1 sleep holds in host RAM, if the driver could tell."""
        self.move(model, Cause.SLEEP_OK)
        model.active_since = None
        if model.config.kind is None:
            model.server_running = False  # a plain `cmd` server sleeps by being stopped
        level = model.slept_level or model.config.sleep_level
        if level == 1 and outcome.host_gb is not None:
            model.host_gb = outcome.host_gb
        seconds = outcome.duration
        estimate = self.costs.observe_sleep(model.name, level, seconds)
        self.observe_quietly(
            "sleep_measured", model=model.name, level=level, seconds=seconds, estimate=estimate
        )

    def serve_again(self, model: ModelRecord) -> None:
        """A drained model whose switch was called off serves on, unless its server exited
        meanwhile: then it is put to sleep next (rule 4)."""
        if model.exited:
            self.pending.appendleft(Retreat("dead", deque([model])))
            return
        self.move(model, Cause.DRAIN_CALLED_OFF)
        self.grant_waiting(model)

    def woken(
        self, model: ModelRecord, source: str | None, wake: ev.HookOutcome, cost: float
    ) -> float:
        """Fold a successful wake's cost in (a cold start apart); the new estimate."""
        level = model.woken_from or model.config.sleep_level
        self.observe_quietly(
            "wake_measured", model=model.name, level="cold" if wake.cold else str(level),
            seconds=wake.duration,
        )  # fmt: skip
        return self.costs.observe_switch(source, model.name, wake.duration, cost, wake.cold, level)

    def hold_unknown(self, record: ModelRecord) -> None:
        """Neither woken nor surely asleep (its wake and its sleep failed, and it has no alive
        hook to ask): it may hold memory, so it keeps its room but gets no request; a new
        record takes its place and its waiters, and it is put to sleep again later."""
        self.move(record, Cause.STILL_SERVING)
        if self.models.get(record.name) is not record:
            return  # a reload retired it already: it is put to sleep as a retirement
        replacement = self._record(record.config)
        replacement.queue, record.queue = record.queue, deque()
        replacement.demand = record.demand
        replacement.start_backoff = record.start_backoff  # the same config, as broken
        self.models[record.name] = replacement
        self._retire(record)

    # ----- servers that die -----

    def _on_unreachable(self, event: ev.Unreachable) -> None:
        model = self.models.get(event.model)
        if model is not None and model.state is ModelState.ACTIVE:
            model.check_requested = True

    def _on_server_exited(self, event: ev.ServerExited) -> None:
        record = self._record_of_server(event.model, event.port)
        if record is None:
            return
        record.exited = True
        record.server_running = False
        if record.state is ModelState.ASLEEP:
            record.slept_level = None  # its process is gone, and what it held with it
        if self.op is not None and record in self.op.acts_on():
            self.op.server_exited(self, record)  # one model is moved by one code path
            return
        if record.state is ModelState.ACTIVE:
            self.found_dead(record)
            self.pending.appendleft(Retreat("dead", deque([record])))

    def found_dead(self, model: ModelRecord) -> None:
        """Its server is gone: an active model takes no new request from now on; what is in
        flight drains, and it is put to sleep (by whoever called this)."""
        if model.state is not ModelState.ACTIVE:
            return
        self.move(model, Cause.FOUND_DEAD)
        self._observe(
            "model_dead", f"the server of {model.name} exited: draining it; its next request "
            "wakes it again", level="error", model=model.name,
        )  # fmt: skip

    def _record_of_server(self, name: str, port: int | None) -> ModelRecord | None:
        """The record whose server exited: the one of that name on that port, awake first."""
        current = self.models.get(name)
        records = [r for r in (current, *self.retiring) if r is not None and r.name == name]
        if port is not None:
            records = [r for r in records if r.config.port == port]
        awake = [r for r in records if r.state is not ModelState.ASLEEP]
        return (awake or records or [None])[0]

    # ----- recovering from a failure -----

    def _abort(self, event: ev.Event, error: Exception) -> None:
        """The one path out of a failure while handling `event` (see the theory above)."""
        op, self.op = self.op, None
        problem = ModelUnavailable(
            "a switch failed inside llmux (see its log); try again",
            retry_after=RETRY_AFTER_FAILED_SWITCH,
        )
        doubted: set[ModelRecord] = set()
        if op is not None:
            try:
                doubted |= op.in_doubt()
                op.aborted(self, problem)
            except Exception:  # what it knows is not trusted: the hooks below tell the rest
                pass
        if isinstance(event, ev.ServerExited):  # whatever it got to, that server is gone
            exited = self._record_of_server(event.model, event.port)
            if exited is not None and exited.state is not ModelState.ASLEEP:
                doubted.add(exited)
        left_running = dict(self._running)
        doubted |= {model for model, _ in left_running.values()}
        records = [*self.models.values(), *self.retiring]
        moving = (ModelState.WAKING, ModelState.DRAINING, ModelState.SLEEPING)
        doubted |= {r for r in records if r.state in moving}
        unknown = [r for r in dict.fromkeys([*records, *doubted]) if r in doubted]
        for record in unknown:
            if record.state is not ModelState.UNKNOWN:
                self.move(record, Cause.ABORTED)
        self._take_back_grants(set(unknown))
        names = ", ".join(r.name for r in unknown) or "none"
        self._observe(
            "core_failed", f"the switching core failed on {type(event).__name__} ({error!r}): "
            f"{type(op).__name__ if op else 'no operation'} aborted; models held unknown "
            f"until recovered: {names}", level="error", models=[r.name for r in unknown],
            error=error,
        )  # fmt: skip
        if unknown or left_running:
            self.op = Recovery(unknown, left_running)
        for model in self.models.values():
            self.grant_waiting(model)
        if self.waiting():  # whoever waited for the aborted operation is decided on again
            self._ask_again_soon()

    def _take_back_grants(self, unknown: set[ModelRecord]) -> None:
        """Grants made in this event to a model now held unknown are undone: the request
        queues again where it was (or is refused if its model is gone)."""
        kept: list[Command] = []
        for command in self._out:
            request = self.requests.get(command.rid) if isinstance(command, Grant) else None
            record = request.granted_to if request is not None else None
            if request is None or record not in unknown:
                kept.append(command)
                continue
            assert record is not None
            record.in_flight -= 1
            request.granted_to = None
            home = self.models.get(request.model)
            if home is None:
                del self.requests[request.rid]
                kept.append(Refuse(request.rid, ModelNotFound(f"{request.model!r} is gone")))
                continue
            arrivals = [r.arrival for r in home.queue]
            home.queue.insert(bisect.bisect_right(arrivals, request.arrival), request)
        self._out = kept

    def _due_recovery(self) -> list[ModelRecord]:
        """Unknown models no operation acts on, once the pause after a failed sleep is over."""
        if self.now < self.retry_at:
            return []
        return [r for r in (*self.models.values(), *self.retiring) if r.state is ModelState.UNKNOWN]

    # ----- admin, reload, shutdown -----

    def _on_started(self, event: ev.Started) -> None:
        self.op = Reconcile.at_start_up(self)

    def _on_sleep_asked(self, event: ev.SleepAsked) -> None:
        if event.model is None:
            names = [n for n, m in self.models.items() if m.state is ModelState.ACTIVE]
        else:
            names = [event.model] if event.model in self.models else []
        self.pending.append(Retreat("admin", deque(self.models[n] for n in names), event.reply))

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
            self._policy_problems_told.clear()
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
                    replacement.demand = record.demand
                    self._retire(record)
                    record = replacement
                else:
                    if _server_moved(record.config, cfg):
                        record.server_running = False  # the next wake starts the new server
                        # The old server is stopped (a `cmd` one) or no longer llmux's: what
                        # its level-1 sleep held is not counted, nor taken for the new one's.
                        # (A new sleep_level alone keeps the server, asleep as it slept.)
                        record.slept_level = record.host_gb = None
                    record.config = cfg
                    record.size = self.group.size_of(cfg)
                    record.start_backoff = StartBackoff()  # the new config may well start
            records[name] = record
        removed = [record for name, record in old.items() if name not in config.models]
        for record in removed:
            self.fail_queue(
                record, ModelNotFound(f"model {record.name!r} was removed from the config")
            )
            self._retire(record)
        self.models = records
        if self.switch_wanted is not None and self.switch_wanted not in records:
            self._drop_stale_switch()
        self.consult(TimerFired())
        return ReloadSummary(
            added=[n for n in config.models if n not in old],
            removed=[r.name for r in removed],
            changed=changed,
        )

    def server_held_by_a_retired_record(self, model: ModelRecord) -> bool:
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
        return set() if self.op is None else self.op.acts_on()

    def _forget_retired(self) -> None:
        """Retired records that are asleep and that no operation acts on are done with."""
        in_use = self._in_use()
        for record in list(self.retiring):
            if record.state is ModelState.ASLEEP and record not in in_use and not record.in_flight:
                self.retiring.remove(record)
                self.observe_quietly("record_forgotten", model=record.name)

    def _due_retirement(self) -> ModelRecord | None:
        """A retired record to drain and put to sleep now (an operation may hold the others)."""
        if self.now < self.retry_at:
            return None
        for record in self.retiring:
            if record.state is ModelState.ACTIVE:
                return record
        return None

    def _next_retry(self) -> float | None:
        """When a retired record that would not sleep, or an unknown one, is tried again."""
        again = (ModelState.ACTIVE, ModelState.UNKNOWN)
        if any(r.state in again for r in self.retiring) or any(
            m.state is ModelState.UNKNOWN for m in self.models.values()
        ):
            return self.retry_at
        return None

    def _on_shutdown(self, event: ev.ShutdownBegun) -> None:
        self.closing = True
        self.switch_wanted = None
        for model in self.models.values():
            self.fail_queue(model, ShuttingDown("llmux is shutting down"))

    # ----- observations -----

    def _observe(self, name: str, message: str, level: str = "info", **fields: object) -> None:
        self._out.append(Observe(name, message, dict(fields), level))

    def observe(self, name: str, message: str, level: str = "info", **fields: object) -> None:
        self._observe(name, message, level, **fields)

    def observe_quietly(self, name: str, **fields: object) -> None:
        """A figure for a metric, not worth a log line."""
        self._out.append(Observe(name, "", dict(fields), "debug"))


def _needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether an awake model must be put to sleep with its old hooks before the new config
    applies: its backend moved, or the hooks that know how to wake and sleep it changed."""
    return _backend_identity(old) != _backend_identity(new)


def _server_moved(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether a sleeping model's server is another one under the new config (the runtime
    stops a `cmd` server started otherwise; runtime/server_processes.py)."""
    return (old.port, old.kind, old.cmd) != (new.port, new.kind, new.cmd)


def _backend_identity(config: ModelConfig) -> tuple[object, ...]:
    """What decides where a model's server is and how it is woken and put to sleep."""
    return (config.port, config.wake, config.sleep, config.kind, config.cmd, config.sleep_level)


def _known_weights(model: ModelRecord) -> float | None:
    """What its level-1 sleep was measured to hold, or its configured `weights_gb`."""
    return model.host_gb if model.host_gb is not None else model.config.weights_gb


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
    ev.ServerExited: "_on_server_exited",
    ev.ShutdownBegun: "_on_shutdown",
    ev.GpuMemoryRead: "_on_gpu_read",
}
