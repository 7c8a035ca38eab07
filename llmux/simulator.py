"""A discrete-event simulator of llmux's switcher: replays a trace through a switch policy.

It drives the very same policy objects as the live switcher (llmux.policy), with the same
events and the same snapshot, and copies the switcher's mechanics: a request for the ACTIVE
model (with room) is forwarded at once, otherwise it queues; one switch at a time waits out
min_active_secs, drains the active model's in-flight requests, costs C(from, to) during which
no model serves, then releases all of the target's queue. Only the clock and the backends are
virtual. Deterministic for a given trace and cost function.

Capacity: with `capacity` and per-model `sizes`, several models are awake at once while their
sizes fit, as in a live group with a capacity: a model that fits is woken without asking the
policy, and one that does not first drains and puts to sleep the models `default_evictions` (or
the policy's `evict`) chooses. Evicting several models costs what evicting the first does (sleep
hooks are short next to a wake). The awake models share one GPU: their requests take turns
(sequential) or share one batch (batching), so co-residency saves switches, not compute.

Service models:
- "sequential": the backend serves one request at a time, in the order llmux forwarded them.
- "parallel": every forwarded request runs at once for its service time (llmux's fake backend).
- "batching": continuous batching of up to `batch` sequences: a request first costs its prefill
  (prompt tokens / prefill rate, during which the batch pauses), then one decode step per output
  token, each step costing `step_base + step_per_sequence * running sequences`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmux.costs import SwitchCostTracker
from llmux.policy import (
    CallAt,
    Event,
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

PREFILL_TOKENS_PER_SEC = 5000.0
STEP_BASE_SECS = 0.020
STEP_PER_SEQUENCE_SECS = 0.0005
BATCH = 64
MAX_STEPS_PER_EVENT = 16
MIN_TIMER_SECS = 0.001


class StrandedRequests(Exception):
    """A policy answered Stay while requests waited and asked for no timer: they were never
    served. The live switcher would hold them until their request timeout."""

    def __init__(self, policy: str, stranded: list[Request], total: int) -> None:
        first = stranded[0]
        super().__init__(
            f"policy {policy!r} left {len(stranded)} of {total} requests unserved (the first: "
            f"{first.model!r}, arrived at {first.arrival:.1f} s): it answered Stay while they "
            "waited and asked for no timer"
        )


@dataclass
class Request:
    arrival: float
    model: str
    service: float = 0.0  # seconds, sequential service model
    prompt_tokens: int = 0  # batching service model
    output_tokens: int = 1
    group: str = ""  # the trace's user or tenant, for thinning by group
    started: float | None = None  # forwarded to the backend
    finished: float | None = None

    @property
    def latency(self) -> float:
        assert self.finished is not None
        return self.finished - self.arrival


@dataclass(frozen=True)
class ServiceModel:
    kind: str = "sequential"  # or "batching"
    batch: int = BATCH
    prefill_tokens_per_sec: float = PREFILL_TOKENS_PER_SEC
    step_base: float = STEP_BASE_SECS
    step_per_sequence: float = STEP_PER_SEQUENCE_SECS

    def step(self, running: int) -> float:
        return self.step_base + self.step_per_sequence * running

    def solo_time(self, request: Request) -> float:
        """Service time of a request alone (used for load accounting)."""
        if self.kind == "sequential":
            return request.service
        prefill = request.prompt_tokens / self.prefill_tokens_per_sec
        return prefill + request.output_tokens * self.step(1)

    def full_batch_time(self, request: Request) -> float:
        """A request's share of a full batch: what it costs the GPU under heavy load."""
        if self.kind == "sequential":
            return request.service
        prefill = request.prompt_tokens / self.prefill_tokens_per_sec
        return prefill + request.output_tokens * self.step(self.batch) / self.batch


@dataclass
class Result:
    policy: str
    requests: list[Request]
    switches: list[tuple[str | None, str, float]]  # (from, to, time activated)
    busy_time: float  # time the active backend was serving something
    span: float
    gpus: int = 1  # groups simulated side by side (utilization is per GPU)
    peak_held: float = 0.0  # the most capacity awake models ever held at once

    def latencies(self, model: str | None = None) -> list[float]:
        return sorted(r.latency for r in self.requests if model is None or r.model == model)


@dataclass
class _Model:
    name: str
    state: ModelState = ModelState.ASLEEP
    queue: deque[Request] = field(default_factory=deque)
    in_flight: int = 0
    active_since: float | None = None
    size: float = 1.0
    last_used: float | None = None


@dataclass
class _Gpu:
    """The group's GPU: what its awake models were forwarded, served in turn or in one batch."""

    backlog: deque[Request] = field(default_factory=deque)  # forwarded, not yet running
    running: list[list] = field(default_factory=list)  # [request, tokens left] (batching)
    busy_until: float = 0.0  # sequential


class Simulator:
    def __init__(
        self,
        requests: Sequence[Request],
        models: Sequence[str],
        policy: Policy,
        switch_cost: Callable[[str | None, str], float],
        service: ServiceModel = ServiceModel(),
        min_active_secs: float = 0.0,
        policy_name: str = "",
        capacity: float | None = None,
        sizes: dict[str, float] | None = None,
    ) -> None:
        self.requests = sorted((Request(**vars(r)) for r in requests), key=lambda r: r.arrival)
        self.capacity = capacity
        self.room = 1.0 if capacity is None else capacity
        self.models = {
            name: _Model(name, size=1.0 if capacity is None else (sizes or {})[name])
            for name in models
        }
        self.gpu = _Gpu()
        self.policy = policy
        self.switch_cost = switch_cost
        self.service = service
        self.min_active = min_active_secs
        self.policy_name = policy_name
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._sequence = itertools.count()
        self._switching = False
        self._timer_at = math.inf
        self._timer_token = 0
        self.costs = SwitchCostTracker()  # the live switcher's EMA, fed the simulated costs
        self.switches: list[tuple[str | None, str, float]] = []
        self.busy_time = 0.0
        self._batch_step_pending = False
        self._switch_target: _Model | None = None
        self._victims: list[_Model] = []
        self.peak_held = 0.0

    # ----- the event loop -----

    def run(self) -> Result:
        for request in self.requests:
            self._at(request.arrival, "arrival", request)
        while self._events:
            time, _, kind, payload = heapq.heappop(self._events)
            self.now = time
            getattr(self, "_on_" + kind)(payload)
        stranded = [r for r in self.requests if r.finished is None]
        if stranded:
            raise StrandedRequests(self.policy_name, stranded, len(self.requests))
        span = max((r.finished or 0.0) for r in self.requests) - (
            self.requests[0].arrival if self.requests else 0.0
        )
        return Result(
            self.policy_name, self.requests, self.switches, self.busy_time, span,
            peak_held=self.peak_held,
        )  # fmt: skip

    def _at(self, time: float, kind: str, payload: object = None) -> None:
        heapq.heappush(self._events, (time, next(self._sequence), kind, payload))

    # ----- requests (as Switcher._acquire / _release) -----

    def _on_arrival(self, request: Request) -> None:
        model = self.models[request.model]
        if model.state is ModelState.ACTIVE and not model.queue and self._has_room(model):
            self._forward(model, request)
            return
        model.queue.append(request)
        self._consult(RequestArrived(model.name))

    def _has_room(self, model: _Model) -> bool:
        return True  # llmux forwards everything; the backend queues beyond its batch

    def _forward(self, model: _Model, request: Request) -> None:
        model.in_flight += 1
        model.last_used = self.now
        request.started = self.now
        self.gpu.backlog.append(request)
        self._serve()

    def _complete(self, request: Request) -> None:
        model = self.models[request.model]
        request.finished = self.now
        model.last_used = self.now
        model.in_flight -= 1
        self._consult(RequestCompleted(model.name))
        if self._draining_done():
            self._continue_switch()

    # ----- the GPU -----

    def _serve(self) -> None:
        gpu = self.gpu
        if self.service.kind == "parallel":
            while gpu.backlog:
                request = gpu.backlog.popleft()
                self.busy_time += request.service
                self._at(self.now + request.service, "parallel_done", request)
        elif self.service.kind == "sequential":
            if gpu.busy_until <= self.now and gpu.backlog and not gpu.running:
                request = gpu.backlog.popleft()
                gpu.running.append([request, 0])
                gpu.busy_until = self.now + request.service
                self.busy_time += request.service
                self._at(gpu.busy_until, "sequential_done")
        elif not self._batch_step_pending:
            self._batch_step()

    def _on_parallel_done(self, request: Request) -> None:
        self._complete(request)

    def _on_sequential_done(self, _: object) -> None:
        request, _ = self.gpu.running.pop()
        self._complete(request)
        self._serve()

    def _batch_step(self) -> None:
        """Admit waiting sequences (their prefill pauses the batch), then run decode steps up to
        the next completion; one event per completion, not per token."""
        gpu = self.gpu
        prefill = 0.0
        while gpu.backlog and len(gpu.running) < self.service.batch:
            request = gpu.backlog.popleft()
            prefill += request.prompt_tokens / self.service.prefill_tokens_per_sec
            gpu.running.append([request, max(1, request.output_tokens)])
        if not gpu.running:
            return
        # Run to the next completion, but at most MAX_STEPS_PER_EVENT steps, so that a request
        # forwarded meanwhile joins the batch soon (its prefill at the next boundary).
        steps = min(MAX_STEPS_PER_EVENT, *(left for _, left in gpu.running))
        duration = prefill + steps * self.service.step(len(gpu.running))
        self._batch_step_pending = True
        self._at(self.now + duration, "batch_progress", steps)
        self.busy_time += duration

    def _on_batch_progress(self, steps: int) -> None:
        gpu = self.gpu
        self._batch_step_pending = False
        finished = []
        for entry in gpu.running:
            entry[1] -= steps
            if entry[1] <= 0:
                finished.append(entry)
        gpu.running = [entry for entry in gpu.running if entry[1] > 0]
        for request, _ in finished:
            self._complete(request)
        self._serve()

    # ----- policy (as Switcher._consult / _apply) -----

    def snapshot(self) -> Snapshot:
        return snapshot_of(
            self.now,
            self.models.values(),
            self._switching,
            self.costs.switches,
            self.costs.cold_starts,
            self.room,
            self.costs.wakes,
        )

    def _consult(self, event: Event) -> None:
        if self.capacity is not None and not self._switching:
            # As the live switcher: waking into free room needs no policy decision.
            waiting = [m for m in self.models.values() if m.queue and m.state is ModelState.ASLEEP]
            for model in sorted(waiting, key=lambda m: m.queue[0].arrival):
                if self._fits(model):
                    self._start_switch(model)
                    return
        decision = self.policy.decide(event, self.snapshot())
        if isinstance(decision, SwitchTo):
            target = self.models[decision.model]
            if not self._switching and target.state is not ModelState.ACTIVE:
                self._start_switch(target)
        elif isinstance(decision, CallAt):
            self._timer_token += 1
            # As the live switcher: a time not in the future fires a little later, never now.
            self._at(max(decision.when, self.now + MIN_TIMER_SECS), "timer", self._timer_token)

    def _on_timer(self, token: int) -> None:
        if token == self._timer_token:  # a later CallAt replaces an earlier one
            self._consult(TimerFired())

    # ----- switching (as Switcher._carry_out_switch) -----

    def _start_switch(self, target: _Model) -> None:
        self._switching = True
        self._switch_target = target
        started = [v.active_since for v in self._victims_for(target) if v.active_since is not None]
        if started:
            serve_until = max(started) + self.min_active
            if serve_until > self.now:
                self._at(serve_until, "min_active_over")
                return
        self._begin_drain()

    def _on_min_active_over(self, _: object) -> None:
        self._begin_drain()

    def _begin_drain(self) -> None:
        target = self._switch_target
        assert target is not None
        if not target.queue:
            self._finish_switch(ok=False)
            return
        self._victims = self._victims_for(target)
        for victim in self._victims:
            victim.state = ModelState.DRAINING
        if not self._victims or self._draining_done():
            self._sleep_and_wake()

    def _draining_done(self) -> bool:
        """The victims of the switch in progress have nothing left in flight."""
        return (
            self._switching
            and bool(self._victims)
            and all(v.state is ModelState.DRAINING and v.in_flight == 0 for v in self._victims)
        )

    def _continue_switch(self) -> None:
        self._sleep_and_wake()

    def _sleep_and_wake(self) -> None:
        target = self._switch_target
        assert target is not None
        source = self._victims[0] if self._victims else None
        for victim in self._victims:
            # Its sleep is folded into the switch cost: its memory is free before the wake.
            victim.state = ModelState.ASLEEP
            victim.active_since = None
        target.state = ModelState.WAKING
        held = sum(m.size for m in self.models.values() if m.state is not ModelState.ASLEEP)
        self.peak_held = max(self.peak_held, held)
        cost = self.switch_cost(source.name if source else None, target.name)
        self.costs.observe(source.name if source else None, target.name, cost)
        self.costs.observe_wake(target.name, cost)
        self._at(self.now + cost, "woken")

    def _on_woken(self, _: object) -> None:
        target = self._switch_target
        assert target is not None
        source = self._victims[0] if self._victims else None
        target.state = ModelState.ACTIVE
        target.active_since = self.now
        self.switches.append((source.name if source else None, target.name, self.now))
        while target.queue:
            self._forward(target, target.queue.popleft())
        self._finish_switch(ok=True)

    def _finish_switch(self, ok: bool) -> None:
        target = self._switch_target
        assert target is not None
        self._switching = False
        self._switch_target = None
        self._victims = []
        self._consult(SwitchCompleted(target.name, ok))

    # ----- capacity (as Switcher._fits / _victims_for) -----

    def _fits(self, target: _Model) -> bool:
        held = sum(
            m.size
            for m in self.models.values()
            if m.state is not ModelState.ASLEEP and m is not target
        )
        return held + target.size <= self.room + 1e-9

    def _victims_for(self, target: _Model) -> list[_Model]:
        if self._fits(target):
            return []
        names = choose_evictions(self.policy, target.name, self.snapshot())
        return [self.models[name] for name in names]
