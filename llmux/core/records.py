"""What the core keeps per model and per request, and the views of it that status reports read."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from llmux.config import ModelConfig
from llmux.core.costs import IDLE
from llmux.core.start_backoff import StartBackoff
from llmux.core.states import HookName, ModelState


@dataclass(eq=False)
class Request:
    rid: int
    model: str
    arrival: float
    granted_to: ModelRecord | None = None


@dataclass(eq=False)
class ModelRecord:
    """One model as the core knows it. A reload that changes a model's backend while it is
    awake makes a new record; the old one is retired (drained, put to sleep, forgotten)."""

    config: ModelConfig
    size: float
    state: ModelState = ModelState.ASLEEP
    queue: deque[Request] = field(default_factory=deque)
    in_flight: int = 0
    active_since: float | None = None
    idle_since: float = 0.0
    last_used: float | None = None
    last_alive_check: float = 0.0
    last_alive: bool | None = None  # the latest alive answer (None: none yet, or no hook)
    check_requested: bool = False  # the proxy could not connect: check it soon
    exited: bool = False  # its server exited (llmux started it): it serves nothing until woken
    server_running: bool = False  # a `cmd` server llmux started runs (asleep or awake)
    slept_level: int | None = None  # the depth it was put to sleep at (None: not known)
    sleeping_at: int | None = None  # the depth its running (or latest) sleep hook was asked for
    woken_from: int | None = None  # the depth its running (or latest) wake starts from
    host_gb: float | None = None  # host RAM its level-1 sleep held, as measured (weights)
    demand: Demand = field(default_factory=lambda: Demand())
    start_backoff: StartBackoff = field(default_factory=StartBackoff)  # its `cmd` would not start
    retiring: bool = False
    name: str = field(init=False)  # a plain attribute: policies' snapshots read it often

    def __post_init__(self) -> None:
        self.name = self.config.name

    @property
    def starts_cold(self) -> bool:
        """Its next wake starts its server: a `cmd` model whose server does not run. (A model
        woken by hooks never says: llmux cannot know what its wake hook starts.)"""
        return self.config.cmd is not None and not self.server_running

    def step(self, hook: HookName) -> str:
        """How a log line names its `hook`: a model llmux drives itself (a `kind`, a `cmd`)
        has no hook, only the step llmux carries out in its place."""
        if not self.config.built_in:
            return f"{hook} hook"
        return "alive check" if hook is HookName.ALIVE else str(hook)


DEMAND_WINDOW_SECS = 600.0  # how far back arrivals count (they fade with this time constant)


@dataclass
class Demand:
    """A model's recent request rate: arrivals counted with an exponential fade, so that a
    model asked for a minute ago counts more than one asked for an hour ago. It says how soon
    a model put to sleep is likely to be wanted again (what a deep sleep's slow wake costs)."""

    level: float = 0.0  # requests per second as of `at`
    at: float = 0.0

    def arrived(self, now: float) -> None:
        self.level = self.rate(now) + 1.0 / DEMAND_WINDOW_SECS
        self.at = now

    def rate(self, now: float) -> float:
        return self.level * math.exp(-max(0.0, now - self.at) / DEMAND_WINDOW_SECS)


@dataclass(frozen=True)
class ReloadSummary:
    added: list[str]
    removed: list[str]
    changed: list[str]
    policy_replaced: bool = False


@dataclass(frozen=True)
class SwitchView:
    """The switch in progress, for status reports."""

    source: str | None
    target: str
    evicting: tuple[str, ...]
    started: float

    @property
    def from_label(self) -> str:
        return self.source or IDLE
