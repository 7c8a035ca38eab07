"""What every operation is: a change of what is awake, run one at a time, in phases.

An operation (a switch, a retreat, an alive check, reconciling, preloading, a recovery) is an
object with its own phases; each phase waits for exactly one thing the core asked for: a hook's
end, a drain, a timer. It acts on the group only through `Group`, the few things the core lets
an operation do (move a model through the transition table, run a hook, grant the waiting, say
something), so the rules stay where the core keeps them (core/group.py).

An operation that raises is aborted by the core through one path (GroupCore._abort): the models
it acted on are held UNKNOWN, its running hooks are handed to a recovery, and `aborted` lets it
answer whoever waits for it.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from llmux.config import Config, GroupConfig
from llmux.core import events as ev
from llmux.core.costs import SwitchCostTracker
from llmux.core.records import ModelRecord
from llmux.core.states import Cause, HookName, ModelState
from llmux.errors import LlmuxError, ModelUnavailable

if TYPE_CHECKING:
    from llmux.policies.interface import Event as PolicyEvent

FAILED_SWITCH_BACKOFF_SECS = 2.0


class Phase(StrEnum):
    """Where an operation stands: what it waits for next."""

    NEXT = "next"  # about to take its next model
    DRAIN = "drain"  # the last in-flight request of its victims
    SLEEP = "sleep"  # a sleep hook
    SLEEP_CHECK = "sleep_check"  # the alive hook, after a sleep hook failed
    ROOM = "room"  # a read of the GPUs' free memory before the wake (groups naming GPUs)
    WAKE = "wake"  # a wake hook
    CLEANUP = "cleanup"  # the sleep hook, after a wake failed
    CLEANUP_CHECK = "cleanup_check"  # the alive hook, after that cleanup failed
    ASK = "ask"  # alive hooks (and hooks an aborted operation left running)


class Group(Protocol):
    """What an operation may read and do to its group (GroupCore is the one implementation)."""

    now: float
    config: Config
    group: GroupConfig
    models: dict[str, ModelRecord]
    retiring: list[ModelRecord]
    costs: SwitchCostTracker
    pending: deque[Operation]
    retry_at: float
    ready: bool

    def move(self, model: ModelRecord, cause: Cause) -> None: ...
    def run(
        self,
        model: ModelRecord,
        hook: HookName,
        env: dict[str, str] | None = None,
        waiting: int = 0,
    ) -> int: ...
    def emit_reply(self, reply: int, error: LlmuxError | None) -> None: ...
    def cancel(self, job: int) -> None: ...
    def read_gpus(self) -> int: ...
    def gpu_room_needed(self, model: ModelRecord) -> float | None: ...
    def observe(self, name: str, message: str, level: str = "info", **fields: object) -> None: ...
    def observe_quietly(self, name: str, **fields: object) -> None: ...
    def activate(self, model: ModelRecord) -> None: ...
    def slept(self, model: ModelRecord, outcome: ev.HookOutcome) -> None: ...
    def serve_again(self, model: ModelRecord) -> None: ...
    def grant_waiting(self, model: ModelRecord) -> None: ...
    def fail_queue(self, model: ModelRecord, error: LlmuxError) -> None: ...
    def fail_waiters_of(
        self, woken: ModelRecord, failure: str, timed_out: bool = False
    ) -> None: ...
    def hook_error(
        self, model: ModelRecord, what: str, failure: str, retry: bool = True
    ) -> ModelUnavailable: ...
    def hold_unknown(self, record: ModelRecord) -> None: ...
    def found_dead(self, model: ModelRecord) -> None: ...
    def end_op(self, then: Operation | None = None) -> None: ...
    def consult(self, event: PolicyEvent) -> None: ...
    def fits(self, target: ModelRecord, victims: list[ModelRecord]) -> bool: ...
    def server_held_by_a_retired_record(self, model: ModelRecord) -> bool: ...
    def waiting(self) -> list[ModelRecord]: ...
    def woken(
        self, model: ModelRecord, source: str | None, wake: ev.HookOutcome, cost: float
    ) -> float: ...


class Operation:
    """One change of what is awake. `job` is the hook it waits for (None: none runs)."""

    job: int | None = None

    def step(self, group: Group) -> bool:
        """Move on if what it waits for has happened; False when it waits."""
        raise NotImplementedError

    def hook_done(self, group: Group, job: int, outcome: ev.HookOutcome) -> None:
        """The hook it ran as `job` ended."""
        raise NotImplementedError

    def jobs(self) -> set[int]:
        """The hooks it runs now."""
        return set() if self.job is None else {self.job}

    def acts_on(self) -> set[ModelRecord]:
        """The records it acts on: a hook may be running for them."""
        raise NotImplementedError

    def in_doubt(self) -> set[ModelRecord]:
        """The models whose state is not known if it fails midway: all it acts on that are not
        asleep (one asleep with no hook running is surely asleep)."""
        return {model for model in self.acts_on() if model.state is not ModelState.ASLEEP}

    def server_exited(self, group: Group, model: ModelRecord) -> None:
        """The server of `model`, one it acts on, exited. By default an active model stops
        serving at once (its steps will find the server gone through the driver)."""
        group.found_dead(model)

    def aborted(self, group: Group, error: LlmuxError) -> None:
        """It failed midway and is given up: answer whoever waits for it, if anyone."""


def says_not_serving(outcome: ev.HookOutcome) -> bool:
    """An alive hook that exited non-zero in time: "not serving". A timeout says nothing."""
    return not outcome.ok and not outcome.timed_out
