"""What the core keeps per model and per request, and the views of it that status reports read."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmux.config import ModelConfig
from llmux.core.costs import IDLE
from llmux.core.states import ModelState


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
    retiring: bool = False
    name: str = field(init=False)  # a plain attribute: policies' snapshots read it often

    def __post_init__(self) -> None:
        self.name = self.config.name

    @property
    def starts_cold(self) -> bool:
        """Its next wake starts its server: a `cmd` model whose server does not run. (A model
        woken by hooks never says: llmux cannot know what its wake hook starts.)"""
        return self.config.cmd is not None and not self.server_running


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
