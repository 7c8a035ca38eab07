"""The FIFO policy: the original llmux behaviour."""

from __future__ import annotations

from llmux.core.snapshot import Snapshot, oldest_waiting_model
from llmux.policies.interface import Decision, Event, Stay, SwitchTo


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
