"""How llmux acts on a model's server: the backend-driver protocol, shell hooks, and the
choice between them per model.

The core asks for `wake`, `sleep` and `alive` by name; a backend driver carries them out. Shell
hooks (the operator's commands, run as supervised subprocesses) are the general driver; the
built-in one (builtin_driver.py) serves models with a `kind` or a `cmd`. A driver that
supervises a server process of its own reports the process's exit through `on_exit`, so that
the core learns of it at once instead of at the next alive check; shell hooks start no such
process, so they never report one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from llmux.config import ModelConfig
from llmux.core.states import HookName
from llmux.runtime.hook_registry import HookRegistry
from llmux.runtime.hooks import HookResult, run_hook


class BackendDriver(Protocol):
    async def wake(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult: ...

    async def sleep(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult: ...

    async def alive(self, backend: ModelConfig) -> HookResult: ...

    def on_exit(self, callback: Callable[[str, int], None]) -> None:
        """Call `callback(model, port)` when a server process the driver supervises exits."""


class ShellHooks:
    """The operator's `wake`, `sleep` and `alive` commands, run with `sh -c` (see hooks.py)."""

    def __init__(self, hook_dir: Path, registry: HookRegistry) -> None:
        self.hook_dir = hook_dir
        self.registry = registry

    async def wake(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        return await self._run(HookName.WAKE, backend, env)

    async def sleep(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        return await self._run(HookName.SLEEP, backend, env)

    async def alive(self, backend: ModelConfig) -> HookResult:
        return await self._run(HookName.ALIVE, backend, {})

    def on_exit(self, callback: Callable[[str, int], None]) -> None:
        """Shell hooks supervise no server process: nothing ever exits under them."""

    async def _run(
        self, hook: HookName, backend: ModelConfig, env: Mapping[str, str]
    ) -> HookResult:
        command, timeout = hook_command(backend, hook)
        return await run_hook(
            hook.value,
            command,
            model=backend.name,
            port=backend.port,
            cwd=self.hook_dir,
            timeout=timeout,
            extra_env=env,
            registry=self.registry,
        )


class PerModelDriver:
    """Each model's steps go to the driver its config names: built-in (`kind`, `cmd`) or hooks."""

    def __init__(self, hooks: BackendDriver, built_in: BackendDriver) -> None:
        self.hooks = hooks
        self.built_in = built_in

    def _of(self, backend: ModelConfig) -> BackendDriver:
        return self.built_in if backend.built_in else self.hooks

    async def wake(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        return await self._of(backend).wake(backend, env)

    async def sleep(self, backend: ModelConfig, env: Mapping[str, str]) -> HookResult:
        return await self._of(backend).sleep(backend, env)

    async def alive(self, backend: ModelConfig) -> HookResult:
        return await self._of(backend).alive(backend)

    def on_exit(self, callback: Callable[[str, int], None]) -> None:
        self.hooks.on_exit(callback)
        self.built_in.on_exit(callback)


def hook_command(backend: ModelConfig, hook: HookName) -> tuple[str, float]:
    """A model's command and timeout for `hook`."""
    command = getattr(backend, hook.value)
    assert command is not None, f"the core runs no {hook} hook for a model without one"
    return command, backend.timeout_of(hook)


async def run_on(
    driver: BackendDriver, hook: HookName, backend: ModelConfig, env: Mapping[str, str]
) -> HookResult:
    """Carry out one hook through a backend driver."""
    if hook is HookName.WAKE:
        return await driver.wake(backend, env)
    if hook is HookName.SLEEP:
        return await driver.sleep(backend, env)
    return await driver.alive(backend)
