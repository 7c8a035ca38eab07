"""The state folder: where llmux keeps its instance locks, its record of running hooks, and the
logs of the servers it starts and of the hooks it runs.

Why it is checked the way it is: llmux signals the process groups its record lists (to stop the
hooks a crashed llmux left behind), so whoever can write that record can make llmux kill. The
folder must therefore be llmux's own: owned by its user, not writable by group or others, not a
symlink, and opened once as a directory descriptor that every later file operation goes through,
so that swapping the path after the check changes nothing. Example hooks keep pid files here too,
so the folder stays when llmux exits; only llmux's own record is removed.

Where it is, first match wins: `server.state_dir` (relative to the config file), systemd's
`$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR/llmux`, and a per-user `llmux-<uid>` in the temp folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOG_ROTATE_BYTES = 64 * 1024 * 1024  # a log past this is moved to NAME.1 when next opened


class StateDirError(Exception):
    """The state folder cannot be trusted or made; the message says why and what to do."""


@dataclass(frozen=True)
class StateDir:
    path: Path
    fd: int  # an O_DIRECTORY descriptor: name files relative to it (dir_fd=), never by path

    def close(self) -> None:
        os.close(self.fd)

    def open_log(self, name: str, header: str) -> int:
        """A log file, for appending (and reading), its `header` line written: moved aside
        first when it has grown past LOG_ROTATE_BYTES."""
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=self.fd)
        if os.fstat(fd).st_size > LOG_ROTATE_BYTES:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.replace(name, name + ".1", src_dir_fd=self.fd, dst_dir_fd=self.fd)
            fd = os.open(name, flags, 0o600, dir_fd=self.fd)
        os.write(fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n".encode())
        return fd


def model_file(what: str, model: str, ext: str) -> str:
    """A file name for something of a model (`server-NAME.log`); a name with `/` or odd
    characters gets a digest, so that two models never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
    if safe != model or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"
    return f"{what}-{safe}.{ext}"


def state_dir_path(configured: str | None, config_folder: Path) -> Path:
    """Where the state folder is, by the rules above (nothing is created or checked here)."""
    if configured:
        return config_folder / configured
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:  # made absolute: systemd's is, but one set by hand may not be
        return Path(os.path.abspath(runtime.split(":")[0]))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "llmux"
    return Path(tempfile.gettempdir()) / f"llmux-{os.getuid()}"


def open_state_dir(path: Path) -> StateDir:
    """Create the folder (0700) if it is missing, then open it and check that it is ours."""
    try:
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        os.mkdir(path, mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create the state folder {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        linked = exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink()
        why = "it is a symlink (give the real folder)" if linked else exc.strerror
        raise StateDirError(f"cannot use the state folder {path}: {why}") from None
    try:
        _check_ownership(path, os.fstat(fd))
    except StateDirError:
        os.close(fd)
        raise
    return StateDir(path, fd)


def _check_ownership(path: Path, info: os.stat_result) -> None:
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"the state folder {path} belongs to uid {info.st_uid}, not to llmux's user "
            f"({os.geteuid()}): remove it, or set server.state_dir to a folder of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        raise StateDirError(
            f"the state folder {path} is writable by others (mode {mode:o}): "
            f"run `chmod go-w {path}`, or set server.state_dir to a private folder"
        )
