"""Model servers llmux starts itself (a model's `cmd`), as supervised children of its nursery.

Why it is shaped like this:
- A server runs under `sh -c` in a process group of its own, so that stopping it stops all it
  spawned (vLLM's engine processes too): SIGTERM to the group, SIGKILL after a grace period.
- Its group goes into the same on-disk record as running hooks (hook_registry), so a llmux that
  restarts after a crash stops a server the crashed one left holding GPU memory.
- Its output is appended to `server-NAME.log` in the state folder (opened through the folder's
  descriptor, like every file there); a wake that fails quotes the log's last lines.
- A task waits on each server, so its exit is known at once and reported (`on_exit`), instead of
  at the model's next alive check. When llmux stops, every server it started is stopped.
- A server is what it was started with (its Launch: command line, port, environment), not its
  model's name: a reload may change any of them, and the server then running is another one.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from llmux.config import ModelConfig
from llmux.core.states import HookName
from llmux.observe.logs import log_event
from llmux.runtime.hook_registry import HookRegistry, group_resident_bytes, stop_group
from llmux.runtime.hooks import hook_environment
from llmux.runtime.state_dir import StateDir, model_file

log = logging.getLogger("llmux.servers")

STOP_GRACE_SECS = 10.0  # SIGTERM, then SIGKILL if the server still runs after this
LOG_TAIL_BYTES = 2048


def server_command(backend: ModelConfig) -> str:
    """The model's `cmd` with ${PORT} and ${MODEL} put in (plain text; `sh -c` runs the line)."""
    assert backend.cmd is not None
    return backend.cmd.replace("${PORT}", str(backend.port)).replace("${MODEL}", backend.name)


def server_environment(backend: ModelConfig) -> dict[str, str]:
    """What a server sees: llmux's environment (as a hook sees it), and the switch vLLM's
    sleep-mode API needs."""
    env = hook_environment(HookName.WAKE, backend.name, backend.port)
    env.pop("LLMUX_HOOK")
    if backend.kind == "vllm":
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def log_name(model: str) -> str:
    return model_file("server", model, "log")


@dataclass(frozen=True)
class Launch:
    """What a server was started with. A config that would start it otherwise (another command
    line, port or environment: a `kind` changes VLLM_SERVER_DEV_MODE) describes another server."""

    command: str
    port: int
    env: dict[str, str]

    def differences(self, other: Launch) -> list[str]:
        """What `other` starts otherwise, in words for a log line."""
        words = {"command": "command line", "port": "port", "env": "environment"}
        return [words[key] for key in words if getattr(self, key) != getattr(other, key)]


def launch_of(backend: ModelConfig) -> Launch:
    """What `backend` starts its server with, by the config in force."""
    return Launch(server_command(backend), backend.port, server_environment(backend))


@dataclass(eq=False)
class _Server:
    process: trio.Process
    launch: Launch
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)


class ServerProcesses:
    """The `cmd` servers that run now, one per model at most."""

    def __init__(self, state: StateDir, registry: HookRegistry, cwd: Path) -> None:
        self.state = state
        self.registry = registry
        self.cwd = cwd
        self._servers: dict[str, _Server] = {}
        self._exit_codes: dict[str, int | None] = {}
        self._nursery: trio.Nursery | None = None
        self._on_exit: list[Callable[[str, int], None]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the servers' watchers run in; when cancelled, every server stops."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def on_exit(self, callback: Callable[[str, int], None]) -> None:
        self._on_exit.append(callback)

    def running(self, model: str) -> bool:
        return model in self._servers

    def launch(self, model: str) -> Launch | None:
        """What the model's running server was started with (None: none runs, or it is being
        stopped: it runs as nothing a wake could use)."""
        server = self._servers.get(model)
        return server.launch if server is not None and not server.stopping else None

    def running_as(self, backend: ModelConfig) -> bool:
        """Whether the model's server runs as `backend` would start it (no `cmd`: none would)."""
        return backend.cmd is not None and self.launch(backend.name) == launch_of(backend)

    def resident_bytes(self, model: str) -> int | None:
        """The resident memory of the model's server and every process of its group (vLLM's
        engine runs in a child), or None if none runs or /proc cannot tell."""
        leader = self.pid(model)
        return None if leader is None else group_resident_bytes(leader)

    def pid(self, model: str) -> int | None:
        """The pid (and process group) of the model's running server, if one runs."""
        server = self._servers.get(model)
        return server.process.pid if server is not None else None

    def exit_code(self, model: str) -> int | None:
        """How the model's last server ended (None: killed by a signal, or never ran)."""
        return self._exit_codes.get(model)

    def log_path(self, model: str) -> Path:
        return self.state.path / log_name(model)

    async def start(self, backend: ModelConfig) -> None:
        """Start the model's server; it runs until `stop`, its own exit, or llmux's end."""
        assert self._nursery is not None, "ServerProcesses.run must be running"
        assert backend.name not in self._servers, "one server per model"
        launch = launch_of(backend)
        output = self.state.open_log(log_name(backend.name), f"llmux starts: {launch.command}")
        try:
            process = await trio.lowlevel.open_process(
                ["sh", "-c", launch.command],
                cwd=str(self.cwd),
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        finally:
            os.close(output)
        self.registry.add(process.pid)
        server = _Server(process, launch)
        self._servers[backend.name] = server
        self._exit_codes.pop(backend.name, None)
        log_event(
            log, "server_started", f"started the server of {backend.name} (pid {process.pid}, "
            f"port {backend.port}); its output goes to {self.log_path(backend.name)}",
            model=backend.name, pid=process.pid, port=backend.port,
        )  # fmt: skip
        self._nursery.start_soon(self._watch, backend.name, server)

    async def stop(self, model: str, grace: float = STOP_GRACE_SECS) -> None:
        """Stop the model's server (SIGTERM to its group, SIGKILL after `grace`) and wait."""
        server = self._servers.get(model)
        if server is not None:
            await self._stop(server, grace)

    def stop_soon(self, model: str) -> None:
        """Stop the model's server in the background: the one running now, not one a wake may
        start in its place meanwhile."""
        assert self._nursery is not None, "ServerProcesses.run must be running"
        server = self._servers.get(model)
        if server is not None:
            self._nursery.start_soon(self._stop, server, STOP_GRACE_SECS)

    def models(self) -> list[str]:
        """The models whose server runs now."""
        return list(self._servers)

    @staticmethod
    async def _stop(server: _Server, grace: float) -> None:
        server.stopping = True
        await stop_group(server.process.pid, grace)
        await server.exited.wait()

    def log_tail(self, model: str) -> str:
        """The last lines of the model's server log (for a failure's explanation)."""
        try:
            fd = os.open(log_name(model), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.state.fd)
        except OSError:
            return ""
        try:
            size = os.fstat(fd).st_size
            os.lseek(fd, max(0, size - LOG_TAIL_BYTES), os.SEEK_SET)
            return os.read(fd, LOG_TAIL_BYTES).decode("utf-8", errors="replace")
        finally:
            os.close(fd)

    async def _watch(self, model: str, server: _Server) -> None:
        process = server.process
        try:
            await process.wait()
            # The leader is gone; anything it spawned into its group goes with it.
            await stop_group(process.pid, STOP_GRACE_SECS)
        except BaseException:  # llmux is stopping: so does the server
            with trio.CancelScope(shield=True):
                await stop_group(process.pid, STOP_GRACE_SECS)
                await process.wait()
            log_event(log, "server_stopped", f"stopped the server of {model}", model=model)
            raise
        finally:
            self.registry.remove(process.pid)
            if self._servers.get(model) is server:
                del self._servers[model]
            self._exit_codes[model] = process.returncode
            server.exited.set()
        code = process.returncode
        if server.stopping:
            log_event(log, "server_stopped", f"stopped the server of {model}", model=model)
            return
        log_event(
            log, "server_exited", f"the server of {model} exited with code {code}; "
            f"see {self.log_path(model)}", logging.WARNING, model=model, exit_code=code,
        )  # fmt: skip
        for callback in self._on_exit:
            callback(model, server.launch.port)
