"""The switch-policy interface: the events a policy is told of and the decisions it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmux.core.snapshot import Snapshot


# Events the switcher reports.
@dataclass(frozen=True)
class RequestArrived:
    model: str


@dataclass(frozen=True)
class RequestCompleted:
    model: str


@dataclass(frozen=True)
class SwitchCompleted:
    target: str
    ok: bool


@dataclass(frozen=True)
class TimerFired:
    pass


Event = RequestArrived | RequestCompleted | SwitchCompleted | TimerFired


# Decisions a policy returns.
@dataclass(frozen=True)
class Stay:
    pass


@dataclass(frozen=True)
class SwitchTo:
    model: str


@dataclass(frozen=True)
class CallAt:
    when: float


Decision = Stay | SwitchTo | CallAt


class Policy(Protocol):
    """What a switch policy must answer. Two methods are optional, looked up on the object:
    `evict(target, snapshot) -> list[str]` (the models to put to sleep for `target`) and
    `sleep_depth(model, waiting, snapshot) -> int` (1 or 2, for a `sleep_level = "auto"`
    model; `waiting`: the requests its sleep keeps waiting). Every answer is checked
    (core/policy_answers.py); a bad one is replaced by llmux's own."""

    def decide(self, event: Event, snapshot: Snapshot) -> Decision: ...
