"""Exhaustive oldest-first: a reference policy that never leaves a model with work to do."""

from __future__ import annotations

from llmux.core.snapshot import Snapshot, oldest_waiting_model
from llmux.policies.interface import CallAt, Decision, Event, Stay, SwitchTo


class ExhaustivePolicy:
    """Serve the active model until it has nothing in flight and nothing queued, then switch to
    the model whose oldest waiting request is oldest.

    This pays the fewest switches, which gives the best mean latency at low and moderate load;
    but a model with a steady stream keeps the GPU for as long as the stream lasts, so the others'
    p99 grows without bound under high load. `max_wait_secs` caps that: once a request has waited
    that long, its model goes next (after the active model drains), whatever the active one has
    left. A bound short next to the switch cost thrashes under overload, when every request is
    stale; that is the trade-off the adaptive default resolves.
    """

    def __init__(self, max_wait_secs: float | None = None) -> None:
        if max_wait_secs is not None and max_wait_secs <= 0:
            raise ValueError("max_wait_secs must be > 0")
        self.max_wait = max_wait_secs

    def decide(self, event: Event, snapshot: Snapshot) -> Decision:
        target = None if snapshot.switching else oldest_waiting_model(snapshot)
        if target is None:
            return Stay()
        if snapshot.active_is_idle():
            return SwitchTo(target)
        if self.max_wait is None:
            return Stay()  # the active model's last completion calls again
        oldest = snapshot.models[target].oldest_arrival
        stale_at = (snapshot.now if oldest is None else oldest) + self.max_wait
        if snapshot.now >= stale_at:
            return SwitchTo(target)
        return CallAt(stale_at)
