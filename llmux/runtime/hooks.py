"""Run a lifecycle hook (`wake`, `sleep`, `alive`) as a supervised `sh -c` subprocess.

Why it is shaped like this:
- Each hook gets its own process group, so a timeout or a shutdown can stop everything it started
  (SIGTERM to the group, SIGKILL after a grace period): no hook process outlives its timeout.
- Output goes to temporary files, not pipes. A wake hook that starts a server with `&` leaves that
  server holding the hook's stdout/stderr; with a pipe llmux would wait for EOF forever (or kill the
  server with SIGPIPE once it stops reading). With a file, the hook is done when its shell exits.
- The environment is llmux's own minus `NOTIFY_SOCKET` (a hook must not talk to systemd for us),
  plus `LLMUX_*` variables. Nothing from a client request ever reaches a hook.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from llmux.core.states import HookName
from llmux.observe.logs import log_event
from llmux.runtime.hook_registry import HookRegistry, stop_group

log = logging.getLogger("llmux.hooks")

OUTPUT_TAIL_BYTES = 64 * 1024
KILL_GRACE_SECS = 5.0
EXIT_CANNOT_START = 127  # what a shell reports for a command it cannot run


@dataclass(frozen=True)
class HookResult:
    hook: HookName
    model: str
    exit_code: int | None  # None when it was killed for running past its timeout
    timed_out: bool
    duration: float
    stdout_tail: str
    stderr_tail: str
    cold_start: bool = False  # a wake that started the model's server (built-in `cmd` only)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe_failure(self, max_lines: int = 10) -> str:
        """A short human explanation: exit code or timeout, and the last lines of stderr."""
        if self.timed_out:
            head = f"{self.hook} hook for {self.model} timed out after {self.duration:.1f}s"
        else:
            head = f"{self.hook} hook for {self.model} exited with code {self.exit_code}"
        lines = self.stderr_tail.strip().splitlines()[-max_lines:]
        return head + (": " + " | ".join(lines) if lines else "")


def hook_environment(
    hook: HookName, model: str, port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a hook sees: llmux's own, without NOTIFY_SOCKET, with LLMUX_* added."""
    env = dict(os.environ)
    for systemd_only in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(systemd_only, None)
    if getattr(sys, "frozen", False):
        # The one-file binary points LD_LIBRARY_PATH at its bundled libraries and keeps the
        # user's value aside; hooks (curl, docker, ...) need the user's.
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
    env.update({"LLMUX_MODEL": model, "LLMUX_PORT": str(port), "LLMUX_HOOK": str(hook)})
    if extra:
        env.update(extra)
    return env


async def run_hook(
    hook: HookName | str,
    command: str,
    *,
    model: str,
    port: int,
    cwd: Path,
    timeout: float,
    extra_env: Mapping[str, str] | None = None,
    grace: float = KILL_GRACE_SECS,
    registry: HookRegistry | None = None,
) -> HookResult:
    """Run `command` with `sh -c` and return how it ended; never leaves the process group behind
    on timeout or cancellation."""
    hook = HookName(hook)
    env = hook_environment(hook, model, port, extra_env)
    # A script's own deadlines follow the config's timeout (a shorter one would cut it short).
    env["LLMUX_TIMEOUT_SECS"] = f"{timeout:g}"
    if registry is not None:
        env["LLMUX_STATE_DIR"] = str(registry.state.path)  # for pid files and markers
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = await trio.lowlevel.open_process(
                ["sh", "-c", command],
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        except OSError as exc:  # the hook folder vanished, no `sh`, out of processes...
            result = HookResult(
                hook=hook,
                model=model,
                exit_code=EXIT_CANNOT_START,
                timed_out=False,
                duration=time.monotonic() - started,
                stdout_tail="",
                stderr_tail=f"cannot start hook in {cwd}: {exc}",
            )
            log_result(result)
            return result
        timed_out = False
        if registry is not None:
            registry.add(process.pid)
        try:
            with trio.move_on_after(timeout) as scope:
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
                await _stop(process, grace)
        except BaseException:
            with trio.CancelScope(shield=True):
                await _stop(process, grace)
            raise
        finally:
            if registry is not None:
                registry.remove(process.pid)
        duration = time.monotonic() - started
        result = HookResult(
            hook=hook,
            model=model,
            exit_code=None if timed_out else process.returncode,
            timed_out=timed_out,
            duration=duration,
            stdout_tail=_tail(out),
            stderr_tail=_tail(err),
        )
    log_result(result)
    return result


async def _stop(process: trio.Process, grace: float) -> None:
    """Stop the hook's whole group (start_new_session made the shell its leader), and reap it."""
    await stop_group(process.pid, grace)
    await process.wait()


def _tail(stream: BinaryIO) -> str:
    """The last OUTPUT_TAIL_BYTES of a captured stream, decoded leniently."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - OUTPUT_TAIL_BYTES))
    return stream.read().decode("utf-8", errors="replace")


def log_result(result: HookResult) -> None:
    """One log line for how a hook (or a built-in driver's step) ended."""
    fields = {"model": result.model, "hook": result.hook, "duration": result.duration}
    if result.ok or (result.hook is HookName.ALIVE and not result.timed_out):
        # An alive hook's non-zero exit is an answer ("not serving"), not a failure.
        level = logging.DEBUG if result.hook is HookName.ALIVE else logging.INFO
        message = f"{result.hook} hook for {result.model} exited {result.exit_code}"
        log_event(log, "hook_completed", message, level, exit_code=result.exit_code, **fields)
    elif result.timed_out:
        log_event(log, "hook_timeout", result.describe_failure(), logging.WARNING, **fields)
    else:
        stderr_tail = "\n".join(result.stderr_tail.strip().splitlines()[-10:])
        log_event(
            log, "hook_failed", result.describe_failure(3), logging.WARNING,
            exit_code=result.exit_code, stderr_tail=stderr_tail, **fields,
        )  # fmt: skip
    for name, text in (("stdout", result.stdout_tail), ("stderr", result.stderr_tail)):
        if text.strip():
            log.debug("%s hook for %s %s:\n%s", result.hook, result.model, name, text.rstrip())
