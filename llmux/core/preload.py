"""Preloading: after start-up, wake the models `preload` names, one at a time, where they fit;
then the group is ready and the requests that queued meanwhile reach the policy."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmux.core import events as ev
from llmux.core.operation import FAILED_SWITCH_BACKOFF_SECS, Group, Operation, Phase
from llmux.core.records import ModelRecord
from llmux.core.states import Cause, HookName, ModelState
from llmux.errors import LlmuxError
from llmux.policies.interface import RequestArrived


@dataclass(eq=False)
class Preload(Operation):
    names: deque[str]
    model: ModelRecord | None = None
    phase: Phase = Phase.NEXT  # then WAKE (CLEANUP, CLEANUP_CHECK) per model
    job: int | None = None
    failure: str = ""
    timed_out: bool = False

    def acts_on(self) -> set[ModelRecord]:
        return set() if self.model is None else {self.model}

    def step(self, group: Group) -> bool:
        if self.job is not None:
            return False
        while self.phase == Phase.NEXT:
            if not self.names:
                group.end_op()
                _ready(group)
                return True
            model = group.models.get(self.names.popleft())
            if model is None or model.state is not ModelState.ASLEEP:
                continue
            if group.server_held_by_a_retired_record(model):
                group.observe(
                    "preload_skipped", f"preload: {model.name}'s server is to be put to sleep "
                    "first (its sleep failed); left asleep", level="warning", model=model.name,
                )  # fmt: skip
                continue
            if not group.fits(model, []):
                awake = ", ".join(
                    m.name for m in group.models.values() if m.state is ModelState.ACTIVE
                )
                group.observe(
                    "preload_skipped", f"preload: {model.name} does not fit beside {awake} in "
                    f"group {group.group.name}; left asleep", level="warning", model=model.name,
                )  # fmt: skip
                continue
            self.model, self.phase = model, Phase.WAKE
            group.move(model, Cause.WAKE_STARTED)
            self.job = group.run(model, HookName.WAKE, _env(model))
        return False

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        self.job = None
        model = self.model
        assert model is not None
        if self.phase == Phase.WAKE:
            if outcome.ok:
                group.move(model, Cause.WAKE_OK)
                group.activate(model)
                estimate = group.woken(model, None, outcome, outcome.duration)
                how = " (a cold start)" if outcome.cold else ""
                group.observe(
                    "model_activated", f"{model.name} preloaded in {outcome.duration:.2f}s{how}",
                    model=model.name, preload=True, cost_seconds=outcome.duration,
                    estimate=estimate, cold=outcome.cold,
                )  # fmt: skip
                self.phase = Phase.NEXT
                return
            self.failure, self.timed_out = outcome.failure, outcome.timed_out
            group.move(model, Cause.WAKE_FAILED)
            self.phase = Phase.CLEANUP
            self.job = group.run(model, HookName.SLEEP, _env(model))
        elif self.phase == Phase.CLEANUP:
            if outcome.ok:
                group.move(model, Cause.SLEEP_OK)
                self._failed(group)
            elif model.config.has_alive:
                self.phase = Phase.CLEANUP_CHECK
                self.job = group.run(model, HookName.ALIVE)
            else:
                group.hold_unknown(model)
                self._failed(group)
        elif self.phase == Phase.CLEANUP_CHECK:
            if outcome.ok:  # its wake failed, yet it serves
                group.move(model, Cause.STILL_SERVING)
                group.activate(model)
                self.phase = Phase.NEXT
            elif outcome.timed_out:
                group.hold_unknown(model)
                self._failed(group)
            else:
                group.move(model, Cause.GONE)
                self._failed(group)

    def _failed(self, group: Group) -> None:
        model = self.model
        assert model is not None
        group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
        group.fail_waiters_of(model, self.failure, self.timed_out)
        self.phase = Phase.NEXT

    def aborted(self, group: Group, error: LlmuxError) -> None:
        # The rest is not preloaded; start-up ends once the recovery does.
        group.pending.append(Preload(deque()))


def _ready(group: Group) -> None:
    """Start-up is over: requests that queued meanwhile reach the policy, oldest first."""
    group.ready = True
    for model in sorted(group.waiting(), key=lambda m: m.queue[0].arrival):
        group.consult(RequestArrived(model.name))


def _env(model: ModelRecord) -> dict[str, str]:
    return {"LLMUX_FROM": "", "LLMUX_TO": model.name}
