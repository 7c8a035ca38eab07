"""A retreat: drain models and put them to sleep, waking nothing in their place.

For an idle sleep (`ttl_secs`), an admin sleep, the retirement of a record a reload replaced, a
model found dead, a model found serving beside another at start-up ("extra"), and a model an
aborted operation left unknown ("recover"). Each model in turn:

    ACTIVE -> DRAINING until nothing is in flight (an UNKNOWN model is granted nothing already)
    -> SLEEPING while its sleep hook runs -> ASLEEP
      (fails: its alive hook is asked; "not serving" counts as asleep; otherwise it serves on,
      or, if it was never known to serve, it stays held until a later sleep succeeds)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmux.core import events as ev
from llmux.core.commands import RETIRING_ENV
from llmux.core.operation import (
    FAILED_SWITCH_BACKOFF_SECS,
    Group,
    Operation,
    Phase,
    says_not_serving,
)
from llmux.core.records import ModelRecord
from llmux.core.states import Cause, HookName, ModelState
from llmux.errors import LlmuxError
from llmux.policies.interface import TimerFired

RETREATING = (ModelState.ACTIVE, ModelState.DRAINING, ModelState.UNKNOWN)


@dataclass(eq=False)
class Retreat(Operation):
    """`reply` (admin) is answered when the whole request is done."""

    purpose: str  # idle, admin, retire, dead, extra, recover
    models: deque[ModelRecord]
    reply: int | None = None
    unknown: set[ModelRecord] = field(default_factory=set)  # never known to serve
    unsure: set[ModelRecord] = field(default_factory=set)  # UNKNOWN when it was taken
    phase: Phase = Phase.NEXT  # then DRAIN, SLEEP (SLEEP_CHECK) per model
    job: int | None = None
    errors: list[LlmuxError] = field(default_factory=list)
    failure: str = ""

    @property
    def model(self) -> ModelRecord:
        return self.models[0]

    def acts_on(self) -> set[ModelRecord]:
        return set(self.models)

    def step(self, group: Group) -> bool:
        if self.job is not None:
            return False
        if self.phase == Phase.NEXT:
            while self.models and self.model.state not in RETREATING:
                self._done_with()  # asleep already: nothing to do
            if not self.models:
                self._end(group)
                return True
            if self.model.state is ModelState.ACTIVE:
                cause = Cause.FOUND_DEAD if self.purpose == "dead" else Cause.DRAIN
                group.move(self.model, cause)
            elif self.model.state is ModelState.UNKNOWN:
                self.unsure.add(self.model)
            self.phase = Phase.DRAIN
            return True
        if self.phase == Phase.DRAIN:
            if self.model.in_flight:
                return False
            group.move(self.model, Cause.SLEEP_STARTED)
            self.phase = Phase.SLEEP
            env = RETIRING_ENV if self.model.retiring else None
            self.job = group.run(self.model, HookName.SLEEP, env)
        return False

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        self.job = None
        model = self.model
        if self.phase == Phase.SLEEP:
            if outcome.ok:
                group.slept(model, outcome)
                self._done_with()
            elif self.purpose == "dead" or model.exited:
                # Its alive hook already said it does not serve (rule 3), or its server exited.
                group.move(model, Cause.GONE)
                model.active_since = None
                self._done_with()
            elif model.config.has_alive:
                self.failure = outcome.failure
                self.phase = Phase.SLEEP_CHECK
                self.job = group.run(model, HookName.ALIVE)
            else:
                self._refused(group, outcome.failure)
        elif self.phase == Phase.SLEEP_CHECK:
            model.last_alive = outcome.ok
            if says_not_serving(outcome) or model.exited:
                group.move(model, Cause.GONE)
                model.active_since = None
                self._done_with()
            else:
                self._refused(group, self.failure)

    def _refused(self, group: Group, failure: str) -> None:
        model = self.model
        unsure = self.purpose == "recover" or model in self.unsure
        if unsure and not (model.last_alive and model.config.has_alive):
            # Still not known: held as it was, tried again after a pause (rule 2).
            group.observe(
                "sleep_failed", f"{model.name} may still hold memory (its sleep failed); it "
                "serves nothing until it is put to sleep", level="error", model=model.name,
            )  # fmt: skip
            group.move(model, Cause.UNSURE)
            group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
            self._done_with()
            return
        if model in self.unknown:
            # Never known to serve, and now not surely asleep: held, not trusted (rule 2).
            group.observe(
                "sleep_failed", f"{model.name} may still hold memory (its sleep failed); it "
                "serves nothing until it is put to sleep", level="error", model=model.name,
            )  # fmt: skip
            group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
            group.hold_unknown(model)
            self._done_with()
            return
        group.move(model, Cause.STILL_SERVING)
        group.activate(model)
        if self.purpose == "retire":
            # It keeps holding its room (rule 2); its retirement is tried again after a pause.
            group.observe(
                "retire_failed", f"retired model {model.name} could not be put to sleep; "
                f"trying again in {FAILED_SWITCH_BACKOFF_SECS:g}s", level="error",
                model=model.name,
            )  # fmt: skip
            group.retry_at = group.now + FAILED_SWITCH_BACKOFF_SECS
            self._done_with()
            return
        group.observe(
            "sleep_failed", f"{self.purpose} sleep of {model.name} failed; it stays active",
            level="error", model=model.name,
        )  # fmt: skip
        self.errors.append(
            group.hook_error(model, f"{model.name} could not be put to sleep", failure)
        )
        self._done_with()

    def _done_with(self) -> None:
        self.models.popleft()
        self.phase = Phase.NEXT

    def _end(self, group: Group) -> None:
        group.end_op()
        if self.reply is not None:
            group.emit_reply(self.reply, self.errors[0] if self.errors else None)
        group.consult(TimerFired())  # requests that queued meanwhile

    def aborted(self, group: Group, error: LlmuxError) -> None:
        if self.reply is not None:
            group.emit_reply(self.reply, error)
