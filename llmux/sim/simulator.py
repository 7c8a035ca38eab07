"""A discrete-event simulator of llmux: replays a trace through the live switching core.

It runs the very core the live driver runs (core/group.py: the same rules, the same policy
objects, the same snapshots), as a second executor of its commands on a virtual clock: a grant
forwards the request to a simulated GPU, a sleep hook takes no time, a wake hook takes the
switch cost C(from, to), a timer is an event on the clock. Only the clock and the backends are
virtual. Deterministic for a given trace and cost function.

With `tiers` (sim/tier_costs.py), the models are vLLM servers llmux starts: each step costs what
the file says for its model and depth (a sleep at its level, a wake from the level it slept at,
a first wake the cold start), the depth is the configured `sleep_level` (1, 2 or "auto", chosen
per sleep by the live core's rule), and `host_ram_gb` bounds what level-1 sleepers hold.

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

from llmux.config import (
    Config,
    GroupConfig,
    MachineConfig,
    ModelConfig,
    PolicyConfig,
    ServerConfig,
)
from llmux.core import events as ev
from llmux.core.commands import (
    CancelHook,
    ClearTimer,
    Command,
    Grant,
    Observe,
    Refuse,
    RunHook,
    SetTimer,
)
from llmux.core.costs import IDLE, SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.host_ram import HostRam
from llmux.core.states import HookName
from llmux.policies.interface import Policy
from llmux.sim.tier_costs import TierCosts

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
    peak_host_ram_gb: float = 0.0  # the most host RAM level-1 sleepers ever held at once
    sleeps: dict[int, int] = field(default_factory=dict)  # sleeps per depth (with `tiers`)
    cold_starts: int = 0

    def latencies(self, model: str | None = None) -> list[float]:
        return sorted(r.latency for r in self.requests if model is None or r.model == model)


@dataclass
class _Gpu:
    """The group's GPU: what its awake models were forwarded, served in turn or in one batch."""

    backlog: deque[Request] = field(default_factory=deque)  # forwarded, not yet running
    running: list[list] = field(default_factory=list)  # [request, tokens left] (batching)
    busy_until: float = 0.0  # sequential


SIMULATED_GROUP = "simulated"


@dataclass(frozen=True)
class Tiers:
    """Steps costed per model and depth (see the module's docstring); `sleep_level`: 1, 2 or
    "auto"; `ttl_secs`: an idle model sleeps after this long (0: never)."""

    costs: TierCosts
    sleep_level: int | str = 1
    host_ram_gb: float | None = None
    ttl_secs: float = 0.0


def simulated_config(
    models: Sequence[str],
    capacity: float | None,
    sizes: dict[str, float] | None,
    min_active: float,
    tiers: Tiers | None = None,
) -> Config:
    """The config of one simulated group: its models, their sizes, no limits of its own."""
    vllm = {}
    if tiers is not None:
        auto = tiers.sleep_level == "auto"
        vllm = {
            "kind": "vllm", "cmd": "simulated", "ttl_secs": tiers.ttl_secs,
            "sleep_level": 1 if auto else int(tiers.sleep_level), "auto_sleep_level": auto,
        }  # fmt: skip
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
            weights_gb=None if tiers is None else tiers.costs.of(name).weights_gb,
            **vllm,  # type: ignore[arg-type]
        )
        for name in models
    }
    group = GroupConfig(SIMULATED_GROUP, tuple(models), capacity)
    config = Config(
        path=Path("simulated.toml"), host="127.0.0.1", port=0,
        server=ServerConfig(max_queue_per_model=2**62), models=configs,
        policy=PolicyConfig(min_active_secs=min_active), groups={SIMULATED_GROUP: group},
        machine=MachineConfig(ram_gb=None if tiers is None else tiers.host_ram_gb),
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
        tiers: Tiers | None = None,
    ) -> None:
        self.requests = sorted((Request(**vars(r)) for r in requests), key=lambda r: r.arrival)
        self.costs = SwitchCostTracker()  # the live core's EMA, fed the simulated costs
        config = simulated_config(models, capacity, sizes, min_active_secs, tiers)
        self.tiers = tiers
        self.host_ram = HostRam(None if tiers is None else tiers.host_ram_gb)
        self.core = GroupCore(config, policy, self.costs, self.host_ram)
        self.started: set[str] = set()  # servers started (with `tiers`: a first wake is cold)
        self._steps: dict[int, tuple[int, str, bool]] = {}  # running job: token, model, cold
        self.peak_host_ram_gb = 0.0
        self.sleeps: dict[int, int] = {}
        self.cold_starts = 0
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
            peak_held=self.peak_held, peak_host_ram_gb=self.peak_host_ram_gb,
            sleeps=dict(sorted(self.sleeps.items())), cold_starts=self.cold_starts,
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
            if self.tiers is not None:
                return self._run_step(command, self.tiers.costs)
            return self._run_hook(command)
        elif isinstance(command, CancelHook):
            return self._cancel(command.job)
        elif isinstance(command, SetTimer):
            token = next(self._sequence)
            self._timer_tokens[command.name] = token
            if math.isfinite(command.at):  # the alive checks of built-in drivers: never
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

    def _run_step(self, command: RunHook, costs: TierCosts) -> ev.Event | None:
        """A step of a vLLM server llmux starts, costed by the file: it ends later."""
        model = costs.of(command.model)
        cold = False
        if command.hook is HookName.SLEEP:
            level = command.level or 1
            seconds = model.sleep[level]
            self.sleeps[level] = self.sleeps.get(level, 0) + 1
            self.peak_host_ram_gb = max(self.peak_host_ram_gb, self.host_ram.held_gb())
        elif command.hook is HookName.WAKE:
            self.peak_held = max(self.peak_held, self.core.held())
            cold = command.model not in self.started
            seconds = model.cold_start if cold else model.wake[command.level or 1]
            self.started.add(command.model)
            self.cold_starts += cold
        else:  # an alive check: a server llmux has not started does not answer
            outcome = ev.HookOutcome(ok=command.model in self.started)
            return ev.HookDone(self.now, command.job, outcome)
        token = next(self._sequence)
        self._steps[command.job] = (token, command.model, cold)
        self._at(self.now + seconds, "step_done", (command.job, token, seconds))
        return None

    def _on_step_done(self, job_token_seconds: tuple[int, int, float]) -> None:
        job, token, seconds = job_token_seconds
        running = self._steps.get(job)
        if running is None or running[0] != token:
            return  # cancelled meanwhile
        del self._steps[job]
        outcome = ev.HookOutcome(ok=True, duration=seconds, cold=running[2])
        self._feed(ev.HookDone(self.now, job, outcome))

    def _cancel(self, job: int) -> ev.Event | None:
        """A cold start nobody waits for is stopped: its server is not running."""
        running = self._steps.pop(job, None)
        if running is None:
            return None  # done already: its HookDone went out
        _, model, cold = running
        if cold:
            self.started.discard(model)
        return ev.HookDone(self.now, job, ev.HookOutcome(ok=False, cancelled=True))

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
