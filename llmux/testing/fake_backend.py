"""A fake OpenAI-compatible model server with sleep/wake control, for the demo and the tests.

It behaves like a model server that shares a GPU: it can be put to sleep and woken (with simulated
delays), answers chat/completions/embeddings (streaming SSE tokens at a steady rate), and refuses
any request that arrives while it is not awake, counting it. Its `/fake/state` counters let tests
prove that llmux never sent a request to a sleeping model and never put a busy one to sleep.

Control endpoints (what hooks call): POST /fake/wake, POST /fake/sleep, GET /fake/alive (200 only
while awake), GET /fake/state. `/health` answers 200 even while asleep, like vLLM's does.
`GET /fake/received` tells what reached it: every request target (method and raw path, query
included) and every header name with a count, and the last requests' headers, so tests can prove
what llmux forwards.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from llmux.errors import LlmuxError, error_body
from llmux.http.asgi import Receive, Scope, Send, answer_lifespan, send_bytes, send_json
from llmux.http.form import FormModelScanner, form_boundary

DEFAULT_TOKENS = 8
FORM_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits")
RECENT_REQUESTS = 100


@dataclass
class FakeStats:
    served: int = 0
    rejected_while_asleep: int = 0  # requests that reached it while not awake: must stay 0
    slept_while_busy: int = 0  # sleep requests that arrived with requests in flight: must stay 0
    garbage_answers: int = 0  # vLLM: answered with discarded weights; must stay 0
    wakes: int = 0
    sleeps: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


class FakeBackend:
    def __init__(
        self,
        name: str,
        *,
        wake_delay: float = 0.5,
        sleep_delay: float = 0.1,
        token_interval: float = 0.02,
        awake: bool = False,
        api: str = "fake",
        weights_mb: int = 0,
    ) -> None:
        if api not in CONTROL_APIS:
            raise ValueError(f"unknown control API {api!r}; known: {', '.join(CONTROL_APIS)}")
        self.api = api
        self.name = name
        self.wake_delay = wake_delay
        self.sleep_delay = sleep_delay
        self.token_interval = token_interval
        self.state = "awake" if awake else "asleep"
        self.stats = FakeStats()
        self.weights_loaded = True  # vLLM: false after a level-2 sleep until reload_weights
        self.weights_mb = weights_mb  # vLLM: a level-1 sleep holds this much host RAM
        self.weights_in_ram: bytes = b""
        self.parts_asleep: set[str] = set() if awake else {"weights", "kv_cache"}  # vLLM
        self.targets: Counter[str] = Counter()  # "METHOD /raw/path?query" -> times received
        self.header_names: Counter[str] = Counter()  # every header name that reached it
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)

    def _record(self, scope: Scope) -> None:
        query = scope["query_string"]
        target = scope["raw_path"] + (b"?" + query if query else b"")
        line = f"{scope['method']} {target.decode('latin-1')}"
        self.targets[line] += 1
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        self.header_names.update(name for name, _ in headers)
        self.recent.append({"request": line, "headers": headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if (method, path) == ("GET", "/fake/received"):
            received = {"targets": self.targets, "header_names": self.header_names}
            await send_json(send, 200, {**received, "recent": list(self.recent)})
            return
        self._record(scope)
        if method == "GET" and path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif method == "GET" and path == "/fake/state":
            await send_json(
                send, 200, {"name": self.name, "state": self.state, **asdict(self.stats)}
            )
        elif method == "GET" and path == "/fake/alive":
            await send_json(send, 200 if self.state == "awake" else 503, {"state": self.state})
        elif method == "POST" and path == "/fake/wake":
            await self._wake()
            await send_json(send, 200, {"state": self.state})
        elif method == "POST" and path == "/fake/sleep":
            await self._sleep()
            await send_json(send, 200, {"state": self.state})
        elif (method, path) in CONTROL_APIS[self.api]:
            status, payload = await CONTROL_APIS[self.api][(method, path)](self, scope, receive)
            await send_json(send, status, payload)
        elif method == "GET" and path == "/v1/models":
            model = {"id": self.name, "object": "model", "created": 0, "owned_by": "fake"}
            await send_json(send, 200, {"object": "list", "data": [model]})
        elif method == "POST" and path in FORM_PATHS:
            await self._upload(scope, receive, send)
        elif method == "POST" and (path.startswith("/v1/") or path in ("/rerank", "/infill")):
            await self._generate(path, receive, send)
        else:
            await _send_raw(
                send,
                404,
                error_body(f"no route {method} {path}", "invalid_request_error", "not_found"),
            )

    async def _wake(self) -> None:
        self.parts_asleep.clear()
        if self.state == "awake":
            return
        self.state = "waking"
        await trio.sleep(self.wake_delay)
        self.state = "awake"
        self.weights_in_ram = b""  # back on the GPU
        self.stats.wakes += 1

    async def _sleep(self) -> None:
        if self.state == "asleep":
            return
        if self.stats.in_flight:
            self.stats.slept_while_busy += 1
        self.state = "sleeping"
        await trio.sleep(self.sleep_delay)
        self.state = "asleep"
        self.parts_asleep = {"weights", "kv_cache"}
        self.stats.sleeps += 1

    # ----- vLLM's sleep-mode API (server started with VLLM_SERVER_DEV_MODE=1) -----

    async def _vllm_sleep(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        level = _query(scope).get("level", "1")
        await self._sleep()
        if level == "2":
            self.weights_loaded = False  # level 2 discards the weights
        elif self.weights_mb:
            self.weights_in_ram = b"w" * (self.weights_mb * 2**20)  # copied out, resident
        return 200, {"status": "sleeping", "level": int(level)}

    async def _vllm_wake_up(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        tags = _query(scope).get("tags")
        if tags is None or self.state == "awake":
            await self._wake()
        else:
            self.parts_asleep.discard(tags)
            if not self.parts_asleep:
                await self._wake()
        return 200, {}

    async def _vllm_is_sleeping(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        return 200, {"is_sleeping": self.state != "awake"}

    async def _vllm_collective_rpc(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, dict[str, Any]]:
        body = json.loads(await _read_all(receive) or b"{}")
        if body.get("method") == "reload_weights":
            self.weights_loaded = True
        return 200, {"results": [None]}

    # ----- SGLang's memory API (server started with --enable-memory-saver) -----

    async def _sglang_release(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        if self.stats.in_flight:
            self.stats.slept_while_busy += 1  # the real server asserts nothing is in flight
            return 500, {"error": "requests in flight"}
        await self._sleep()
        return 200, {"success": True}

    async def _sglang_resume(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        await self._wake()
        return 200, {"success": True}

    async def _refused_while_asleep(self, send: Send) -> bool:
        """A request that reached it while not awake: counted (it must never happen) and 503."""
        if self.state == "awake":
            return False
        self.stats.rejected_while_asleep += 1
        message = f"fake backend {self.name} is {self.state}: request refused"
        await _send_raw(send, 503, error_body(message, "server_error", "model_asleep"))
        return True

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A transcription, translation or image edit: says what model and file it got."""
        body = await _read_all(receive)
        if await self._refused_while_asleep(send):
            return
        try:
            scanner = FormModelScanner(form_boundary(scope))
            scanner.feed(body)
            model = scanner.finish()
        except LlmuxError as exc:
            await _send_raw(send, 400, error_body(exc.message, "invalid_request_error", "form"))
            return
        self.stats.served += 1
        text = f"{self.name} heard {len(body)} bytes for model {model}"
        if scope["path"] == "/v1/images/edits":
            await send_json(send, 200, {"created": int(time.time()), "data": [{"b64_json": ""}]})
        else:
            await send_json(send, 200, {"text": text})

    async def _generate(self, path: str, receive: Receive, send: Send) -> None:
        body = await _read_all(receive)
        if self.state != "awake" and self.api == "vllm":
            # A sleeping vLLM does not refuse: the request hangs until the server wakes.
            self.stats.rejected_while_asleep += 1
            while self.state != "awake":
                await trio.sleep(0.01)
        if self.api == "vllm" and not self.weights_loaded:
            self.stats.garbage_answers += 1  # woken from level 2 without reload_weights
        if await self._refused_while_asleep(send):
            return
        try:
            request = json.loads(body)
        except json.JSONDecodeError:
            await _send_raw(
                send, 400, error_body("invalid JSON", "invalid_request_error", "invalid_json")
            )
            return
        tokens = int(
            request.get("max_tokens") or request.get("max_completion_tokens") or DEFAULT_TOKENS
        )
        model = str(request.get("model", self.name))
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            if path.endswith("/embeddings"):
                await send_json(send, 200, _embedding(model))
            elif path == "/v1/messages":
                await self._anthropic(send, model, tokens, stream=bool(request.get("stream")))
            elif request.get("stream"):
                await self._stream(
                    send, receive, model, tokens, chat=path.endswith("/chat/completions")
                )
            else:
                # Like a real server, abort the work when the client (llmux) goes away: from
                # then on the request is no longer in flight here.
                with trio.move_on_after(self.token_interval * tokens):
                    await _until_disconnect(receive)
                    return
                text = "".join(self._token(i) for i in range(tokens))
                await send_json(
                    send,
                    200,
                    _completion(
                        model,
                        text,
                        tokens,
                        chat=path.endswith("/chat/completions"),
                        backend=self.name,
                    ),
                )
            self.stats.served += 1
        finally:
            self.stats.in_flight -= 1

    def _token(self, index: int) -> str:
        return f"{self.name}-{index} "

    async def _anthropic(self, send: Send, model: str, tokens: int, stream: bool) -> None:
        """Anthropic's Messages API: one message, or its event stream token by token."""
        message: dict[str, Any] = {
            "id": f"msg_fake_{time.monotonic_ns()}", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 0},
        }  # fmt: skip
        text = [self._token(i) for i in range(tokens)]
        if not stream:
            await trio.sleep(self.token_interval * tokens)
            message["content"] = [{"type": "text", "text": "".join(text)}]
            message["stop_reason"] = "max_tokens"
            message["usage"]["output_tokens"] = tokens
            await send_json(send, 200, message)
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events: list[dict[str, Any]] = [
            {"type": "message_start", "message": message},
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}},
        ]  # fmt: skip
        for piece in text:
            delta = {"type": "text_delta", "text": piece}
            events.append({"type": "content_block_delta", "index": 0, "delta": delta})
        events += [
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
             "usage": {"output_tokens": tokens}},
            {"type": "message_stop"},
        ]  # fmt: skip
        for event in events:
            if event["type"] == "content_block_delta":
                await trio.sleep(self.token_interval)
            data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(
        self, send: Send, receive: Receive, model: str, tokens: int, chat: bool
    ) -> None:
        """Stream tokens until done or until the client (llmux) closes the connection, as real
        servers do: that is how a test sees llmux closing the upstream of a departed client."""
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"x-fake-backend", self.name.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        created = int(time.time())
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            for index in range(tokens):
                await trio.sleep(self.token_interval)
                if self.state != "awake":
                    self.stats.rejected_while_asleep += 1
                chunk = _stream_chunk(model, self._token(index), created, chat, finish=None)
                await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
            nursery.cancel_scope.cancel()
        final = _stream_chunk(model, "", created, chat, finish="length")
        end = _sse(final) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": end, "more_body": False})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class FakeOllama:
    """Several models behind one port, loaded and unloaded the way Ollama does it: a generate
    request with `keep_alive: 0` unloads a model, one without a prompt preloads it, and
    `/api/ps` lists what is loaded. `co_loaded` counts moments when two models were loaded."""

    def __init__(self, models: list[str], **options: Any) -> None:
        self.backends = {name: FakeBackend(name, **options) for name in models}
        self.co_loaded = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        method, path = scope["method"], scope["path"]
        if (method, path) == ("GET", "/api/ps"):
            # As Ollama does: names carry their tag (`llama3.1` is listed as `llama3.1:latest`).
            loaded = [
                {"name": _tagged(n), "model": _tagged(n)}
                for n, b in self.backends.items()
                if b.state == "awake"
            ]
            await send_json(send, 200, {"models": loaded})
        elif (method, path) == ("GET", "/api/version"):
            await send_json(send, 200, {"version": "0.0.0-fake"})
        elif (method, path) == ("GET", "/fake/state"):
            states = {n: {"state": b.state, **asdict(b.stats)} for n, b in self.backends.items()}
            await send_json(send, 200, {"co_loaded": self.co_loaded, "models": states})
        elif method == "POST" and (path == "/api/generate" or path.startswith("/v1/")):
            body = await _read_all(receive)
            try:
                request = json.loads(body)
                backend = self.backends[request["model"]]
            except (ValueError, KeyError, TypeError):
                await _send_raw(send, 404, error_body("model not found", "api_error", "not_found"))
                return
            if path == "/api/generate":
                await self._load_or_unload(backend, request)
                await send_json(send, 200, {"model": backend.name, "done": True})
            else:
                await backend._generate(path, _replay(body, receive), send)
        else:
            await _send_raw(send, 404, error_body(f"no route {path}", "api_error", "not_found"))

    async def _load_or_unload(self, backend: FakeBackend, request: dict[str, Any]) -> None:
        if request.get("keep_alive") in (0, "0", "0s"):
            await backend._sleep()
            return
        await backend._wake()
        if sum(b.state == "awake" for b in self.backends.values()) > 1:
            self.co_loaded += 1


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands out an already-read body once, then the connection's own events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        return pending.pop() if pending else await receive()

    return replayed


CONTROL_APIS: dict[str, dict[tuple[str, str], Any]] = {
    "fake": {},
    "vllm": {
        ("POST", "/sleep"): FakeBackend._vllm_sleep,
        ("POST", "/wake_up"): FakeBackend._vllm_wake_up,
        ("GET", "/is_sleeping"): FakeBackend._vllm_is_sleeping,
        ("POST", "/collective_rpc"): FakeBackend._vllm_collective_rpc,
    },
    "sglang": {
        ("POST", "/release_memory_occupation"): FakeBackend._sglang_release,
        ("POST", "/resume_memory_occupation"): FakeBackend._sglang_resume,
    },
}


def _query(scope: Scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _completion(model: str, text: str, tokens: int, chat: bool, backend: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        kind = "text_completion"
    return {
        "id": f"fake-{backend}-{time.monotonic_ns()}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": backend,
        "choices": [choice],
        "usage": usage,
    }


def _stream_chunk(
    model: str, text: str, created: int, chat: bool, finish: str | None
) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": text} if text else {},
            "finish_reason": finish,
        }
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": "fake-stream",
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
    }


def _embedding(model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_raw(send: Send, status: int, body: bytes) -> None:
    await send_bytes(send, status, body, b"application/json")


async def serve_fake_backend(
    backend: FakeBackend | FakeOllama,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `backend` until cancelled; `nursery.start` returns its URLs (the real port when
    `port` is 0)."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    await hypercorn.trio.serve(backend, config, task_status=task_status)
