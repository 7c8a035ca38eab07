"""What a policy sees: one frozen snapshot of a group, built the same way live and simulated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llmux.core.states import ModelState


@dataclass(frozen=True)
class ModelView:
    name: str
    state: ModelState
    queue_depth: int
    oldest_arrival: float | None  # clock time the oldest waiting request arrived
    in_flight: int
    size: float = 1.0  # what it takes of its group's capacity while awake
    last_used: float | None = None  # clock time a request of it last started or ended
    starts_cold: bool = False  # its next wake starts its server (a `cmd` model not running)
    slept_level: int | None = None  # asleep: the depth it was put to sleep at (None: unknown)
    sleep_level: int | None = 1  # the depth it would be put to sleep at (None: chosen then)


@dataclass(frozen=True)
class Snapshot:
    now: float
    models: Mapping[str, ModelView]  # in config order
    active: str | None
    active_since: float | None
    switching: bool  # a switch is in progress: its decision is already made
    switch_costs: Mapping[tuple[str, str], float]  # EMA seconds of no model serving, per (from, to)
    cold_start_costs: Mapping[str, float]  # EMA seconds of switches whose wake started the server
    capacity: float = 1.0  # the group's room; models awake at once must fit (one at a time: 1)
    wake_costs: Mapping[str, float] = field(default_factory=dict)  # EMA seconds of warm wakes
    idle_wake_costs: Mapping[str, float] = field(default_factory=dict)  # nothing put to sleep
    # Each step alone, EMA seconds per (model, sleep level); a wake's level "cold": it started
    # the server. What a switch costs: the victims' sleeps plus the target's wake.
    sleep_costs: Mapping[tuple[str, int], float] = field(default_factory=dict)
    wake_step_costs: Mapping[tuple[str, int | str], float] = field(default_factory=dict)
    demand: Mapping[str, float] = field(default_factory=dict)  # recent requests/s per model

    def active_for(self) -> float:
        return 0.0 if self.active_since is None else self.now - self.active_since

    def estimated_cost(self, target: str) -> float | None:
        """The measured cost of moving from the active model (or from idle) to `target`: its
        cold start if its server must be started; else the active model's sleep at the depth
        it would sleep at plus the target's wake from the depth it slept at, each measured
        alone; else what that whole switch cost before."""
        view = self.models.get(target)
        if view is not None and view.starts_cold:
            return self.cold_start_costs.get(target)
        steps = self._by_steps(target)
        if steps is not None:
            return steps
        if self.active is None:
            return self.idle_wake_costs.get(target)
        return self.switch_costs.get((self.active, target))

    def sleep_cost(self, model: str, level: int | None = None) -> float | None:
        """What putting `model` to sleep at `level` costs, measured (None: not yet); without a
        level, at the depth it would sleep at (its cheapest measured one if that is chosen
        then)."""
        view = self.models.get(model)
        level = level if level is not None else (view.sleep_level if view else None)
        if level is not None:
            return self.sleep_costs.get((model, level))
        measured = [s for (name, _), s in self.sleep_costs.items() if name == model]
        return min(measured) if measured else None

    def _by_steps(self, target: str) -> float | None:
        view = self.models.get(target)
        if view is None:
            return None
        wake = self.wake_step_costs.get((target, view.slept_level or view.sleep_level or 1))
        if wake is None or self.active is None:
            return wake
        sleep = self.sleep_cost(self.active)
        return None if sleep is None else sleep + wake

    def cost_or(self, target: str, default: float) -> float:
        """`estimated_cost`, or `default` until a switch to `target` has been measured."""
        estimate = self.estimated_cost(target)
        return default if estimate is None else estimate

    def waiting(self) -> list[ModelView]:
        """The models that are not awake and have requests queued: the candidates to switch to."""
        return [
            view
            for view in self.models.values()
            if view.queue_depth > 0 and view.state is not ModelState.ACTIVE
        ]

    def active_is_idle(self) -> bool:
        """No model is active, or the active one has nothing in flight and nothing queued: a
        switch now interrupts nobody."""
        active = self.models.get(self.active) if self.active else None
        return active is None or (active.in_flight == 0 and active.queue_depth == 0)


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
    slept_level: int | None

    @property
    def starts_cold(self) -> bool: ...


def oldest_waiting_model(snapshot: Snapshot) -> str | None:
    """The non-active model whose oldest queued request has waited longest, if any."""
    waiting = snapshot.waiting()
    if not waiting:
        return None
    return min(waiting, key=lambda view: view.oldest_arrival or 0.0).name
