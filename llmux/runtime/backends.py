"""How llmux acts on a model's server: the backend-driver protocol, and shell hooks.

The core asks for `wake`, `sleep` and `alive` by name; a backend driver carries them out. Shell
hooks (the operator's commands, run as supervised subprocesses) are the first driver. A driver
that supervises a server process of its own reports the process's exit through `on_exit`, so that
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

    async def stop(self, backend: ModelConfig) -> None:
        """Stop whatever the driver started for `backend` (at shutdown)."""

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """Call `callback(model)` when a server process the driver supervises exits."""


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

    async def stop(self, backend: ModelConfig) -> None:
        """Shell hooks leave nothing running of their own: a hook's group is stopped with it."""

    def on_exit(self, callback: Callable[[str], None]) -> None:
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


def hook_command(backend: ModelConfig, hook: HookName) -> tuple[str, float]:
    """A model's command and timeout for `hook`."""
    if hook is HookName.WAKE:
        return backend.wake, backend.wake_timeout_secs
    if hook is HookName.SLEEP:
        return backend.sleep, backend.sleep_timeout_secs
    assert backend.alive is not None, "the core runs no alive hook for a model without one"
    return backend.alive, backend.alive_timeout_secs


async def run_on(
    driver: BackendDriver, hook: HookName, backend: ModelConfig, env: Mapping[str, str]
) -> HookResult:
    """Carry out one hook through a backend driver."""
    if hook is HookName.WAKE:
        return await driver.wake(backend, env)
    if hook is HookName.SLEEP:
        return await driver.sleep(backend, env)
    return await driver.alive(backend)
