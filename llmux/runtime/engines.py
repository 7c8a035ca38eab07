"""The sleep/wake APIs of the engines llmux drives itself (a model's `kind`).

Each engine answers three questions the way its server can: wake it, put it to sleep, and is it
serving now (awake and taking requests; a process that is up but asleep is not). What each
server offers, and why the answers are asked as they are:
- vLLM (sleep mode, `VLLM_SERVER_DEV_MODE=1`): `POST /sleep?level=N` (level in the query: a
  JSON body is ignored), `POST /wake_up`, `GET /is_sleeping`. `/health` is 200 while asleep, so
  serving means `/is_sleeping` says false. After a level-2 sleep the weights are gone: wake the
  weights, `collective_rpc` `reload_weights`, then wake the KV cache (without the reload it
  answers from garbage weights: vLLM issue #29341). `/is_sleeping` does not say at which level,
  and a reload may change `sleep_level` while a model sleeps, so llmux records the level it put
  each server to sleep at, in its state folder (a restarted llmux knows it too), and a wake
  follows the record. With no record (a server someone else put to sleep), the wake takes the
  level-2 way: `reload_weights` after a level-1 sleep only loads the same weights again.
- SGLang (`--enable-memory-saver`): `POST /release_memory_occupation` and
  `/resume_memory_occupation`. It cannot tell whether its memory is released, so llmux keeps a
  marker in its state folder (the same one the example hooks use) while it is.
- Ollama: a generate request without a prompt loads a model (`keep_alive: -1`: Ollama's own
  timer never unloads it), `keep_alive: 0` unloads it; `/api/ps` lists what is loaded, with
  its tag (`llama3.1` is listed as `llama3.1:latest`).
- A plain `cmd` server (no kind): serving means its health path answers 200; it sleeps by
  being stopped, which the driver does, not the engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol

import httpx

from llmux.config import ModelConfig
from llmux.runtime.state_dir import StateDir

POLL_SECS = 0.2
ASK_TIMEOUT_SECS = 5.0  # one status question; the step's own deadline bounds the whole


class EngineError(Exception):
    """The server refused or failed a step; the message says which and what it answered."""


class Engine(Protocol):
    # How its wake and its sleep are named in errors and logs: there is no hook to name.
    wake_step: str
    sleep_step: str

    async def wake(self, client: httpx.AsyncClient, backend: ModelConfig) -> None: ...

    async def sleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> None: ...

    async def serving(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool: ...

    async def asleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        """Surely asleep (holding no GPU memory); False when it serves or cannot tell."""

    def started(self, backend: ModelConfig) -> None:
        """A fresh server process was started for `backend` (it holds its memory)."""


async def call(
    client: httpx.AsyncClient, backend: ModelConfig, method: str, path: str, **options: Any
) -> httpx.Response:
    """One control call; anything but a 2xx answer is an EngineError naming the call."""
    headers = {}
    if backend.backend_api_key is not None:
        headers["authorization"] = f"Bearer {backend.backend_api_key}"
    try:
        response = await client.request(
            method, backend.base_url + path, headers=headers, timeout=None, **options
        )
    except httpx.HTTPError as exc:
        raise EngineError(f"{method} {path} failed: {exc!r}") from None
    if not response.is_success:
        text = response.text[:300].strip()
        raise EngineError(f"{method} {path} answered {response.status_code}: {text}")
    return response


async def up(client: httpx.AsyncClient, backend: ModelConfig, path: str) -> bool:
    """Whether `path` answers 200, whatever its body (a health path may answer plain text)."""
    return await not_up(client, backend, path) is None


async def not_up(client: httpx.AsyncClient, backend: ModelConfig, path: str) -> str | None:
    """Why `path` does not answer 200 ("nothing listens on port 8001", "GET /health answered
    503"), or None when it does: what a wait that ends in a timeout can say it saw."""
    try:
        response = await client.get(backend.base_url + path, timeout=ASK_TIMEOUT_SECS)
    except httpx.ConnectError:
        return f"nothing listens on port {backend.port} (connection refused)"
    except httpx.TimeoutException:
        return f"GET {path} got no answer within {ASK_TIMEOUT_SECS:g}s"
    except httpx.HTTPError as exc:
        return f"GET {path} failed: {type(exc).__name__}"
    if response.status_code != 200:
        return f"GET {path} answered {response.status_code}"
    return None


async def answers(client: httpx.AsyncClient, backend: ModelConfig, path: str) -> Any:
    """The JSON a status path answers, or None when the server is down or says no."""
    try:
        response = await client.get(backend.base_url + path, timeout=ASK_TIMEOUT_SECS)
        if response.status_code != 200:
            return None
        return response.json() if response.content else {}
    except (httpx.HTTPError, ValueError):
        return None


class PlainServer:
    """A `cmd` server without a kind: up means serving."""

    wake_step = "waiting for its server to serve"
    sleep_step = "stopping its server"

    async def wake(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        """Started and ready is awake: nothing more to ask."""

    async def sleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        raise AssertionError("a plain server sleeps by being stopped")

    async def serving(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return await up(client, backend, backend.ready_path)

    async def asleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return False  # up means awake

    def started(self, backend: ModelConfig) -> None:
        """Nothing to forget."""


class Vllm:
    wake_step = "vLLM's wake_up"
    sleep_step = "vLLM's sleep"

    def __init__(self, state: StateDir) -> None:
        self.state = state

    def _level_file(self, backend: ModelConfig) -> str:
        return f"vllm-{backend.port}.sleep-level"

    def _slept_at(self, backend: ModelConfig) -> int | None:
        """The level llmux put the server to sleep at, if it did (and knows it still)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._level_file(backend), flags, dir_fd=self.state.fd)
        except OSError:
            return None  # none (or not a file of ours): unknown
        try:
            text = os.read(fd, 16).decode("ascii", errors="replace").strip()
        finally:
            os.close(fd)
        return int(text) if text in ("1", "2") else None

    async def wake(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        if self._slept_at(backend) == 1:
            await call(client, backend, "POST", "/wake_up")
        else:  # level 2, or unknown: the weights may be gone
            await call(client, backend, "POST", "/wake_up", params={"tags": "weights"})
            await call(
                client, backend, "POST", "/collective_rpc", json={"method": "reload_weights"}
            )
            await call(client, backend, "POST", "/wake_up", params={"tags": "kv_cache"})
        self.started(backend)

    async def sleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        # Recorded before the weights may go, and kept if the call fails: it may have slept.
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._level_file(backend), flags, 0o600, dir_fd=self.state.fd)
        try:
            os.write(fd, f"{backend.sleep_level}\n".encode())
        finally:
            os.close(fd)
        await call(client, backend, "POST", "/sleep", params={"level": backend.sleep_level})

    async def serving(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return await self._is_sleeping(client, backend) is False

    async def asleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return await self._is_sleeping(client, backend) is True

    @staticmethod
    async def _is_sleeping(client: httpx.AsyncClient, backend: ModelConfig) -> bool | None:
        answer = await answers(client, backend, "/is_sleeping")
        return answer.get("is_sleeping") if isinstance(answer, dict) else None

    def started(self, backend: ModelConfig) -> None:
        """Awake, with its weights: forget the level it slept at."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._level_file(backend), dir_fd=self.state.fd)


class Sglang:
    wake_step = "SGLang's resume_memory_occupation"
    sleep_step = "SGLang's release_memory_occupation"

    def __init__(self, state: StateDir) -> None:
        self.state = state

    def _marker(self, backend: ModelConfig) -> str:
        return f"sglang-{backend.port}.released"

    def _released(self, backend: ModelConfig) -> bool:
        try:
            os.stat(self._marker(backend), dir_fd=self.state.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    async def wake(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        await call(client, backend, "POST", "/resume_memory_occupation", json={})
        self.started(backend)

    async def sleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        # The marker is made before the memory goes: if it cannot be, the model keeps serving.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(self._marker(backend), flags, 0o600, dir_fd=self.state.fd))
        try:
            await call(client, backend, "POST", "/release_memory_occupation", json={})
        except BaseException:
            self.started(backend)  # refused: it still holds its memory
            raise

    async def serving(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        if self._released(backend):
            return False
        return await up(client, backend, backend.ready_path)

    async def asleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return self._released(backend)

    def started(self, backend: ModelConfig) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker(backend), dir_fd=self.state.fd)


class Ollama:
    wake_step = "Ollama's load of the model"
    sleep_step = "Ollama's unload of the model"

    @staticmethod
    def name(backend: ModelConfig) -> str:
        return backend.upstream_model or backend.name

    async def wake(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        request = {"model": self.name(backend), "keep_alive": -1}
        await call(client, backend, "POST", "/api/generate", json=request)

    async def sleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> None:
        request = {"model": self.name(backend), "keep_alive": 0}
        await call(client, backend, "POST", "/api/generate", json=request)

    async def serving(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return await self._loaded(client, backend) is True

    async def asleep(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool:
        return await self._loaded(client, backend) is False

    async def _loaded(self, client: httpx.AsyncClient, backend: ModelConfig) -> bool | None:
        """Whether /api/ps lists the model (None: no usable answer)."""
        answer = await answers(client, backend, "/api/ps")
        if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
            return None
        wanted = self.name(backend)
        names = {wanted} if ":" in wanted else {wanted, f"{wanted}:latest"}
        return any(
            isinstance(m, dict) and (m.get("name") in names or m.get("model") in names)
            for m in answer["models"]
        )

    def started(self, backend: ModelConfig) -> None:
        """Ollama is never started by llmux."""


def engines(state: StateDir) -> dict[str | None, Engine]:
    """The engine of each kind (None: a plain `cmd` server)."""
    return {
        None: PlainServer(),
        "vllm": Vllm(state),
        "sglang": Sglang(state),
        "ollama": Ollama(),
    }
