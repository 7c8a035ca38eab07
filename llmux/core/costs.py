"""Measured switch costs, smoothed per (from, to) pair, that feed the switch policy.

A switch's cost is the time during which no model serves: the sleep hooks plus the wake hook.
The drain before it is not counted, since the old model is still serving then. Three kinds of
switch are kept apart, because their costs differ by orders of magnitude:
- a warm switch from a model put to sleep, per (from, to);
- a wake from idle (nothing was put to sleep), per model, under `from="idle"`;
- a cold start (the wake had to start the model's server, 30 s or more for a real model), per
  model under `from="cold"`, whatever was active before: counted as a warm switch, one start
  would skew that pair's estimate for many switches.
The warm wake hook alone is smoothed per model too: what evicting a model will cost when it is
wanted again.
"""

from __future__ import annotations

EMA_ALPHA = 0.3
IDLE = "idle"  # the `from` of a wake with nothing to put to sleep, in metrics and cost tables
COLD = "cold"  # the `from` of a cold start (the wake started the server)


class SwitchCostTracker:
    def __init__(self, alpha: float = EMA_ALPHA) -> None:
        self.alpha = alpha
        self.switches: dict[tuple[str, str], float] = {}
        self.idle_wakes: dict[str, float] = {}
        self.cold_starts: dict[str, float] = {}
        self.wakes: dict[str, float] = {}
        # Each step alone, per model and sleep depth: what a switch will cost is the sleeps of
        # its victims at the depths they sleep at, plus its target's wake from its depth.
        self.sleep_steps: dict[tuple[str, int], float] = {}
        self.wake_steps: dict[tuple[str, int | str], float] = {}  # level "cold": it started

    def observe_sleep(self, model: str, level: int, seconds: float) -> float:
        """Fold one successful sleep of `model` at `level` in; the new estimate."""
        return self._fold(self.sleep_steps, (model, level), seconds)

    def observe_switch(
        self,
        from_model: str | None,
        to_model: str,
        wake_seconds: float,
        seconds: float,
        cold: bool,
        level: int = 1,
    ) -> float:
        """Fold one switch in (`seconds` with nobody serving, of which `wake_seconds` were the
        wake, from sleep depth `level`) and return the new estimate of its kind: cold, from
        idle, or for its pair."""
        if cold:
            self._fold(self.wake_steps, (to_model, COLD), wake_seconds)
            return self._fold(self.cold_starts, to_model, seconds)
        self._fold(self.wakes, to_model, wake_seconds)
        self._fold(self.wake_steps, (to_model, level), wake_seconds)
        if from_model is None:
            return self._fold(self.idle_wakes, to_model, seconds)
        return self._fold(self.switches, (from_model, to_model), seconds)

    def table(self) -> list[tuple[str, str, float]]:
        """Every estimate as (from, to, seconds): pairs, then wakes from idle, then cold starts."""
        return [
            *((source, target, s) for (source, target), s in self.switches.items()),
            *((IDLE, target, s) for target, s in self.idle_wakes.items()),
            *((COLD, target, s) for target, s in self.cold_starts.items()),
        ]

    def _fold(self, table: dict, key: object, seconds: float) -> float:
        previous = table.get(key)
        estimate = (
            seconds if previous is None else self.alpha * seconds + (1 - self.alpha) * previous
        )
        table[key] = estimate
        return estimate
