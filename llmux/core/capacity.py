"""Room in a group: what the models not asleep hold, and which awake models to put to sleep so
that another fits (the default choice, or a policy's own, checked)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from llmux.core.states import ModelState

if TYPE_CHECKING:
    from llmux.core.snapshot import ModelView, Snapshot
    from llmux.policies.interface import Policy

log = logging.getLogger("llmux.policy")

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
