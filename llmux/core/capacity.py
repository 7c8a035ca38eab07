"""Room in a group: what the models not asleep hold, and which awake models to put to sleep by
default so that another fits (a policy's own choice is checked in core/policy_answers.py)."""

from __future__ import annotations

import math

from llmux.core.snapshot import ModelView, Snapshot
from llmux.core.states import ModelState

DEFAULT_WAKE_COST_SECS = 10.0


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


def held(snapshot: Snapshot, excluding: set[str]) -> float:
    """Capacity held by the models that are not asleep, leaving out `excluding`."""
    return sum(
        view.size
        for view in snapshot.models.values()
        if view.state is not ModelState.ASLEEP and view.name not in excluding
    )


def wake_cost(snapshot: Snapshot, name: str) -> float:
    """What waking `name` again is expected to cost: its measured wake from the depth it would
    be put to sleep at, else any measured warm wake, else its wake from idle, else its cold
    start, else the mean of measured switches to it, else a default."""
    view = snapshot.models.get(name)
    level = view.sleep_level if view is not None else None
    if level is not None and (name, level) in snapshot.wake_step_costs:
        return snapshot.wake_step_costs[(name, level)]
    for measured in (snapshot.wake_costs, snapshot.idle_wake_costs, snapshot.cold_start_costs):
        if name in measured:
            return measured[name]
    into = [cost for (_, target), cost in snapshot.switch_costs.items() if target == name]
    return sum(into) / len(into) if into else DEFAULT_WAKE_COST_SECS
