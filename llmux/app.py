"""The ASGI app: routes requests, reads the `model`, and wires the switcher to the proxy.

The switcher knows nothing of HTTP and the proxy nothing of switching; this module is where a
request becomes a slot on a model, and where every `LlmuxError` becomes its status and JSON body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from llmux.asgi import Receive, Scope, Send, answer_lifespan, send_bytes, send_json
from llmux.auth import bearer_token, presented_key, token_matches
from llmux.config import Config, ConfigError, load_config
from llmux.costs import SwitchCostTracker
from llmux.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    InvalidRequest,
    LlmuxError,
    ModelNotFound,
    RequestTimeout,
    RouteNotFound,
    ShuttingDown,
    Unauthorized,
)
from llmux.fleet import Fleet, GroupsChanged
from llmux.logs import log_event
from llmux.metrics import UNKNOWN_MODEL, Metrics
from llmux.policy import Policy, PolicyLoadError, load_policy
from llmux.proxy import (
    BackendConnectFailed,
    UpstreamClient,
    forwarded_request_headers,
    forwarded_response_headers,
)
from llmux.routes import ROUTES, Access, Endpoint, ModelFrom, RouteMatch, RouteTable, prefix_allows
from llmux.status import status_report

log = logging.getLogger("llmux.app")
access_log = logging.getLogger("llmux.access")

DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer was complete"


class ClientDisconnected(Exception):
    """The client went away while its body was still being read."""


@dataclass
class _Outcome:
    status: int = 0
    error: LlmuxError | None = None
    headers_sent: bool = False
    complete: bool = False
    queue_wait: float = 0.0


class LlmuxApp:
    def __init__(self, config: Config, policy: Policy | None = None) -> None:
        self.config = config
        self.metrics = Metrics(config.models)
        self.costs = SwitchCostTracker()
        # Each group gets its own policy instance; an instance given here (tests, embedding) is
        # shared by all of them.
        make_policy = (lambda: policy) if policy is not None else _policy_factory(config)
        make_policy()  # fail here, before anything runs, if the policy cannot be built
        self.fleet = Fleet(config, make_policy, self.metrics, self.costs)
        self.upstream = UpstreamClient()
        self.routes = RouteTable(ROUTES, admin=config.auth.admin_token is not None)
        self._shutdown_requested = trio.Event()
        self.started_wall = time.time()

    # ----- lifecycle -----

    def request_shutdown(self) -> None:
        self._shutdown_requested.set()

    async def shutdown_trigger(self) -> None:
        """hypercorn's shutdown trigger: runs our drain while the listener still answers (with 503
        for new requests), then returns so hypercorn closes it."""
        await self._shutdown_requested.wait()
        log.info("shutting down: answering new requests 503, letting in-flight ones finish")
        await self.fleet.shutdown(self.config.server.shutdown_timeout_secs)

    def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else keep the one in force (logged)."""
        path = self.config.path
        try:
            new = load_config(path)
            make_policy = None
            if (new.policy.name, new.policy.options) != (
                self.config.policy.name,
                self.config.policy.options,
            ):
                make_policy = _policy_factory(new)
                make_policy()
            # The listener stays where it is (the command line may have overridden the file).
            summary = self.fleet.reconfigure(
                new.with_listen(self.config.host, self.config.port), make_policy
            )
        except (ConfigError, PolicyLoadError, GroupsChanged) as exc:
            log_event(
                log, "config_rejected", f"reload rejected, the old config stays in force: {exc}",
                logging.ERROR, path=str(path), error=str(exc),
            )  # fmt: skip
            return False
        except Exception as exc:  # a bug of ours: a reload must never stop the server
            log.error("reload of %s failed", path, exc_info=True, extra={
                "event": "config_rejected", "fields": {"path": str(path), "error": repr(exc)},
            })  # fmt: skip
            return False
        if (new.host, new.port) != (self.config.host, self.config.port):
            log.info(
                "still listening on %s:%s; the file's %s:%s applies from the next start",
                self.config.host, self.config.port, new.host, new.port,
            )  # fmt: skip
        self.config = self.fleet.config
        self.routes = RouteTable(ROUTES, admin=self.config.auth.admin_token is not None)
        log_event(
            log, "config_reloaded", f"reloaded {path}", path=str(path),
            added=",".join(summary.added), removed=",".join(summary.removed),
            changed=",".join(summary.changed), policy_replaced=make_policy is not None,
        )  # fmt: skip
        return True

    # ----- ASGI -----

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        limit = self.config.server.max_header_bytes
        try:
            # hypercorn bounds only a head that arrives in pieces; a whole one is checked here.
            if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > limit:
                raise HeadersTooLarge(f"request headers exceed server.max_header_bytes ({limit})")
            match = self.routes.match(scope["method"], _raw_path(scope))
            self._check_access(match.route.access, scope["headers"])
        except LlmuxError as error:
            await _send_error(send, error)
            self._log_request(scope, UNKNOWN_MODEL, error.status, 0.0, 0.0)
            return
        await self._dispatch(match, scope, receive, send)

    async def _dispatch(
        self, match: RouteMatch, scope: Scope, receive: Receive, send: Send
    ) -> None:
        endpoint = match.route.endpoint
        if match.route.forwards:
            await self._proxy(match, scope, receive, send)
        elif endpoint is Endpoint.HEALTH:
            await send_json(send, 200, {"status": "ok"})
        elif endpoint is Endpoint.METRICS:
            await send_bytes(
                send, 200, self.metrics.exposition(), b"text/plain; version=0.0.4; charset=utf-8"
            )
        elif endpoint is Endpoint.STATUS:
            await send_json(send, 200, status_report(self.config, self.fleet, self.started_wall))
        elif endpoint is Endpoint.MODEL_LIST:
            await send_json(send, 200, self._model_list())
        else:
            try:
                await self._answer_about_model(match, send)
            except LlmuxError as error:
                await _send_error(send, error)

    def _check_access(self, access: Access, headers: list[tuple[bytes, bytes]]) -> None:
        """Raise Unauthorized unless the route is open to this client."""
        auth = self.config.auth
        if access is Access.PUBLIC:
            return
        if access is Access.ADMIN:
            assert auth.admin_token is not None  # the table has no admin routes without one
            if not token_matches(bearer_token(headers), [auth.admin_token]):
                raise Unauthorized("missing or invalid admin token")
            return
        if not auth.required:
            return
        if (access is Access.METRICS and auth.public_metrics) or (
            access is Access.STATUS and auth.public_status
        ):
            return
        if not token_matches(presented_key(headers), auth.api_keys):
            raise Unauthorized(
                "missing or invalid API key (Authorization: Bearer ..., or x-api-key)"
            )

    async def _answer_about_model(self, match: RouteMatch, send: Send) -> None:
        """GET /v1/models/NAME and the admin routes: llmux answers these itself."""
        endpoint = match.route.endpoint
        if endpoint is Endpoint.ADMIN_SLEEP_ALL:
            await self.fleet.sleep_all()
            await send_json(send, 200, {"status": "asleep"})
            return
        assert match.model is not None
        asked_for = match.model
        name = self._resolve(asked_for)
        if endpoint is Endpoint.MODEL:
            entry = self._model_entry(name)
            if asked_for != name:
                entry = {**entry, "id": asked_for, "llmux": {**entry["llmux"], "alias_of": name}}
            await send_json(send, 200, entry)
            return
        if endpoint is Endpoint.ADMIN_WAKE:
            async with self.fleet.serving(name):
                pass
        else:
            await self.fleet.put_to_sleep(name)
        state = self.fleet.models[name].state.value
        await send_json(send, 200, {"model": name, "state": state})

    def _resolve(self, asked_for: str) -> str:
        resolved = self.config.resolve(asked_for)
        if resolved is None:
            known = ", ".join(self.config.models)
            raise ModelNotFound(f"model {asked_for!r} is not served here; known models: {known}")
        return resolved

    def _model_list(self) -> dict[str, Any]:
        data = []
        for name, model in self.fleet.models.items():
            entry = self._model_entry(name)
            data.append(entry)
            if self.config.server.list_aliases:
                for alias in model.config.aliases:
                    data.append(
                        {**entry, "id": alias, "llmux": {**entry["llmux"], "alias_of": name}}
                    )
        return {"object": "list", "data": data}

    def _model_entry(self, name: str) -> dict[str, Any]:
        """One model in OpenAI form, with llmux's state beside."""
        model = self.fleet.models[name]
        about = {
            "state": model.state.value,
            "queue_depth": len(model.queue),
            "in_flight": model.in_flight,
            "group": model.config.group,
        }
        return {"id": name, "object": "model", "created": 0, "owned_by": "llmux", "llmux": about}

    # ----- proxying -----

    async def _proxy(self, match: RouteMatch, scope: Scope, receive: Receive, send: Send) -> None:
        started = trio.current_time()
        model_label = UNKNOWN_MODEL
        try:
            if self.fleet.closing:
                raise ShuttingDown("llmux is shutting down")
            with trio.move_on_after(self.config.server.request_body_timeout_secs) as body_wait:
                body = await _read_body(scope, receive, self.config.server.max_body_bytes)
            if body_wait.cancelled_caught:
                limit = self.config.server.request_body_timeout_secs
                raise RequestTimeout(f"request body not received within {limit:g}s")
            request = self._upstream_request(match, scope, body)
            model_label = request.model
            outcome = await self._forward(request, scope, receive, send, started)
        except ClientDisconnected:
            outcome = _Outcome(status=CLIENT_CLOSED)
        except LlmuxError as error:
            outcome = _Outcome(status=error.status, error=error)
        if outcome.error is not None and not outcome.headers_sent:
            await _send_error(send, outcome.error)
        elif outcome.headers_sent and outcome.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # A broken upstream leaves the body unfinished: hypercorn then closes the connection
        # without the final chunk, and the client sees a truncated answer, not a clean end.
        self.metrics.requests_total.labels(model_label, str(outcome.status)).inc()
        duration = trio.current_time() - started
        self._log_request(scope, model_label, outcome.status, outcome.queue_wait, duration)

    def _log_request(
        self, scope: Scope, model: str, status: int, queue_wait: float, duration: float
    ) -> None:
        """The access log line; the path is the raw one (the log formatter escapes it)."""
        if not self.config.server.access_log:
            return
        method, path = scope["method"], _raw_path(scope).decode("latin-1")
        log_event(
            access_log, "request", f"{method} {path} {model} {status} {duration:.3f}s",
            method=method, path=path, model=model, status=status, queue_wait=queue_wait,
            duration=duration,
        )  # fmt: skip

    def _upstream_request(self, match: RouteMatch, scope: Scope, body: bytes) -> _UpstreamRequest:
        """What goes to which model: the routed path, the model the body or path names."""
        assert match.forward_path is not None
        target = match.forward_path
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        if match.route.model_from is ModelFrom.PATH:
            assert match.model is not None
            model = self._resolve(match.model)
            allowed = self.config.models[model].passthrough_paths
            if not any(prefix_allows(prefix, match.forward_path) for prefix in allowed):
                raise RouteNotFound(
                    f"{match.forward_path.decode('latin-1')} is not in "
                    f"models.{model}.passthrough_paths, so llmux does not forward it"
                )
            return _UpstreamRequest(model, match.model, target, body, rewrite_model=False)
        asked_for = _model_named_in(body)
        return _UpstreamRequest(self._resolve(asked_for), asked_for, target, body)

    async def _forward(
        self, request: _UpstreamRequest, scope: Scope, receive: Receive, send: Send, started: float
    ) -> _Outcome:
        """Wait for the model, then stream its answer; a client disconnect cancels both.

        The final empty body message is sent by the caller, outside the cancel scope the
        disconnect watcher controls (cancelling around it breaks hypercorn's keep-alive)."""
        outcome = _Outcome(status=CLIENT_CLOSED)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            try:
                await self._stream_from_backend(request, scope, send, started, outcome)
            except LlmuxError as error:
                outcome.status, outcome.error = error.status, error
            finally:
                nursery.cancel_scope.cancel()
        return outcome

    async def _stream_from_backend(
        self,
        request: _UpstreamRequest,
        scope: Scope,
        send: Send,
        started: float,
        outcome: _Outcome,
    ) -> None:
        model = request.model
        async with self.fleet.serving(model) as slot:
            outcome.queue_wait = slot.waited
            # The backend knows the model by its upstream name: an alias or a renamed model
            # gets the request's `model` rewritten; otherwise the body goes on byte for byte.
            body = request.body
            upstream_name = slot.backend.upstream_model or slot.backend.name
            if request.rewrite_model and request.asked_for != upstream_name:
                body = _with_model(body, upstream_name)
            headers = forwarded_request_headers(
                scope["headers"],
                strip_credentials=self.config.auth.required,
                backend_api_key=slot.backend.backend_api_key,
            )
            try:
                async with self.upstream.open(
                    slot.backend.base_url, scope["method"], request.target, headers, body
                ) as response:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": response.status_code,
                            "headers": forwarded_response_headers(response),
                        }
                    )
                    outcome.headers_sent = True
                    outcome.status = response.status_code
                    self.metrics.request_duration.labels(model).observe(
                        trio.current_time() - started
                    )
                    try:
                        async for chunk in response.aiter_raw():
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                    except Exception as exc:  # httpx transport errors, h11 protocol errors
                        log.warning("backend for %s broke mid-response: %r", model, exc)
                        outcome.status = 502
                        return
                    outcome.complete = True
            except BackendConnectFailed:
                self.fleet.report_unreachable(model)
                raise


@dataclass(frozen=True)
class _UpstreamRequest:
    model: str  # the configured model that serves it
    asked_for: str  # the name the client used (the model, or an alias)
    target: bytes  # path and query, exactly as routed
    body: bytes
    rewrite_model: bool = True  # a JSON body whose `model` becomes the backend's name


def _raw_path(scope: Scope) -> bytes:
    """The path as the client sent it (hypercorn always sets raw_path)."""
    return scope.get("raw_path") or scope["path"].encode("latin-1", errors="replace")


def _model_named_in(body: bytes) -> str:
    """The `model` a JSON body names."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = payload.get("model")
    if model is None:
        raise InvalidRequest("request body has no 'model' field")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    return model


def _policy_factory(config: Config) -> Callable[[], Policy]:
    return lambda: load_policy(config.policy.name, config.policy.options, config.hook_dir)


def _with_model(body: bytes, model: str) -> bytes:
    payload = json.loads(body)
    payload["model"] = model
    return json.dumps(payload, ensure_ascii=False).encode()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header") from None
            if declared > limit:
                raise BodyTooLarge(
                    f"request body of {declared} bytes exceeds server.max_body_bytes ({limit})"
                )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        more = message.get("more_body", False)
        if size > limit:
            if more:
                await _discard_rest(receive, DISCARD_LIMIT_BYTES)
            raise BodyTooLarge(f"request body exceeds server.max_body_bytes ({limit})")
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


async def _discard_rest(receive: Receive, budget: int) -> None:
    """Read and drop the rest of an oversized body (up to `budget` bytes) so that the client,
    still sending, gets to read our 413 instead of a reset connection."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send: Send, error: LlmuxError) -> None:
    headers = [(b"content-type", b"application/json"), *error.headers()]
    body = error.body()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
