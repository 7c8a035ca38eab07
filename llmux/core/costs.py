"""Measured switch costs, smoothed per (from, to) pair, that feed the switch policy.

A switch's cost is the time during which no model serves: the sleep hook plus the wake hook. The
drain before it is not counted, since the old model is still serving then. Cold starts (nothing
was active) are kept apart, because waking from idle skips the sleep hook entirely. The wake
hook alone is smoothed per model too: what evicting a model will cost when it is wanted again.
"""

from __future__ import annotations

EMA_ALPHA = 0.3
IDLE = "idle"  # the `from` of a cold start, in metrics and in the cost table


class SwitchCostTracker:
    def __init__(self, alpha: float = EMA_ALPHA) -> None:
        self.alpha = alpha
        self.switches: dict[tuple[str, str], float] = {}
        self.cold_starts: dict[str, float] = {}
        self.wakes: dict[str, float] = {}

    def observe_wake(self, model: str, seconds: float) -> float:
        return self._fold(self.wakes, model, seconds)

    def observe(self, from_model: str | None, to_model: str, seconds: float) -> float:
        """Fold one measured cost in and return the new estimate for that pair."""
        if from_model is None:
            return self._fold(self.cold_starts, to_model, seconds)
        return self._fold(self.switches, (from_model, to_model), seconds)

    def _fold(self, table: dict, key: object, seconds: float) -> float:
        previous = table.get(key)
        estimate = (
            seconds if previous is None else self.alpha * seconds + (1 - self.alpha) * previous
        )
        table[key] = estimate
        return estimate
