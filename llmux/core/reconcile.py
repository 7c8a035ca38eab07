"""Reconciling: find out what serves, by asking alive hooks, and take it as it is.

At start-up every model with an alive hook is asked; one that serves and fits is adopted as
active, one that serves beside it (or whose hook timed out) is put to sleep, then preload runs.
The same path recovers the models an aborted operation left UNKNOWN: first the hooks that
operation left running end (their outcome is evidence too), then the alive hooks of the models
still unknown are asked; one that serves and fits is adopted, one that surely does not serve
and has nothing in flight is asleep, and every other one is drained and put to sleep, again
after a pause, until a sleep succeeds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmux.core import events as ev
from llmux.core.operation import Group, Operation, Phase, says_not_serving
from llmux.core.preload import Preload
from llmux.core.records import ModelRecord
from llmux.core.retreat import Retreat
from llmux.core.states import Cause, HookName, ModelState
from llmux.errors import LlmuxError


@dataclass(eq=False)
class Reconcile(Operation):
    asked: list[ModelRecord] = field(default_factory=list)  # in config order
    asking: dict[int, ModelRecord] = field(default_factory=dict)
    serving: set[ModelRecord] = field(default_factory=set)
    unknown: set[ModelRecord] = field(default_factory=set)  # its alive hook timed out

    @classmethod
    def at_start_up(cls, group: Group) -> Reconcile:
        op = cls()
        for model in group.models.values():
            if model.config.has_alive:
                op.asked.append(model)
                op.asking[group.run(model, HookName.ALIVE)] = model
        return op

    def jobs(self) -> set[int]:
        return set(self.asking)

    def acts_on(self) -> set[ModelRecord]:
        return set(self.asked)

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        model = self.asking.pop(job)
        model.last_alive = outcome.ok
        if outcome.ok:
            self.serving.add(model)
        elif outcome.timed_out:
            self.unknown.add(model)

    def step(self, group: Group) -> bool:
        if self.asking:
            return False
        # An alive hook that timed out leaves it unknown: it may serve, so it is put to sleep
        # before anything else wakes (rule 2). So is a record a reload replaced meanwhile: the
        # answer was about its backend, which is not the one configured now.
        held = [m for m in self.asked if m in self.serving or m in self.unknown]
        if not held:
            group.observe(
                "nothing_serving", f"no model of group {group.group.name} is serving at start-up"
            )
        extra: deque[ModelRecord] = deque()
        for model in held:
            current = group.models.get(model.name) is model
            adopted = current and model in self.serving and group.fits(model, [])
            group.move(model, Cause.ADOPTED)
            if adopted:
                _adopt(group, model)
                continue
            model.active_since = group.now
            if not current:
                continue  # retired: put to sleep as a retirement
            group.move(model, Cause.DRAIN)  # held, never granted to: it is put to sleep next
            why = (
                f"may be serving (its {model.step(HookName.ALIVE)} timed out)"
                if model in self.unknown
                else ("is also serving at start-up")
            )
            group.observe(
                "extra_serving", f"{model.name} {why}; putting it to sleep", level="warning",
                model=model.name,
            )  # fmt: skip
            extra.append(model)
        group.end_op()
        if extra:
            group.pending.appendleft(Retreat("extra", extra, unknown=self.unknown & set(extra)))
        preload = deque(n for n in group.config.preload if n in group.models)
        group.pending.append(Preload(preload))
        return True

    def in_doubt(self) -> set[ModelRecord]:
        return set(self.asked)  # called asleep until it is known: none of them is known

    def server_exited(self, group: Group, model: ModelRecord) -> None:
        """What its alive hook said is out of date: it serves nothing now."""
        self.serving.discard(model)
        self.unknown.discard(model)

    def aborted(self, group: Group, error: LlmuxError) -> None:
        if not any(isinstance(op, Preload) for op in group.pending):
            group.pending.append(Preload(deque()))  # start-up still ends, serving nothing yet


@dataclass(eq=False)
class Recovery(Operation):
    """Recover `models` (UNKNOWN); `left_running` are hooks an aborted operation started."""

    models: list[ModelRecord]
    left_running: dict[int, tuple[ModelRecord, HookName]] = field(default_factory=dict)
    asking: dict[int, ModelRecord] = field(default_factory=dict)
    serving: set[ModelRecord] = field(default_factory=set)
    asleep: set[ModelRecord] = field(default_factory=set)  # surely not serving
    phase: Phase = Phase.ASK

    def jobs(self) -> set[int]:
        return {*self.left_running, *self.asking}

    def acts_on(self) -> set[ModelRecord]:
        return {*self.models, *(model for model, _ in self.left_running.values())}

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        if job in self.left_running:
            model, hook = self.left_running.pop(job)
            if outcome.ok and hook is HookName.SLEEP:
                self.asleep.add(model)
                self.serving.discard(model)
            elif outcome.ok:  # a wake that succeeded, or an alive hook that says so
                self.serving.add(model)
                self.asleep.discard(model)
            return
        model = self.asking.pop(job)
        model.last_alive = outcome.ok
        if outcome.ok:
            self.serving.add(model)
        elif says_not_serving(outcome):
            self.asleep.add(model)

    def server_exited(self, group: Group, model: ModelRecord) -> None:
        self.serving.discard(model)
        self.asleep.add(model)

    def step(self, group: Group) -> bool:
        if self.left_running or self.asking:
            return False
        if self.phase == Phase.ASK:
            self.phase = Phase.NEXT
            for model in self.models:
                known = model in self.serving or model in self.asleep
                if not known and model.config.has_alive and model.state is ModelState.UNKNOWN:
                    self.asking[group.run(model, HookName.ALIVE)] = model
            return True
        to_sleep: deque[ModelRecord] = deque()
        for model in self.models:
            if model.state is not ModelState.UNKNOWN:
                continue
            current = group.models.get(model.name) is model
            if model in self.serving and current and group.fits(model, []):
                group.move(model, Cause.ADOPTED)
                _adopt(group, model, recovered=True)
            elif model in self.asleep and not model.in_flight:
                group.move(model, Cause.GONE)
                model.active_since = None
                group.observe(
                    "model_recovered", f"{model.name} does not serve: it counts as asleep",
                    model=model.name,
                )  # fmt: skip
            else:
                to_sleep.append(model)
        group.end_op(then=Retreat("recover", to_sleep) if to_sleep else None)
        return True


def _adopt(group: Group, model: ModelRecord, recovered: bool = False) -> None:
    group.activate(model)
    how = "recovered" if recovered else "adopted"
    group.observe(
        "model_activated", f"{model.name} already serves: {how} as an active model",
        model=model.name, adopted=True,
    )  # fmt: skip
