"""A record, on disk, of the hooks running now, so that a crash cannot leave one behind.

Every hook runs in a process group of its own. Its group id and the start time of its leader go
into a small file while it runs. If llmux dies without cleaning up (SIGKILL, OOM killer, power
cut of the service), the next llmux reads the file at start-up and stops every recorded group
that still runs, before it asks the backends what state they are in. The start time guards
against a recycled process id: a group whose leader started at another time is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import tempfile
from pathlib import Path

import trio

from llmux.logs import log_event

log = logging.getLogger("llmux.hooks")

STOP_GRACE_SECS = 5.0


def default_state_dir() -> Path:
    """systemd's RuntimeDirectory when there is one, else a private temp folder."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0])
    return Path(tempfile.gettempdir()) / f"llmux-{os.getuid()}"


class HookRegistry:
    def __init__(self, state_dir: Path, config_path: Path) -> None:
        # One file per config, so that two llmux instances on one box keep apart.
        digest = hashlib.sha256(str(config_path).encode()).hexdigest()[:12]
        self.path = state_dir / f"running-hooks-{digest}.txt"
        self._running: dict[int, str] = {}

    def add(self, pgid: int) -> None:
        self._running[pgid] = _start_time(pgid) or "?"
        self._write()

    def remove(self, pgid: int) -> None:
        if self._running.pop(pgid, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text("".join(f"{g} {t}\n" for g, t in self._running.items()))
            temporary.replace(self.path)
        except OSError as exc:
            log.warning("cannot record running hooks in %s: %s", self.path, exc)

    async def stop_survivors(self) -> list[int]:
        """Stop the hook groups a previous llmux left running; returns their group ids."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        stopped = []
        for line in lines:
            pgid_text, _, started = line.partition(" ")
            if not pgid_text.isdigit():
                continue
            pgid = int(pgid_text)
            if not _group_runs(pgid) or _start_time(pgid) not in (started, None):
                continue  # gone, or the id now belongs to another process
            log_event(
                log, "hook_survivor_stopped", f"stopping hook process group {pgid} left by a "
                "previous llmux", logging.WARNING, pgid=pgid,
            )  # fmt: skip
            await stop_group(pgid, STOP_GRACE_SECS)
            stopped.append(pgid)
        self._running.clear()
        self._write()
        return stopped


async def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM a process group, then SIGKILL whatever of it still runs after `grace`."""
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(grace):
        while _group_runs(pgid):
            await trio.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_runs(pgid: int) -> bool:
    """Whether any process of the group runs. Zombies do not count: a killed hook's children
    are reparented to init, which may take a while to reap them."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields[19] if fields is not None else None


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
