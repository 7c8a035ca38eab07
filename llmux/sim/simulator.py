"""A discrete-event simulator of llmux: replays a trace through the live switching core.

It runs the very core the live driver runs (core/group.py: the same rules, the same policy
objects, the same snapshots), as a second executor of its commands on a virtual clock: a grant
forwards the request to a simulated GPU, a sleep hook takes no time, a wake hook takes the
switch cost C(from, to), a timer is an event on the clock. Only the clock and the backends are
virtual. Deterministic for a given trace and cost function.

Capacity: with `capacity` and per-model `sizes`, several models are awake at once while their
sizes fit, as in a live group with a capacity (the core wakes a model that fits without asking
the policy, and evicts by `default_evictions` or the policy's `evict` otherwise). Evicting
several models costs what waking the target does (sleep hooks are short next to a wake). The
awake models share one GPU: their requests take turns (sequential) or share one batch
(batching), so co-residency saves switches, not compute.

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
from pathlib import Path

from llmux.config import Config, GroupConfig, ModelConfig, PolicyConfig, ServerConfig
from llmux.core import events as ev
from llmux.core.commands import ClearTimer, Command, Grant, Observe, Refuse, RunHook, SetTimer
from llmux.core.costs import IDLE, SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.states import HookName
from llmux.policies.interface import Policy

PREFILL_TOKENS_PER_SEC = 5000.0
STEP_BASE_SECS = 0.020
STEP_PER_SEQUENCE_SECS = 0.0005
BATCH = 64
MAX_STEPS_PER_EVENT = 16


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
class _Gpu:
    """The group's GPU: what its awake models were forwarded, served in turn or in one batch."""

    backlog: deque[Request] = field(default_factory=deque)  # forwarded, not yet running
    running: list[list] = field(default_factory=list)  # [request, tokens left] (batching)
    busy_until: float = 0.0  # sequential


SIMULATED_GROUP = "simulated"


def simulated_config(
    models: Sequence[str], capacity: float | None, sizes: dict[str, float] | None, min_active: float
) -> Config:
    """The config of one simulated group: its models, their sizes, no limits of its own."""
    configs = {
        name: ModelConfig(
            name=name,
            port=1,
            wake="",
            sleep="",
            alive=None,
            wake_timeout_secs=math.inf,
            sleep_timeout_secs=math.inf,
            alive_timeout_secs=math.inf,
            alive_interval_secs=math.inf,
            size=None if capacity is None else (sizes or {})[name],
            group=SIMULATED_GROUP,
        )
        for name in models
    }
    group = GroupConfig(SIMULATED_GROUP, tuple(models), capacity)
    config = Config(
        path=Path("simulated.toml"), host="127.0.0.1", port=0,
        server=ServerConfig(max_queue_per_model=2**62), models=configs,
        policy=PolicyConfig(min_active_secs=min_active), groups={SIMULATED_GROUP: group},
    )  # fmt: skip
    return config.group_config(SIMULATED_GROUP)


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
        self.costs = SwitchCostTracker()  # the live core's EMA, fed the simulated costs
        config = simulated_config(models, capacity, sizes, min_active_secs)
        self.core = GroupCore(config, policy, self.costs)
        self.gpu = _Gpu()
        self.switch_cost = switch_cost
        self.service = service
        self.policy_name = policy_name
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._sequence = itertools.count()
        self._timer_tokens: dict[str, int] = {}
        self.switches: list[tuple[str | None, str, float]] = []
        self.busy_time = 0.0
        self._batch_step_pending = False
        self.peak_held = 0.0
        self._rid_of = {id(request): rid for rid, request in enumerate(self.requests)}

    # ----- the event loop -----

    def run(self) -> Result:
        for rid, request in enumerate(self.requests):
            self._at(request.arrival, "arrival", rid)
        self._feed(ev.Started(self.now))
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

    # ----- the core, and its commands on the virtual clock -----

    def _feed(self, event: ev.Event) -> None:
        """Apply an event and carry out its commands; a sleep hook (instant) answers at once,
        after the rest of its batch, as the live driver's would, only sooner."""
        pending: deque[ev.Event] = deque([event])
        while pending:
            for command in self.core.handle(pending.popleft()):
                done = self._execute(command)
                if done is not None:
                    pending.append(done)

    def _execute(self, command: Command) -> ev.Event | None:
        if isinstance(command, Grant):
            self._forward(self.requests[command.rid])
        elif isinstance(command, RunHook):
            return self._run_hook(command)
        elif isinstance(command, SetTimer):
            token = next(self._sequence)
            self._timer_tokens[command.name] = token
            self._at(command.at, "timer", (command.name, token))
        elif isinstance(command, ClearTimer):
            self._timer_tokens.pop(command.name, None)
        elif isinstance(command, Observe):
            self._observe(command)
        elif isinstance(command, Refuse):
            raise RuntimeError(f"the simulated core refused request {command.rid}: {command.error}")
        return None

    def _run_hook(self, command: RunHook) -> ev.Event | None:
        if command.hook is not HookName.WAKE:
            return ev.HookDone(self.now, command.job, ev.HookOutcome(ok=True))
        self.peak_held = max(self.peak_held, self.core.held())
        source = command.env.get("LLMUX_FROM") or None
        cost = self.switch_cost(source, command.model)
        self._at(self.now + cost, "woken", (command.job, cost))
        return None

    def _on_woken(self, job_and_cost: tuple[int, float]) -> None:
        job, cost = job_and_cost
        self._feed(ev.HookDone(self.now, job, ev.HookOutcome(ok=True, duration=cost)))

    def _on_timer(self, name_and_token: tuple[str, int]) -> None:
        name, token = name_and_token
        if self._timer_tokens.get(name) == token:  # a later timer of that name replaces it
            del self._timer_tokens[name]
            self._feed(ev.TimerDue(self.now, name))

    def _observe(self, observed: Observe) -> None:
        fields = observed.fields
        if observed.name == "model_activated" and "switch_seconds" in fields:
            source = None if fields["from"] == IDLE else str(fields["from"])
            self.switches.append((source, str(fields["to"]), self.now))

    # ----- requests -----

    def _on_arrival(self, rid: int) -> None:
        self._feed(ev.Arrived(self.now, rid, self.requests[rid].model))

    def _forward(self, request: Request) -> None:
        request.started = self.now
        self.gpu.backlog.append(request)
        self._serve()

    def _complete(self, request: Request) -> None:
        request.finished = self.now
        self._feed(ev.Finished(self.now, self._rid_of[id(request)]))

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
