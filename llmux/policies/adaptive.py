"""The adaptive policy (the default): exhaustive service, with a staleness bound that tightens as
the queue behind the active model grows."""

from __future__ import annotations

from llmux.core.snapshot import ModelView, Snapshot, oldest_waiting_model
from llmux.policies.interface import CallAt, Decision, Event, Stay, SwitchTo


class AdaptivePolicy:
    """Serve the active model until it is idle (as `exhaustive` does), unless a waiting request
    has gone stale; then switch to the model of the oldest waiting request.

    Two simple policies bracket what a policy can do: exhaustive service pays the fewest switches
    and has the best mean at low and moderate load, but a steady stream on the active model keeps
    the others waiting; gated oldest-first (`fifo`) is best under high load. Which one wins
    depends on the load, and the load shows in the one thing the switcher always sees: how many
    requests wait behind the active model. Each second the active model is held delays every one
    of them, so the staleness bound shrinks as they grow:

        bound = clamp(depth_factor * C / sqrt(waiting), min_wait_factor * C, max_wait_factor * C)

    where C is the measured cost of the next switch (`default_cost_secs` until one is measured)
    and `waiting` counts the requests of the other models. A light queue lets the active model
    finish its burst (exhaustive's mean); a deep one brings the bound down towards
    `min_wait_factor` switch costs (FIFO's order). With one request waiting, the bound is at most
    `max_wait_factor * C`: that is how long a steady stream on one model can hold another's
    request before the switch starts.

    After each switch, the new model serves for at least `guard_factor * C` before staleness can
    take it away, so at most 1 / (1 + guard_factor) of the time goes to switching under overload,
    when every request is stale. `max_wait_secs` is an optional hard bound in seconds: once the
    oldest request has waited that long less one switch cost, its model goes next, guard or not.
    """

    def __init__(
        self,
        depth_factor: float = 24.0,
        min_wait_factor: float = 4.0,
        max_wait_factor: float = 12.0,
        guard_factor: float = 2.0,
        max_wait_secs: float | None = None,
        default_cost_secs: float = 10.0,
    ) -> None:
        if depth_factor <= 0 or default_cost_secs <= 0:
            raise ValueError("depth_factor and default_cost_secs must be > 0")
        if not 0 < min_wait_factor <= max_wait_factor:
            raise ValueError("need 0 < min_wait_factor <= max_wait_factor")
        if guard_factor < 0:
            raise ValueError("guard_factor must be >= 0")
        if max_wait_secs is not None and max_wait_secs <= 0:
            raise ValueError("max_wait_secs must be > 0")
        self.depth_factor = depth_factor
        self.min_wait_factor = min_wait_factor
        self.max_wait_factor = max_wait_factor
        self.guard_factor = guard_factor
        self.max_wait = max_wait_secs
        self.default_cost = default_cost_secs

    def decide(self, event: Event, snapshot: Snapshot) -> Decision:
        target = None if snapshot.switching else oldest_waiting_model(snapshot)
        if target is None:
            return Stay()
        if snapshot.active_is_idle():
            return SwitchTo(target)
        now, stalest = snapshot.now, snapshot.models[target]
        cost = snapshot.cost_or(target, self.default_cost)
        oldest = now if stalest.oldest_arrival is None else stalest.oldest_arrival
        since = now if snapshot.active_since is None else snapshot.active_since
        bound = self.bound(snapshot.waiting(), cost)
        stale_at = max(oldest + bound, since + self.guard_factor * cost)
        if self.max_wait is not None:
            stale_at = min(stale_at, oldest + max(0.0, self.max_wait - cost))
        # Compare against the very time a timer is set for, so a timer that fires is never
        # answered with the same timer again.
        if now >= stale_at:
            return SwitchTo(target)
        return CallAt(stale_at)

    def bound(self, waiting: list[ModelView], cost: float) -> float:
        """How long the oldest waiting request may wait before its model goes next."""
        depth = sum(view.queue_depth for view in waiting)
        scaled = self.depth_factor * cost / depth**0.5
        return min(self.max_wait_factor * cost, max(self.min_wait_factor * cost, scaled))
