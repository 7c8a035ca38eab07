"""An alive check: ask the alive hook of an idle active model (or of one the proxy could not
reach) whether it still serves; if it does not, it is drained and put to sleep (rule 4)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmux.core import events as ev
from llmux.core.operation import Group, Operation
from llmux.core.records import ModelRecord
from llmux.core.retreat import Retreat
from llmux.core.states import HookName, ModelState


@dataclass(eq=False)
class AliveCheck(Operation):
    model: ModelRecord
    job: int | None = None

    def acts_on(self) -> set[ModelRecord]:
        return {self.model}

    def step(self, group: Group) -> bool:
        if self.job is None:
            self.model.check_requested = False
            self.job = group.run(self.model, HookName.ALIVE)
        return False

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        model = self.model
        model.last_alive_check = group.now
        if model.state is not ModelState.ACTIVE:
            # Its server exited meanwhile: it is draining already, and is put to sleep now.
            group.end_op(then=Retreat("dead", deque([model])))
            return
        if outcome.ok:
            model.last_alive = True
            group.end_op()
            return
        if outcome.timed_out:
            group.end_op()
            group.observe(
                "alive_timeout", f"{model.step(HookName.ALIVE)} for {model.name} timed out; "
                "it stays active",
                level="warning", model=model.name,
            )  # fmt: skip
            return
        model.last_alive = False
        group.observe(
            "model_dead", f"{model.name} is active but its {model.step(HookName.ALIVE)} fails: "
            "draining it and putting it to sleep", level="error", model=model.name,
        )  # fmt: skip
        group.end_op(then=Retreat("dead", deque([model])))
