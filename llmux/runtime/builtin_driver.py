"""The built-in backend driver: wake, sleep and alive for models with a `kind` and/or a `cmd`,
carried out by llmux itself instead of by shell hooks.

Each step is bounded by the model's own timeout for that hook and ends as a HookResult, so the
core, the metrics and the logs treat it exactly as they treat a hook:
- wake: with `cmd`, a server that is not running is started (a first start is a wake: the core
  starts one at a time, within capacity) and waited for until its ready path answers 200, and
  stopped again if it exits or is not ready in time. A server that is up but asleep is woken
  through its engine's API; then the step waits until the engine says it serves. A server is
  what it was started with (server_processes.Launch): one started with another command line,
  port or environment than the config now says (a reload changed it while the model slept) is
  stopped first, and the configured one started.
- sleep: through the engine's API; a plain `cmd` server (no kind) is stopped, and so is any
  `cmd` server at its last sleep (LLMUX_RETIRING: a reload replaced or removed its config, so
  nothing will wake it as it is). A `cmd` server that is not running is asleep already.
- alive: serving now, by the engine's answer; a `cmd` server that is not running (as the config
  says) is not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

import httpx
import trio

from llmux.config import GIB, ModelConfig
from llmux.core.commands import RETIRING_ENV
from llmux.core.states import HookName
from llmux.observe.logs import log_event
from llmux.runtime.engines import POLL_SECS, Engine, EngineError, engines, not_up
from llmux.runtime.hooks import HookResult
from llmux.runtime.server_processes import STOP_GRACE_SECS, ServerProcesses, launch_of
from llmux.runtime.state_dir import StateDir

log = logging.getLogger("llmux.hooks")
STILL_WAITING_SECS = 30.0  # a wait for a server this long is said once in the log


@dataclass
class StepNotes:
    """What a step learned on its way, for its result: what it was doing last (a failure is
    named by it: "starting its server", "vLLM's wake_up"; there is no hook to name), whether
    it started the server, and what a level-1 sleep filled of host RAM (a vLLM server's
    resident memory grows by its weights as it copies them out of the GPU)."""

    doing: str
    cold_start: bool = False
    host_gb: float | None = None
    seen: str = ""  # while it waits for the server: why it is not ready yet, last time asked


Step = Callable[[httpx.AsyncClient, ModelConfig, StepNotes], Awaitable[bool]]


class BuiltinDriver:
    def __init__(self, state: StateDir, processes: ServerProcesses) -> None:
        self.processes = processes
        self.engines = engines(state)

    async def wake(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        return await self._step(HookName.WAKE, backend, self._wake)

    async def sleep(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        asked = env.get("LLMUX_SLEEP_LEVEL")
        if backend.kind == "vllm" and asked in ("1", "2"):
            backend = replace(backend, sleep_level=int(asked))  # the core chose it (auto)
        retiring = backend.cmd is not None and _retiring(env)
        return await self._step(HookName.SLEEP, backend, self._stop if retiring else self._sleep)

    async def alive(self, backend: ModelConfig) -> HookResult:
        return await self._step(HookName.ALIVE, backend, self._alive)

    def on_exit(self, callback: Callable[[str, int], None]) -> None:
        self.processes.on_exit(callback)

    def _engine(self, backend: ModelConfig) -> Engine:
        return self.engines[backend.kind]

    def _not_started(self, backend: ModelConfig) -> bool:
        """A `cmd` model whose server does not run as configured (not yet, or no longer)."""
        return backend.cmd is not None and not self.processes.running_as(backend)

    # ----- the steps: True when done, False for "not serving" (alive) -----

    async def _wake(
        self, client: httpx.AsyncClient, backend: ModelConfig, notes: StepNotes
    ) -> bool:
        engine = self._engine(backend)
        if self._not_started(backend) and self.processes.running(backend.name):
            notes.doing = "stopping the server a reload replaced"
            await self._replace(backend)  # a reload changed it while the model slept
        if self._not_started(backend):
            notes.doing = "starting its server"
            notes.cold_start = True
            engine.started(backend)
            await self.processes.start(backend)
            try:
                await self._until_ready(client, backend, notes)
            except BaseException:  # not ready in time, or it exited: leave nothing running
                with trio.CancelScope(shield=True):
                    await self.processes.stop(backend.name, grace=STOP_GRACE_SECS)
                raise
        else:
            notes.doing = "waiting for its server to be ready"
            await self._until_ready(client, backend, notes)  # still loading after a boot
        if not await engine.serving(client, backend):
            notes.doing = engine.wake_step
            await engine.wake(client, backend)
            await _until(lambda: engine.serving(client, backend))
        return True

    async def _sleep(
        self, client: httpx.AsyncClient, backend: ModelConfig, notes: StepNotes
    ) -> bool:
        if self._not_started(backend):
            return True  # nothing runs, nothing holds memory
        if backend.kind is None:
            return await self._stop(client, backend, notes)
        engine = self._engine(backend)
        notes.doing = engine.sleep_step
        measured = backend.kind == "vllm" and backend.sleep_level == 1 and backend.cmd is not None
        before = self.processes.resident_bytes(backend.name) if measured else None
        if not await engine.asleep(client, backend):
            await engine.sleep(client, backend)
            await _until(lambda: engine.asleep(client, backend))
        after = self.processes.resident_bytes(backend.name) if measured else None
        if before is not None and after is not None:
            notes.host_gb = max(0, after - before) / GIB
        return True

    async def _stop(
        self, client: httpx.AsyncClient, backend: ModelConfig, notes: StepNotes
    ) -> bool:
        """Stop the model's server if it runs as `backend` says (another one is not ours to
        stop here: it may be the one a reload's new config started)."""
        notes.doing = "stopping its server"
        if not self._not_started(backend):
            # SIGKILL comes early enough for the stop to end within the sleep's own timeout.
            grace = min(STOP_GRACE_SECS, backend.sleep_timeout_secs / 2)
            await self.processes.stop(backend.name, grace=grace)
        return True

    async def _replace(self, backend: ModelConfig) -> None:
        """Stop the server a config no longer in force started, before the configured one
        starts (on the same port, maybe; and never two at once: the old one holds memory)."""
        old = self.processes.launch(backend.name)
        if old is not None:  # else it is being stopped already
            changed = old.differences(launch_of(backend))
            log_event(
                log, "server_replaced", f"the server of {backend.name} (pid "
                f"{self.processes.pid(backend.name)}) was started with another "
                f"{' and '.join(changed)} than the config now says: stopping it to start the "
                "new one", model=backend.name, changed=changed,
            )  # fmt: skip
        grace = min(STOP_GRACE_SECS, backend.wake_timeout_secs / 2)
        await self.processes.stop(backend.name, grace=grace)

    async def _alive(
        self, client: httpx.AsyncClient, backend: ModelConfig, notes: StepNotes
    ) -> bool:
        if self._not_started(backend):
            return False
        return await self._engine(backend).serving(client, backend)

    async def _until_ready(
        self, client: httpx.AsyncClient, backend: ModelConfig, notes: StepNotes
    ) -> None:
        """Until the server's ready path answers 200; an exit of a `cmd` server ends it. A
        wait that goes on is said once in the log, with what is seen (nothing listening is
        not the same as a server still loading)."""
        tell_at, told = trio.current_time() + STILL_WAITING_SECS, False
        while True:
            if self._not_started(backend):
                code = self.processes.exit_code(backend.name)
                tail = _this_start(self.processes.log_tail(backend.name))[-5:]
                raise EngineError(
                    f"the server exited with code {code} before it was ready "
                    f"(log: {self.processes.log_path(backend.name)})"
                    + ("\n" + "\n".join(tail) if tail else "")
                )
            notes.seen = await not_up(client, backend, backend.ready_path) or ""
            if not notes.seen:
                return
            if not told and trio.current_time() >= tell_at:
                told = True
                log_event(
                    log, "still_waiting", f"{backend.name}: still waiting for its server to be "
                    f"ready after {STILL_WAITING_SECS:g}s: {notes.seen}", logging.WARNING,
                    model=backend.name, seen=notes.seen,
                )  # fmt: skip
            await trio.sleep(POLL_SECS)

    # ----- one step, as a hook result -----

    async def _step(self, hook: HookName, backend: ModelConfig, step: Step) -> HookResult:
        timeout = backend.timeout_of(hook)
        started = time.monotonic()
        exit_code: int | None = 1
        problem = ""
        timed_out = False
        notes = StepNotes(doing=_FIRST_STEP[hook])
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                with trio.fail_after(timeout):
                    exit_code = 0 if await step(client, backend, notes) else 1
        except trio.TooSlowError:
            timed_out, exit_code = True, None
            problem = f"{self._describe(backend)}: no answer within {timeout:g}s"
            problem += f" (last seen: {notes.seen})" if notes.seen else ""
        except (EngineError, OSError) as exc:
            problem = f"{self._describe(backend)}: {exc}"
        result = HookResult(
            hook=hook, model=backend.name, exit_code=exit_code, timed_out=timed_out,
            duration=time.monotonic() - started, stdout_tail="", stderr_tail=problem,
            cold_start=notes.cold_start, host_gb=notes.host_gb, step=notes.doing,
        )  # fmt: skip
        _log(result, self._describe(backend))
        return result

    @staticmethod
    def _describe(backend: ModelConfig) -> str:
        what = backend.kind or "server"
        return f"{what} on port {backend.port}"


# What a step is doing before it knows more (see StepNotes).
_FIRST_STEP = {
    HookName.WAKE: "waking it",
    HookName.SLEEP: "putting it to sleep",
    HookName.ALIVE: "asking whether it serves",
}


def _this_start(log_tail: str) -> list[str]:
    """The lines the latest start wrote: after its `--- ... llmux starts: ...` header (the log
    keeps every start's output, and may be shared with another llmux's runs of that name)."""
    lines = log_tail.strip().splitlines()
    starts = [
        i for i, line in enumerate(lines) if line.startswith("--- ") and "llmux starts" in line
    ]
    return lines[starts[-1] + 1 :] if starts else lines


def _retiring(env: Mapping[str, str]) -> bool:
    """The last sleep of a record a reload replaced or removed (see core/group.py)."""
    return all(env.get(key) == value for key, value in RETIRING_ENV.items())


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` until it is true; the step's deadline bounds the wait."""
    while not await check():
        await trio.sleep(POLL_SECS)


def _log(result: HookResult, where: str) -> None:
    """A line per step, with the event names hooks use (hook_completed, hook_failed, ...)."""
    what = f"{result.hook} of {result.model} ({where})"
    fields = {"model": result.model, "hook": result.hook, "duration": result.duration}
    if result.hook is HookName.ALIVE and not result.timed_out:
        answer = "serving" if result.ok else "not serving"
        log_event(log, "hook_completed", f"{what}: {answer}", logging.DEBUG, **fields)
    elif result.ok:
        message = f"{what}: done in {result.duration:.2f}s"
        log_event(log, "hook_completed", message, exit_code=0, **fields)
    else:
        event = "hook_timeout" if result.timed_out else "hook_failed"
        message = f"{result.hook} of {result.model}: {result.describe_failure()}"
        log_event(log, event, message, logging.WARNING, **fields)
