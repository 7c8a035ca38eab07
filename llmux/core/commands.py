"""What the core asks its executor to do. The executor carries each out and reports back through
events (a hook's end, a timer that is due); the core never waits for anything itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmux.config import ModelConfig
from llmux.core.states import HookName
from llmux.errors import LlmuxError


@dataclass(frozen=True)
class Grant:
    """Request `rid` may go to `backend` now (its config as it is at this moment)."""

    rid: int
    backend: ModelConfig
    waited: float


@dataclass(frozen=True)
class Refuse:
    """Request `rid` ends with `error`: refused at once, or failed while it waited."""

    rid: int
    error: LlmuxError


# In a RunHook's `env`: the sleep of a record a reload replaced or removed (or that is held
# unknown), its last. A server llmux started is stopped then, not put to sleep (builtin_driver.py).
RETIRING_ENV = {"LLMUX_RETIRING": "1"}


@dataclass(frozen=True)
class RunHook:
    """Run `hook` of `model` with `backend`'s commands and timeouts; answer `HookDone(job)`.
    `level` is the sleep depth: the one to sleep at (a sleep), or the one the model slept at
    (a wake: its wake path depends on it); None for an alive check."""

    job: int
    model: str
    hook: HookName
    backend: ModelConfig
    env: dict[str, str] = field(default_factory=dict)
    level: int | None = None


@dataclass(frozen=True)
class CancelHook:
    """Stop the step running as `job` (a cold start nobody waits for any more); it ends with a
    `HookDone(job)` whose outcome says `cancelled` (or ok, if it was done already)."""

    job: int


@dataclass(frozen=True)
class ReadGpuMemory:
    """Read the free memory of `gpus` (NVML) now; answer `GpuMemoryRead(job)`."""

    job: int
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class SetTimer:
    """Send `TimerDue(name)` at `at` (replacing a timer of the same name)."""

    name: str
    at: float


@dataclass(frozen=True)
class ClearTimer:
    name: str


@dataclass(frozen=True)
class Reply:
    """The admin request `reply` is done: with `error`, or fine."""

    reply: int
    error: LlmuxError | None = None


@dataclass(frozen=True)
class Observe:
    """Something worth a metric or a log line: `name` is the log event, `fields` its fields."""

    name: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    level: str = "info"


Command = (
    Grant | Refuse | RunHook | CancelHook | ReadGpuMemory | SetTimer | ClearTimer | Reply | Observe
)
