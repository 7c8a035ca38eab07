"""The cost-aware policy (the default): serve while there is work, for a quantum that scales
with what the next switch costs, with two staleness bounds."""

from __future__ import annotations

import math

from llmux.core.snapshot import ModelView, Snapshot
from llmux.policies.interface import CallAt, Decision, Event, Stay, SwitchTo


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
        waiting = snapshot.waiting()
        if not waiting:
            return Stay()
        target = self._next(waiting, snapshot)
        if snapshot.active_is_idle():
            return SwitchTo(target)
        cost = snapshot.cost_or(target, self.default_cost)
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

    def _next(self, waiting: list[ModelView], snapshot: Snapshot) -> str:
        def score(view: ModelView) -> float:
            age = snapshot.now - (view.oldest_arrival or snapshot.now)
            cost = snapshot.cost_or(view.name, self.default_cost)
            return view.queue_depth * (age + 1.0) / (cost + 1.0)

        return max(waiting, key=score).name
