"""How a group shows itself to its policy: the one way a snapshot is built, so that live and
simulated policies see the same thing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from llmux.core.capacity import default_evictions
from llmux.core.snapshot import ModelRuntimeLike, ModelView, Snapshot, oldest_waiting_model
from llmux.core.states import ModelState


def snapshot_of(
    now: float,
    models: Iterable[ModelRuntimeLike],
    switching: bool,
    switch_costs: Mapping[tuple[str, str], float],
    cold_start_costs: Mapping[str, float],
    capacity: float = 1.0,
    wake_costs: Mapping[str, float] | None = None,
    idle_wake_costs: Mapping[str, float] | None = None,
    *,
    sleep_costs: Mapping[tuple[str, int], float] | None = None,
    wake_step_costs: Mapping[tuple[str, int | str], float] | None = None,
    sleep_levels: Mapping[str, int | None] | None = None,
    demand: Mapping[str, float] | None = None,
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
            starts_cold=model.starts_cold,
            slept_level=getattr(model, "slept_level", None),
            sleep_level=(sleep_levels or {}).get(model.name, 1),
        )
    snapshot = Snapshot(
        now=now,
        models=MappingProxyType(views),  # read-only: a policy cannot change what it is checked by
        active=None,
        active_since=None,
        switching=switching,
        switch_costs=MappingProxyType(dict(switch_costs)),
        cold_start_costs=MappingProxyType(dict(cold_start_costs)),
        capacity=capacity,
        wake_costs=MappingProxyType(dict(wake_costs or {})),
        idle_wake_costs=MappingProxyType(dict(idle_wake_costs or {})),
        sleep_costs=MappingProxyType(dict(sleep_costs or {})),
        wake_step_costs=MappingProxyType(dict(wake_step_costs or {})),
        demand=MappingProxyType(dict(demand or {})),
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
