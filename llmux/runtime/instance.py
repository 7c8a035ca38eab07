"""One llmux per config and per port: two locks, then the listening socket, before any hook runs.

A second `llmux serve` started by mistake must harm nothing: it must not stop "survivor" hooks
that are in fact the first instance's running hooks, nor ask backends what is awake in the middle
of the first one's switch. So start-up takes, in this order:

1. an exclusive lock on `config-<digest>.lock` (one per config file) in the state folder,
2. an exclusive lock on `port-<port>.lock` (one per port; none for an ephemeral port 0),
3. the listening socket, bound now and handed to the HTTP server later,

and only then stops survivors and reconciles. A failure at any step is an `InstanceError` with
one line for the operator. The lock files are never removed: a lock held on a file that another
instance unlinks and re-creates would let two instances each hold "the" lock. `flock` locks die
with their process, so a crashed llmux never blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmux.runtime.state_dir import StateDir

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")  # the kernel caps every listen backlog at it


class InstanceError(Exception):
    """Another instance holds a lock, or the port cannot be bound; one line says which."""


def config_digest(config_path: Path) -> str:
    """A short name for a config file, the same for every instance started on it."""
    return hashlib.sha256(str(config_path).encode()).hexdigest()[:12]


@dataclass
class InstanceGuard:
    """The locks held and the socket bound for this instance; `release()` gives them back."""

    locks: list[int] = field(default_factory=list)
    listener: socket.socket | None = None

    def release(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def claim_instance(
    state: StateDir, config_path: Path, host: str, port: int, backlog: int
) -> InstanceGuard:
    """Take both locks and bind the listener, or raise InstanceError having kept nothing."""
    guard = InstanceGuard()
    try:
        guard.locks.append(
            _lock(state, f"config-{config_digest(config_path)}.lock",
                  lambda pid: f"another llmux (pid {pid}) already runs on {config_path}")
        )  # fmt: skip
        if port != 0:
            guard.locks.append(
                _lock(state, f"port-{port}.lock",
                      lambda pid: f"port {port} is in use by another llmux (pid {pid})")
            )  # fmt: skip
        guard.listener = bind_listener(host, port, backlog)
    except BaseException:
        guard.release()
        raise
    return guard


def _lock(state: StateDir, name: str, held_by: Callable[[int], str]) -> int:
    """Lock `name` in the state folder and write our pid in it; the open descriptor holds the
    lock. Raise InstanceError(held_by(pid)) when another process holds it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=state.fd)
    except OSError as exc:
        raise InstanceError(f"cannot open {state.path / name}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise InstanceError(held_by(holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    return 0


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: an ephemeral one) that queues `backlog`
    connections before they are accepted (hypercorn's 100 overflows under a burst of new
    streams: the kernel drops the SYNs, and clients wait 1-3 s to retry)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InstanceError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE and port:
            raise InstanceError(_port_in_use(host, port)) from None
        raise InstanceError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _port_in_use(host: str, port: int) -> str:
    """Bound by someone else, and not by an llmux of this state folder: its port lock, taken
    first, would have named it. Only the system knows who."""
    return (
        f"cannot listen on {host}:{port}: the port is in use by another program; "
        f"`ss -ltnp 'sport = :{port}'` shows which, or listen on another one with --port"
    )


@dataclass(frozen=True)
class BacklogCap:
    """What the kernel lets a listen backlog be, and whether llmux raised it."""

    before: int | None  # None: unknown (not Linux, or unreadable)
    after: int | None

    def limits(self, backlog: int) -> bool:
        return self.after is not None and self.after < backlog


def raise_backlog_cap(backlog: int, path: Path = SOMAXCONN) -> BacklogCap:
    """Raise the kernel's cap on listen backlogs to `backlog` when it is lower and llmux may
    (as root); it is only ever raised. Called before the socket listens, which reads it."""
    try:
        before = int(path.read_text().strip())
    except (OSError, ValueError):
        return BacklogCap(None, None)
    if before >= backlog:
        return BacklogCap(before, before)
    try:
        path.write_text(f"{backlog}\n")
    except OSError:
        return BacklogCap(before, before)
    return BacklogCap(before, backlog)
