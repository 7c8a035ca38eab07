"""A record, on disk, of the hooks running now, so that a crash cannot leave one behind.

Every hook runs in a process group of its own. Its group id and the start time of its leader go
into a small file while it runs. If llmux dies without cleaning up (SIGKILL, OOM killer, power
cut of the service), the next llmux reads the file at start-up and stops every recorded group
that still runs, before it asks the backends what state they are in.

The record decides what llmux signals, so it is read and written with care:
- it lives in the checked state folder (see state_dir) and is opened through its descriptor,
  with O_NOFOLLOW, and replaced atomically (a temporary file renamed over it);
- one record per config file, removed when llmux exits cleanly;
- a recorded group is signalled only if its id is above 1, is not llmux's own group, its leader
  still leads it, runs as llmux's user, and started at the recorded time (a recycled process id
  gets another start time). A record that says less is ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import trio

from llmux.observe.logs import log_event
from llmux.runtime.instance import config_digest
from llmux.runtime.state_dir import StateDir

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
log = logging.getLogger("llmux.hooks")

STOP_GRACE_SECS = 5.0
MAX_RECORD_BYTES = 64 * 1024


class HookRegistry:
    def __init__(self, state: StateDir, config_path: Path) -> None:
        self.state = state
        self.name = f"running-hooks-{config_digest(config_path)}.txt"
        self._temporary = f".{self.name}.{os.getpid()}.tmp"
        self._running: dict[int, str] = {}

    @property
    def path(self) -> Path:
        return self.state.path / self.name

    def add(self, pgid: int) -> None:
        self._running[pgid] = _start_time(pgid) or "?"
        self._write()

    def remove(self, pgid: int) -> None:
        if self._running.pop(pgid, None) is not None:
            self._write()

    def _write(self) -> None:
        text = "".join(f"{g} {t}\n" for g, t in self._running.items()).encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temporary, dir_fd=self.state.fd)
            fd = os.open(self._temporary, flags | os.O_EXCL, 0o600, dir_fd=self.state.fd)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
            os.replace(
                self._temporary, self.name, src_dir_fd=self.state.fd, dst_dir_fd=self.state.fd
            )
        except OSError as exc:
            log.warning("cannot record running hooks in %s: %s", self.path, exc)

    def discard(self) -> None:
        """Remove the record: nothing is left to stop at the next start."""
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.state.fd)

    def discard_if_idle(self) -> None:
        """At a clean exit: remove the record unless a hook somehow still runs."""
        if not self._running:
            self.discard()

    def _read(self) -> list[str]:
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.name, flags, dir_fd=self.state.fd)
        except OSError:
            return []
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                log.warning("ignoring %s: not a regular file of llmux's user", self.path)
                return []
            return os.read(fd, MAX_RECORD_BYTES).decode("ascii", errors="replace").splitlines()
        finally:
            os.close(fd)

    async def stop_survivors(self) -> list[int]:
        """Stop the hook groups a previous llmux left running; returns their group ids."""
        stopped = []
        for line in self._read():
            pgid_text, _, started = line.partition(" ")
            if not pgid_text.isdigit() or not started.isdigit():
                continue
            pgid = int(pgid_text)
            if not _may_signal(pgid, started):
                continue
            log_event(
                log, "hook_survivor_stopped", f"stopping hook process group {pgid} left by a "
                "previous llmux", logging.WARNING, pgid=pgid,
            )  # fmt: skip
            await stop_group(pgid, STOP_GRACE_SECS)
            stopped.append(pgid)
        self._running.clear()
        self.discard()
        return stopped


def _may_signal(pgid: int, started: str) -> bool:
    """Whether a recorded group is, beyond doubt, a hook of a previous llmux of ours."""
    if pgid <= 1 or pgid in (os.getpgrp(), os.getpid()):
        return False
    fields = _stat_fields(Path(f"/proc/{pgid}/stat"))
    if fields is None or fields[0] in ("Z", "X"):
        return False  # gone (or no /proc to tell: then never signal)
    leads_its_group = int(fields[2]) == pgid
    try:
        ours = os.stat(f"/proc/{pgid}").st_uid == os.geteuid()
    except OSError:
        return False
    return leads_its_group and ours and fields[19] == started


async def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM a process group, then SIGKILL whatever of it still runs after `grace`."""
    _signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(grace):
        while group_runs(pgid):
            await trio.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_runs(pgid: int) -> bool:
    """Whether any process of the group runs. Zombies do not count: a killed hook's children
    are reparented to init, which may take a while to reap them."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(True for _ in group_members(pgid))


def group_members(pgid: int) -> Iterator[int]:
    """The running processes of a group, as /proc lists them (none without /proc)."""
    for process_stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(process_stat)
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            yield int(process_stat.parent.name)


def group_resident_bytes(pgid: int) -> int | None:
    """The resident memory of a group's running processes together (None: none runs)."""
    total, found = 0, False
    for pid in group_members(pgid):
        fields = _stat_fields(Path(f"/proc/{pid}/stat"))
        if fields is not None:
            total += int(fields[21]) * PAGE_BYTES  # rss, in pages
            found = True
    return total if found else None


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
