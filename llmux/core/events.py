"""What happens to a group, told to its core: each event carries the time it happened.

The driver (live) and the simulator (virtual time) are the only sources of events. A command the
core issued that fails or is cancelled comes back as an event too (a `HookDone` that did not
succeed), so no state waits for an answer that never comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmux.config import Config

if TYPE_CHECKING:
    from llmux.policies.interface import Policy


@dataclass(frozen=True)
class Started:
    """Begin: find out what already serves, then preload."""

    now: float


@dataclass(frozen=True)
class Arrived:
    """A request for `model` asks for a slot; `rid` names it from now on."""

    now: float
    rid: int
    model: str


@dataclass(frozen=True)
class Left:
    """The client of `rid` is gone, or gave up waiting; whatever it held is released."""

    now: float
    rid: int


@dataclass(frozen=True)
class Finished:
    """The request `rid`, granted a slot, is done with it."""

    now: float
    rid: int


@dataclass(frozen=True)
class HookOutcome:
    """How a hook ended: `ok` (exit 0 in time), or not, and whether it timed out."""

    ok: bool
    timed_out: bool = False
    duration: float = 0.0
    failure: str = ""  # a short description for error messages (exit code, stderr tail)
    cold: bool = False  # a wake that had to start the model's server: a cold start
    cancelled: bool = False  # stopped as the core asked (CancelHook): no failure, no cost
    host_gb: float | None = None  # a level-1 sleep: the host RAM it filled, if measured


@dataclass(frozen=True)
class HookDone:
    """The hook the core ran as `job` ended (or could not start: then `ok` is false)."""

    now: float
    job: int
    outcome: HookOutcome


@dataclass(frozen=True)
class GpuMemoryRead:
    """What the read asked as `job` found: GiB free on each of the group's GPUs, in its order
    (None: it cannot be told, no driver or no NVML)."""

    now: float
    job: int
    free_gb: tuple[float, ...] | None


@dataclass(frozen=True)
class TimerDue:
    """The timer the core set under `name` is due."""

    now: float
    name: str


@dataclass(frozen=True)
class Reloaded:
    """A new, validated config for this group (and a new policy, when it changed)."""

    now: float
    config: Config
    policy: Policy | None = None


@dataclass(frozen=True)
class SleepAsked:
    """The admin API asks to put `model` (None: every model of the group) to sleep; the core
    answers with `Reply(reply)` once done."""

    now: float
    model: str | None
    reply: int


@dataclass(frozen=True)
class Unreachable:
    """The proxy could not connect to `model`'s backend: check whether it still serves."""

    now: float
    model: str


@dataclass(frozen=True)
class ServerExited:
    """The server llmux started for `model` (on `port`) exited without being asked to: it
    serves nothing from now on."""

    now: float
    model: str
    port: int | None = None


@dataclass(frozen=True)
class ShutdownBegun:
    now: float


Event = (
    Started | Arrived | Left | Finished | HookDone | TimerDue | Reloaded | SleepAsked
    | Unreachable | ServerExited | ShutdownBegun | GpuMemoryRead
)  # fmt: skip
