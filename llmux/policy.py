"""The switch-policy interface: plain code that sees a snapshot and decides, with no I/O.

The switcher calls a policy on four kinds of event: a request arrived, a request completed, a switch
completed, or a timer the policy asked for fired. The policy answers with one decision: stay, switch
to a model now, or call again at a given time. Because a policy only reads a `Snapshot` (built from
the switcher's state, or by a simulator from a virtual clock) it can be tested and replayed without
trio, sockets or hooks.

A custom policy is any class with `decide(event, snapshot) -> Decision`, named in the config as
`package.module:Class` or `/path/to/file.py:Class`; it is built with the `[policy.options]` table
as keyword arguments, so its `__init__` validates them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from llmux.core.states import ModelState

log = logging.getLogger("llmux.policy")


@dataclass(frozen=True)
class ModelView:
    name: str
    state: ModelState
    queue_depth: int
    oldest_arrival: float | None  # clock time the oldest waiting request arrived
    in_flight: int
    size: float = 1.0  # what it takes of its group's capacity while awake
    last_used: float | None = None  # clock time a request of it last started or ended


@dataclass(frozen=True)
class Snapshot:
    now: float
    models: Mapping[str, ModelView]  # in config order
    active: str | None
    active_since: float | None
    switching: bool  # a switch is in progress: its decision is already made
    switch_costs: Mapping[tuple[str, str], float]  # EMA seconds of no model serving, per (from, to)
    cold_start_costs: Mapping[str, float]  # EMA seconds to wake a model when none was active
    capacity: float = 1.0  # the group's room; models awake at once must fit (one at a time: 1)
    wake_costs: Mapping[str, float] = field(default_factory=dict)  # EMA seconds of wake hooks

    def active_for(self) -> float:
        return 0.0 if self.active_since is None else self.now - self.active_since

    def estimated_cost(self, target: str) -> float | None:
        """The measured cost of moving from the active model (or from idle) to `target`."""
        if self.active is None:
            return self.cold_start_costs.get(target)
        return self.switch_costs.get((self.active, target))


DEFAULT_WAKE_COST_SECS = 10.0


class _QueuedItem(Protocol):
    arrival: float


class ModelRuntimeLike(Protocol):
    """What the live switcher and the simulator both keep per model."""

    @property
    def name(self) -> str: ...

    state: ModelState
    queue: Sequence[_QueuedItem]
    in_flight: int
    active_since: float | None
    size: float
    last_used: float | None


def snapshot_of(
    now: float,
    models: Iterable[ModelRuntimeLike],
    switching: bool,
    switch_costs: Mapping[tuple[str, str], float],
    cold_start_costs: Mapping[str, float],
    capacity: float = 1.0,
    wake_costs: Mapping[str, float] | None = None,
) -> Snapshot:
    """The one way a snapshot is built, so that live and simulated policies see the same thing.

    `active` is the awake model a switch would put to sleep: the awake one when one model is
    awake at a time. With a capacity, it is the first eviction the oldest waiting model needs
    (None when that model fits beside the awake ones); with nobody waiting, the first awake."""
    views = {}
    for model in models:
        views[model.name] = ModelView(
            name=model.name,
            state=model.state,
            queue_depth=len(model.queue),
            oldest_arrival=model.queue[0].arrival if model.queue else None,
            in_flight=model.in_flight,
            size=model.size,
            last_used=model.last_used,
        )
    snapshot = Snapshot(
        now=now,
        models=views,
        active=None,
        active_since=None,
        switching=switching,
        switch_costs=dict(switch_costs),
        cold_start_costs=dict(cold_start_costs),
        capacity=capacity,
        wake_costs=dict(wake_costs or {}),
    )
    awake = [view.name for view in views.values() if view.state is ModelState.ACTIVE]
    waiting = oldest_waiting_model(snapshot)
    if waiting is None:
        displaced = awake[0] if awake else None
    else:
        victims = default_evictions(waiting, snapshot)
        displaced = victims[0] if victims else None
    if displaced is None:
        return snapshot
    active = next(model for model in models if model.name == displaced)
    return replace(snapshot, active=displaced, active_since=active.active_since)


def default_evictions(target: str, snapshot: Snapshot) -> list[str]:
    """The awake models to put to sleep so that `target` fits: idle ones before busy ones, then
    those whose loss costs least: expected demand x the cost of waking them again, demand being
    estimated from recency (a model last used t seconds ago, about once per t seconds). With
    equal wake costs that is least recently used; a model that is slow to wake is kept longer.
    Empty when the target fits as things are."""
    views = snapshot.models
    excess = held(snapshot, {target}) + views[target].size - snapshot.capacity
    candidates = [v for v in views.values() if v.state is ModelState.ACTIVE and v.name != target]

    def loss(view: ModelView) -> tuple[bool, float, float]:
        busy = view.in_flight > 0 or view.queue_depth > 0
        idle = snapshot.now - view.last_used if view.last_used is not None else math.inf
        demand = 1.0 / max(idle, 1e-3)
        return (busy, demand * wake_cost(snapshot, view.name), view.last_used or -math.inf)

    victims = []
    for view in sorted(candidates, key=loss):
        if excess <= 1e-9:
            break
        victims.append(view.name)
        excess -= view.size
    return victims


def choose_evictions(policy: Policy, target: str, snapshot: Snapshot) -> list[str]:
    """The models to put to sleep so that `target` fits: the policy's `evict(target, snapshot)`
    if it has one and its answer makes room with awake models only, else the default."""
    default = default_evictions(target, snapshot)
    evict = getattr(policy, "evict", None)
    if evict is None or not default:
        return default
    try:
        chosen = list(evict(target, snapshot))
    except Exception:
        log.exception("policy %r failed to choose evictions; using the default", policy)
        return default
    views = snapshot.models
    awake = all(
        name in views and name != target and views[name].state is ModelState.ACTIVE
        for name in chosen
    )
    kept = held(snapshot, {target, *chosen})
    if awake and kept + views[target].size <= snapshot.capacity + 1e-9:
        return chosen
    log.error(
        "policy %r chose evictions %r that do not make room for %s; using %r",
        policy, chosen, target, default,
    )  # fmt: skip
    return default


def held(snapshot: Snapshot, excluding: set[str]) -> float:
    """Capacity held by the models that are not asleep, leaving out `excluding`."""
    return sum(
        view.size
        for view in snapshot.models.values()
        if view.state is not ModelState.ASLEEP and view.name not in excluding
    )


def wake_cost(snapshot: Snapshot, name: str) -> float:
    """What waking `name` again is expected to cost: its measured wake hook, else its cold start,
    else the mean of measured switches to it, else a default."""
    if name in snapshot.wake_costs:
        return snapshot.wake_costs[name]
    if name in snapshot.cold_start_costs:
        return snapshot.cold_start_costs[name]
    into = [cost for (_, target), cost in snapshot.switch_costs.items() if target == name]
    return sum(into) / len(into) if into else DEFAULT_WAKE_COST_SECS


# Events the switcher reports.
@dataclass(frozen=True)
class RequestArrived:
    model: str


@dataclass(frozen=True)
class RequestCompleted:
    model: str


@dataclass(frozen=True)
class SwitchCompleted:
    target: str
    ok: bool


@dataclass(frozen=True)
class TimerFired:
    pass


Event = RequestArrived | RequestCompleted | SwitchCompleted | TimerFired


# Decisions a policy returns.
@dataclass(frozen=True)
class Stay:
    pass


@dataclass(frozen=True)
class SwitchTo:
    model: str


@dataclass(frozen=True)
class CallAt:
    when: float


Decision = Stay | SwitchTo | CallAt


class Policy(Protocol):
    def decide(self, event: Event, snapshot: Snapshot) -> Decision: ...


class FifoPolicy:
    """The original llmux behaviour: a request for a non-active model starts a switch at once.

    Each switch releases all of the target's waiting requests, and targets are chosen in the order
    their oldest waiting request arrived. Combined with draining, this is gated service with
    oldest-first routing, not global first-come-first-served.
    """

    def decide(self, event: Event, snapshot: Snapshot) -> Decision:
        if snapshot.switching:
            return Stay()
        target = oldest_waiting_model(snapshot)
        return SwitchTo(target) if target is not None else Stay()


class CostAwarePolicy:
    """Serve the active model while it has work, for a quantum proportional to the switch cost.

    FIFO switches as soon as another model waits, so with interleaved traffic it pays a switch
    per batch of waiting requests. This policy keeps the active model serving (its new requests
    go straight in) while it has work, for at most `quantum_factor` times the estimated cost of
    the next switch (never less than `min_quantum_secs`), then drains it and switches; an idle
    active model is left at once. The next model is the one whose waiting work is largest and
    oldest relative to what switching to it costs.

    Staleness is bounded twice: once the oldest waiting request has waited `wait_factor` times
    the switch cost (soft, scales with the cost) or `max_wait_secs` (hard), the policy switches
    to that request's model, but only after the active model has served `guard_factor` switch
    costs' worth of time. The guard is what stops a staleness bound from thrashing under
    overload, when every request is stale: at most 1 / (1 + guard_factor) of the time goes to
    switching.
    """

    def __init__(
        self,
        quantum_factor: float = 4.0,
        wait_factor: float | None = 3.0,
        max_wait_secs: float | None = 120.0,
        guard_factor: float = 2.0,
        min_quantum_secs: float = 1.0,
        default_cost_secs: float = 10.0,
    ) -> None:
        if quantum_factor <= 0 or default_cost_secs <= 0:
            raise ValueError("quantum_factor and default_cost_secs must be > 0")
        if min_quantum_secs < 0 or guard_factor < 0:
            raise ValueError("min_quantum_secs and guard_factor must be >= 0")
        if max_wait_secs is not None and max_wait_secs <= 0:
            raise ValueError("max_wait_secs must be > 0")
        if wait_factor is not None and wait_factor <= 0:
            raise ValueError("wait_factor must be > 0")
        self.quantum_factor = quantum_factor
        self.wait_factor = wait_factor
        self.max_wait = max_wait_secs
        self.guard_factor = guard_factor
        self.min_quantum = min_quantum_secs
        self.default_cost = default_cost_secs

    def decide(self, event: Event, snapshot: Snapshot) -> Decision:
        if snapshot.switching:
            return Stay()
        waiting = [
            view
            for view in snapshot.models.values()
            if view.queue_depth > 0 and view.state is not ModelState.ACTIVE
        ]
        if not waiting:
            return Stay()
        target = self._next(waiting, snapshot)
        if snapshot.active is None:
            return SwitchTo(target)
        active = snapshot.models[snapshot.active]
        if active.in_flight == 0 and active.queue_depth == 0:
            return SwitchTo(target)
        cost = self._cost(snapshot, target)
        assert snapshot.active_since is not None
        since, now = snapshot.active_since, snapshot.now
        stalest = min(waiting, key=lambda view: view.oldest_arrival or now)
        stale_at = self._stale_at(stalest, cost, now)
        guarded_until = since + self.guard_factor * cost
        # Compare against the very times a timer is set for, so that a timer that fires is
        # never answered with the same timer again (no float rounding gap to spin in).
        if now >= stale_at and now >= guarded_until:
            return SwitchTo(stalest.name)
        quantum_ends = since + max(self.min_quantum, self.quantum_factor * cost)
        if now >= quantum_ends:
            return SwitchTo(target)
        return CallAt(min(quantum_ends, max(stale_at, guarded_until)))

    def _stale_at(self, view: ModelView, cost: float, now: float) -> float:
        """When the oldest request of `view` becomes stale (infinity: no bound)."""
        bounds = [self.max_wait] if self.max_wait is not None else []
        if self.wait_factor is not None:
            bounds.append(self.wait_factor * cost)
        if not bounds:
            return math.inf
        return (view.oldest_arrival or now) + min(bounds)

    def _cost(self, snapshot: Snapshot, target: str) -> float:
        estimate = snapshot.estimated_cost(target)
        return self.default_cost if estimate is None else estimate

    def _next(self, waiting: list[ModelView], snapshot: Snapshot) -> str:
        def score(view: ModelView) -> float:
            age = snapshot.now - (view.oldest_arrival or snapshot.now)
            return view.queue_depth * (age + 1.0) / (self._cost(snapshot, view.name) + 1.0)

        return max(waiting, key=score).name


def oldest_waiting_model(snapshot: Snapshot) -> str | None:
    """The non-active model whose oldest queued request has waited longest, if any."""
    waiting = [
        view
        for view in snapshot.models.values()
        if view.queue_depth > 0 and view.state is not ModelState.ACTIVE
    ]
    if not waiting:
        return None
    return min(waiting, key=lambda view: view.oldest_arrival or 0.0).name


BUILTIN_POLICIES: dict[str, type] = {"fifo": FifoPolicy, "cost_aware": CostAwarePolicy}


class PolicyLoadError(Exception):
    """The configured policy could not be found or built."""


def load_policy(name: str, options: Mapping[str, Any], base_dir: Path) -> Policy:
    """Build the configured policy: a built-in name, `pkg.mod:Class` or `/file.py:Class`."""
    cls = _find_policy_class(name, base_dir)
    try:
        policy = cls(**dict(options))
    except TypeError as exc:
        raise PolicyLoadError(f"policy {name!r} rejected [policy.options]: {exc}") from None
    except ValueError as exc:
        raise PolicyLoadError(f"policy {name!r}: invalid option: {exc}") from None
    except Exception as exc:  # the operator's code: whatever it raises, refuse it, stay up
        raise PolicyLoadError(f"policy {name!r} failed to start: {exc!r}") from None
    if not callable(getattr(policy, "decide", None)):
        raise PolicyLoadError(f"policy {name!r} has no decide(event, snapshot) method")
    return policy


def _find_policy_class(name: str, base_dir: Path) -> type:
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]
    location, sep, class_name = name.rpartition(":")
    if not sep or not location or not class_name:
        known = ", ".join(sorted(BUILTIN_POLICIES))
        raise PolicyLoadError(
            f"unknown policy {name!r}: use a built-in ({known}), 'package.module:Class' "
            "or '/path/to/file.py:Class'"
        )
    if location.endswith(".py"):
        module = _import_file(base_dir / location)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise PolicyLoadError(f"cannot import policy module {location!r}: {exc}") from None
        except Exception as exc:  # the module's own code failed while importing
            problem = f"policy module {location!r} failed to import: {exc!r}"
            raise PolicyLoadError(problem) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise PolicyLoadError(f"policy class {class_name!r} not found in {location!r}")
    return cls


def _import_file(path: Path) -> Any:
    """Import a policy from a file: the one-file binary has no site-packages to install into."""
    path = path.resolve()
    if not path.is_file():
        raise PolicyLoadError(f"policy file {path} not found")
    module_name = f"llmux_policy_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PolicyLoadError(f"cannot load policy file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PolicyLoadError(f"policy file {path} failed to import: {exc!r}") from None
    return module
