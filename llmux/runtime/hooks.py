"""Run a lifecycle hook (`wake`, `sleep`, `alive`) as a supervised `sh -c` subprocess.

Why it is shaped like this:
- Each hook gets its own process group, so a timeout or a shutdown can stop everything it started
  (SIGTERM to the group, SIGKILL after a grace period): no hook process outlives its timeout.
- Output goes to files, not pipes. A wake hook that starts a server with `&` leaves that server
  holding the hook's stdout/stderr; with a pipe llmux would wait for EOF forever (or kill the
  server with SIGPIPE once it stops reading). With a file, the hook is done when its shell exits.
  The files are the model's hook logs in the state folder (`hook-NAME.out`, `hook-NAME.err`),
  appended to by each run, of which llmux reads its own part: such a server goes on writing
  where its output can be read (and is rotated), not into a deleted temporary file that grows
  unseen until the server exits. A warning names the processes a hook left writing there.
- The environment is llmux's own minus `NOTIFY_SOCKET` (a hook must not talk to systemd for us),
  plus `LLMUX_*` variables. Nothing from a client request ever reaches a hook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from llmux.core.states import HookName
from llmux.observe.logs import log_event
from llmux.runtime.hook_registry import HookRegistry, group_members, stop_group
from llmux.runtime.state_dir import StateDir, model_file

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
    host_gb: float | None = None  # a level-1 sleep: the host RAM it filled, if measured
    # What llmux itself was doing in the hook's place (a built-in driver's step, e.g. "starting
    # its server"): there is no hook to name then, nor an exit code of its own.
    step: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe_failure(self, max_lines: int = 10) -> str:
        """A short human explanation: exit code or timeout, and the last lines of stderr."""
        if self.step is not None:
            head = f"{self.step} failed"
        elif self.timed_out:
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
    state = registry.state if registry is not None else None
    with _captured(state, model, hook, command) as (out, err):
        try:
            process = await trio.lowlevel.open_process(
                ["sh", "-c", command],
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out.fd,
                stderr=err.fd,
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
            stdout_tail=out.tail(),
            stderr_tail=err.tail(),
        )
        if state is not None and not timed_out:
            _warn_if_output_held(hook, model, process.pid, state, (out, err))
    log_result(result)
    return result


async def _stop(process: trio.Process, grace: float) -> None:
    """Stop the hook's whole group (start_new_session made the shell its leader), and reap it."""
    await stop_group(process.pid, grace)
    await process.wait()


@dataclass(frozen=True)
class _Capture:
    """One output stream of one hook run: a file, and where this run's part of it begins."""

    fd: int
    start: int

    def tail(self) -> str:
        """The last OUTPUT_TAIL_BYTES of this run's part, decoded leniently."""
        end = os.fstat(self.fd).st_size
        begin = max(self.start, end - OUTPUT_TAIL_BYTES)
        return os.pread(self.fd, end - begin, begin).decode("utf-8", errors="replace")


@contextmanager
def _captured(
    state: StateDir | None, model: str, hook: HookName, command: str
) -> Iterator[tuple[_Capture, _Capture]]:
    """Where the hook's stdout and stderr go: the model's hook logs in the state folder, or
    temporary files when there is none (a hook run outside llmux's server)."""
    fds: list[int] = []
    try:
        for stream in ("out", "err"):
            if state is None:
                fd, path = tempfile.mkstemp()
                os.unlink(path)
            else:
                fd = state.open_log(model_file("hook", model, stream), f"{hook} hook: {command}")
            fds.append(fd)
        out, err = (_Capture(fd, os.fstat(fd).st_size) for fd in fds)
        yield out, err
    finally:
        for fd in fds:
            os.close(fd)


def _warn_if_output_held(
    hook: HookName, model: str, pgid: int, state: StateDir, captures: tuple[_Capture, ...]
) -> None:
    """Say so when a process the hook started in the background (still in its group) writes
    into its output files: a server whose output should have been redirected."""
    try:
        os.killpg(pgid, 0)  # one system call, where reading /proc costs milliseconds per switch
    except ProcessLookupError:
        return  # the usual case: nothing the hook started is still running
    except PermissionError:
        pass  # someone's processes are in that group: look at them
    files = {(info.st_dev, info.st_ino) for info in (os.fstat(c.fd) for c in captures)}
    holders = [pid for pid in group_members(pgid) if files & _open_files(pid)]
    if holders:
        logs = " and ".join(str(state.path / model_file("hook", model, s)) for s in ("out", "err"))
        log_event(
            log, "hook_output_held", f"{hook} hook for {model} left processes running "
            f"({', '.join(map(str, holders))}) that write into {logs}: redirect their output",
            logging.WARNING, model=model, hook=hook, pids=holders,
        )  # fmt: skip


def _open_files(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of what a process has open, as far as /proc lets us see."""
    found: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                info = os.stat(entry.path)
                found.add((info.st_dev, info.st_ino))
    return found


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
