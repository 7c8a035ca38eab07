"""The ASGI app: routes requests, reads the `model`, and wires the switcher to the proxy.

The switcher knows nothing of HTTP and the proxy nothing of switching; this module is where a
request becomes a slot on a model, and where every `LlmuxError` becomes its status and JSON body.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from llmux.config import Config, ConfigError, ModelConfig, load_config
from llmux.core.records import ReloadSummary
from llmux.errors import (
    AmbiguousFraming,
    BackendTimeout,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    LlmuxError,
    ModelNotFound,
    RequestTimeout,
    RouteNotFound,
    ShuttingDown,
    Unauthorized,
)
from llmux.http.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    answer_lifespan,
    send_bytes,
    send_json,
)
from llmux.http.auth import bearer_token, presented_key, token_matches
from llmux.http.body import BodyReader, ClientDisconnected, model_named_in
from llmux.http.form import FormModelScanner, form_boundary
from llmux.http.listener import current_connection
from llmux.http.proxy import (
    BackendConnectFailed,
    UpstreamClient,
    forwarded_request_headers,
    forwarded_response_headers,
)
from llmux.http.routes import (
    ROUTES,
    Access,
    Endpoint,
    ModelFrom,
    RouteMatch,
    RouteTable,
    prefix_allows,
)
from llmux.http.status import status_report
from llmux.http.upstream import UpstreamClosed, UpstreamProtocolError, UpstreamResponse
from llmux.http.wait_notice import (
    MAX_ERROR_BODY_BYTES,
    StreamWaitNotice,
    asks_to_stream,
    backend_error_event,
    error_event,
)
from llmux.http.watchdog import Watchdog
from llmux.observe.logs import log_event
from llmux.observe.metrics import UNKNOWN_MODEL
from llmux.policies.loader import PolicyLoadError, policy_factory
from llmux.runtime.fleet import GroupsChanged

log = logging.getLogger("llmux.app")
access_log = logging.getLogger("llmux.access")

CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer was complete"


def dated(config: Config, before: Config | None) -> Config:
    """`config` with the Unix time each model was configured (`created` in /v1/models): when
    the config holding it was loaded. A reload keeps the earlier time of a model whose entry
    is unchanged, since it is the same model served the same way (a client that caches the
    list by `created` sees a change only where there is one); a new or changed entry gets
    the reload's time. A config dated already (a worker's, from its controller) is kept."""
    if all(name in config.created for name in config.models):
        return config
    now = int(time.time())
    earlier = before.created if before is not None else {}
    created = {
        name: earlier[name]
        if name in earlier and before is not None and before.models.get(name) == model
        else now
        for name, model in config.models.items()
    }
    return dataclasses.replace(config, created=created)


@dataclass
class _Outcome:
    status: int = 0
    error: LlmuxError | None = None
    headers_sent: bool = False
    complete: bool = False
    queue_wait: float = 0.0
    notice: StreamWaitNotice | None = None  # a stream's wait notices (stream_wait_notice)

    @property
    def notice_began(self) -> bool:
        """The wait notices sent the answer's head: what follows goes as stream events."""
        return self.notice is not None and self.notice.head_sent


class LlmuxApp:
    """The edge, handed what it serves from: the fleet of switchers (or, in a worker, a
    RemoteFleet that asks the controller's) and the metrics. server.py assembles them."""

    def __init__(self, config: Config, fleet: Any, metrics: Any) -> None:
        self.fleet = fleet
        self.config = dated(config, None)
        self.metrics = metrics
        self.upstream = UpstreamClient()
        self.watchdog = Watchdog()  # bounds the backends' silences mid-answer; run by the server
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
        summary = self.apply_reload()
        if summary is None:
            return False
        self.log_reload(summary)
        return True

    def apply_reload(self) -> ReloadSummary | None:
        """`reload` without its closing log line (workers hear of it first); None if the file
        was rejected (logged)."""
        path = self.config.path
        try:
            new = load_config(path).keeping_chosen_ports(self.config)
            make_policy = None
            if (new.policy.name, new.policy.options) != (
                self.config.policy.name,
                self.config.policy.options,
            ):
                make_policy = policy_factory(new)
                make_policy()
            # The listener stays where it is (the command line may have overridden the file).
            summary = self.fleet.reconfigure(
                new.with_listen(self.config.host, self.config.port), make_policy
            )
        except (ConfigError, PolicyLoadError, GroupsChanged) as exc:
            said = "; ".join(map(str, exc.problems)) if isinstance(exc, ConfigError) else str(exc)
            log_event(
                log, "config_rejected", f"reload rejected, the old config stays in force: {said}",
                logging.ERROR, path=str(path), error=said,
            )  # fmt: skip
            return None
        except Exception as exc:  # a bug of ours: a reload must never stop the server
            log.error("reload of %s failed", path, exc_info=True, extra={
                "event": "config_rejected", "fields": {"path": str(path), "error": repr(exc)},
            })  # fmt: skip
            return None
        if (new.host, new.port) != (self.config.host, self.config.port):
            log.info(
                "still listening on %s:%s; the file's %s:%s applies from the next start",
                self.config.host, self.config.port, new.host, new.port,
            )  # fmt: skip
        self.apply_config(self.fleet.config)
        return dataclasses.replace(summary, policy_replaced=make_policy is not None)

    def apply_config(self, config: Config) -> None:
        self.config = dated(config, self.config)
        self.routes = RouteTable(ROUTES, admin=self.config.auth.admin_token is not None)

    def log_reload(self, summary: ReloadSummary) -> None:
        path = self.config.path
        log_event(
            log, "config_reloaded", f"reloaded {path}", path=str(path),
            added=",".join(summary.added), removed=",".join(summary.removed),
            changed=",".join(summary.changed), policy_replaced=summary.policy_replaced,
        )  # fmt: skip

    # ----- ASGI -----

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        watched = _WatchedSend(send)
        try:
            await self._serve_http(scope, receive, watched)
        except Exception as exc:  # a bug of ours that nothing below caught: never a bare 500
            error = self._internal_error(exc, scope, UNKNOWN_MODEL)
            if not watched.started:
                await _send_error(send, error)
            self.metrics.requests_total.labels(UNKNOWN_MODEL, str(error.status)).inc()
            self._log_request(scope, UNKNOWN_MODEL, error.status, 0.0, 0.0)

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """hypercorn hands a WebSocket upgrade to the app, and answers a bare 500 for an app
        that takes none: llmux refuses it in OpenAI's shape (ASGI's denial response)."""
        await receive()  # websocket.connect
        error = InvalidRequest("llmux serves HTTP requests, not WebSocket")
        body = error.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        start = {"type": "websocket.http.response.start", "status": error.status}
        await send({**start, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        self.metrics.requests_total.labels(UNKNOWN_MODEL, str(error.status)).inc()
        self._log_request({**scope, "method": "GET"}, UNKNOWN_MODEL, error.status, 0.0, 0.0)

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.config.server.max_header_bytes
        try:
            # hypercorn bounds only a head that arrives in pieces; a whole one is checked here.
            if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > limit:
                raise HeadersTooLarge(f"request headers exceed server.max_header_bytes ({limit})")
            names = {name for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise AmbiguousFraming(
                    "a request may carry Content-Length or Transfer-Encoding, not both"
                )
            match = self.routes.match(scope["method"], _raw_path(scope), scope["query_string"])
            self._check_access(match.route.access, scope["headers"])
        except LlmuxError as error:
            await _send_error(send, error)
            self._log_request(scope, UNKNOWN_MODEL, error.status, 0.0, 0.0)
            return
        await self._dispatch(match, scope, receive, send)

    async def _dispatch(
        self, match: RouteMatch, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if match.route.forwards:
            await self._proxy(match, scope, receive, send)
        else:
            await self._answer_here(match, scope, receive, send)

    async def _answer_here(
        self, match: RouteMatch, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """What llmux answers itself (a worker asks the controller: workers/worker.py)."""
        endpoint = match.route.endpoint
        if endpoint is Endpoint.HEALTH:
            # 503 once a drain has begun, so that a load balancer stops sending here.
            if self.fleet.closing:
                await send_json(send, 503, {"status": "draining"})
            else:
                await send_json(send, 200, {"status": "ok"})
        elif endpoint is Endpoint.METRICS:
            self.fleet.read_gpus()  # the GPU gauges say what the driver says now
            self.fleet.show_host_ram()  # and the host RAM ones what sleepers hold now
            self.fleet.show_start_backoffs()  # and the seconds left of each one, now
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
        if endpoint is Endpoint.MODEL_HEALTH:
            # Ready means: configured here, and llmux is not draining. An asleep model is
            # ready: asking for it wakes it.
            ready = not self.fleet.closing
            state = self.fleet.models[name].state.value
            body = {"model": name, "ready": ready, "state": state}
            await send_json(send, 200 if ready else 503, body)
            return
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
            raise _not_served(asked_for, self.config)
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
        created = self.config.created.get(name, int(self.started_wall))
        return {
            "id": name, "object": "model", "created": created, "owned_by": "llmux", "llmux": about
        }  # fmt: skip

    # ----- proxying -----

    async def _proxy(self, match: RouteMatch, scope: Scope, receive: Receive, send: Send) -> None:
        started = trio.current_time()
        model_label = UNKNOWN_MODEL
        reader: BodyReader | None = None
        outcome = _Outcome(status=CLIENT_CLOSED)  # what is left if the client goes first
        try:
            if self.fleet.closing:
                raise ShuttingDown("llmux is shutting down")
            form = match.route.model_from is ModelFrom.FORM_FIELD
            scanner = FormModelScanner(form_boundary(scope)) if form else None
            reader = BodyReader(scope, receive, self.config.server.max_body_bytes, scanner)
            reader.check_declared_length()
            with trio.move_on_after(self.config.server.request_body_timeout_secs) as body_wait:
                request = await self._read_request(match, scope, reader)
            if body_wait.cancelled_caught:
                limit = self.config.server.request_body_timeout_secs
                raise RequestTimeout(f"request body not received within {limit:g}s")
            model_label = request.model
            backend = self.config.models.get(request.model)
            if backend is not None:  # (else a reload removed it meanwhile: its group refuses it)
                # Before the request asks for a slot: whatever fails here wakes no model.
                request.prepare(_upstream_name(backend))
            await self._forward(request, scope, receive, send, started, outcome)
        except ClientDisconnected:
            outcome.status = CLIENT_CLOSED
        except LlmuxError as error:
            outcome.status, outcome.error = error.status, error
        except Exception as exc:  # a bug of ours: a JSON 500 (or a cut answer), counted, logged
            outcome.status, outcome.error = 500, self._internal_error(exc, scope, model_label)
        if outcome.error is not None and outcome.notice_began:
            event = error_event(outcome.error.body())
            await send({"type": "http.response.body", "body": event, "more_body": False})
        elif outcome.error is not None and not outcome.headers_sent:
            # A body that did not come in time is not waited for again.
            timed_out = isinstance(outcome.error, RequestTimeout)
            if reader is not None and reader.unread and not timed_out:
                await self._answer_early(send, outcome.error, reader)
            else:
                await _send_error(send, outcome.error)
        elif outcome.headers_sent and outcome.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # A broken upstream leaves the body unfinished: hypercorn then closes the connection
        # without the final chunk, and the client sees a truncated answer, not a clean end.
        connection = current_connection.get()
        if outcome.status == CLIENT_CLOSED and connection is not None and connection.send_timed_out:
            self._client_too_slow(model_label)
        self.metrics.requests_total.labels(model_label, str(outcome.status)).inc()
        duration = trio.current_time() - started
        self._log_request(scope, model_label, outcome.status, outcome.queue_wait, duration)

    async def _read_request(
        self, match: RouteMatch, scope: Scope, reader: BodyReader
    ) -> _UpstreamRequest:
        """Read the body only as far as needed to know its model; refuse then if the model is
        unknown or its queue is full (dropping the rest unread), else read it all."""
        assert match.forward_path is not None
        target = match.forward_path
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        if match.route.model_from is ModelFrom.PATH:
            assert match.model is not None
            model = self._passthrough_model(match.model, match.forward_path)
            self._refuse_early(model)
            body = await reader.read_all()
            return _UpstreamRequest(model, match.model, target, body, rename=False)
        seen = await reader.read_until_model()
        if seen is not None:
            self._refuse_early(seen)
        body = await reader.read_all()
        if isinstance(reader.scanner, FormModelScanner):
            reader.scanner.feed(body)
            asked_for = reader.scanner.finish()
            span = reader.scanner.span
            model = self._resolve(asked_for)
            return _UpstreamRequest(model, asked_for, target, body, span=span, form=True)
        asked_for = model_named_in(body)
        if seen is not None and asked_for != seen:
            raise InvalidRequest("the request body names 'model' more than once")
        span = reader.scanner.span if seen is not None else None
        return _UpstreamRequest(self._resolve(asked_for), asked_for, target, body, span=span)

    async def _answer_early(self, send: Send, error: LlmuxError, reader: BodyReader) -> None:
        """Answer before the body is all in: the whole answer goes out now, then the rest of
        the body is read and dropped (within the body timeout), then the answer is ended.

        hypercorn closes a connection whose answer ends while the request is still arriving,
        and closing with unread bytes resets it, which can destroy the answer before the
        client reads it. Ending only once the body is in keeps the connection, and the client
        has every byte of the answer (its Content-Length says so) from the start."""
        await _send_error(send, error, end=False)
        with (
            trio.move_on_after(self.config.server.request_body_timeout_secs),
            contextlib.suppress(ClientDisconnected),
        ):
            await reader.discard_rest()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _refuse_early(self, asked_for: str) -> None:
        resolved = self.config.resolve(asked_for)
        refusal = (
            self.fleet.refusal(resolved)
            if resolved is not None
            else _not_served(asked_for, self.config)
        )
        if refusal is not None:
            raise refusal  # answered now; the rest of the body is dropped after the answer

    def _passthrough_model(self, asked_for: str, path: bytes) -> str:
        """The model an /upstream/ path names, if its passthrough_paths allow `path`."""
        model = self._resolve(asked_for)
        allowed = self.config.models[model].passthrough_paths
        if not any(prefix_allows(prefix, path) for prefix in allowed):
            raise RouteNotFound(
                f"{path.decode('latin-1')} is not in models.{model}.passthrough_paths, "
                "so llmux does not forward it"
            )
        return model

    def _client_too_slow(self, model: str) -> None:
        limit = self.config.server.client_send_timeout_secs
        self.metrics.client_send_timeouts.labels(model).inc()
        log_event(
            log, "client_send_timeout", f"a client of {model} took nothing for {limit:g}s: "
            "cut, its slot freed", logging.WARNING, model=model,
        )  # fmt: skip

    def _internal_error(self, exc: Exception, scope: Scope, model: str) -> InternalError:
        """Log a bug met while serving a request, once, with its traceback; count it; the error
        the client gets (its message says nothing of the bug)."""
        self.metrics.internal_errors.inc()
        method, path = scope["method"], _raw_path(scope).decode("latin-1")
        log.error(
            "internal error serving %s %s: %r", method, path, exc, exc_info=exc,
            extra={"event": "internal_error", "fields": {
                "method": method, "path": path, "model": model, "error": repr(exc),
            }},
        )  # fmt: skip
        return InternalError("llmux failed on this request (an internal error, logged)")

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

    async def _forward(
        self,
        request: _UpstreamRequest,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
        outcome: _Outcome,
    ) -> None:
        """Wait for the model, then stream its answer; a client disconnect cancels both.

        Errors are caught here, inside the nursery, so that they reach the caller as
        themselves (not in an ExceptionGroup) and `outcome` says whether the answer had begun.
        The final empty body message is sent by the caller, outside the cancel scope the
        disconnect watcher controls (cancelling around it breaks hypercorn's keep-alive)."""
        outcome.notice = self._wait_notice(request, send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            if outcome.notice is not None:
                nursery.start_soon(outcome.notice.run)
            try:
                await self._stream_from_backend(request, scope, send, started, outcome)
            except LlmuxError as error:
                outcome.status, outcome.error = error.status, error
            except Exception as exc:  # a bug of ours: its slot is released by now
                outcome.status = 500
                outcome.error = self._internal_error(exc, scope, request.model)
            finally:
                nursery.cancel_scope.cancel()

    def _wait_notice(self, request: _UpstreamRequest, send: Send) -> StreamWaitNotice | None:
        """Wait notices for a request that asked to stream, if llmux is to send them."""
        if not self.config.server.stream_wait_notice or request.form:
            return None
        return StreamWaitNotice(send, self.fleet.where) if asks_to_stream(request.body) else None

    async def _stream_from_backend(
        self,
        request: _UpstreamRequest,
        scope: Scope,
        send: Send,
        started: float,
        outcome: _Outcome,
    ) -> None:
        model, notice = request.model, outcome.notice
        async with self.fleet.serving(model, notice.ticket if notice else None) as slot:
            if notice is not None:
                await notice.stop()
            outcome.queue_wait = slot.waited
            if request.sent_as != _upstream_name(slot.backend):  # a reload renamed it meanwhile
                request.prepare(_upstream_name(slot.backend))
            headers = forwarded_request_headers(
                scope["headers"],
                strip_credentials=self.config.auth.required,
                backend_api_key=slot.backend.backend_api_key,
            )
            try:
                async with self.upstream.open(
                    slot.backend.port, scope["method"], request.target, headers, request.sent,
                    slot.backend.first_byte_timeout_secs,
                ) as response:  # fmt: skip
                    if not outcome.notice_began:
                        await send(
                            {
                                "type": "http.response.start",
                                "status": response.status,
                                "headers": forwarded_response_headers(response.headers),
                            }
                        )
                    outcome.headers_sent = True
                    outcome.status = response.status
                    self.metrics.request_duration.labels(model).observe(
                        trio.current_time() - started
                    )
                    if outcome.notice_began and not 200 <= response.status < 300:
                        await self._relay_error_event(response, slot.backend, send, outcome)
                    else:
                        await self._relay_body(response, slot.backend, send, outcome)
            except BackendConnectFailed:
                self.fleet.report_unreachable(model)
                raise
            except BackendTimeout:
                self._backend_timed_out(model, "first_byte", slot.backend.first_byte_timeout_secs)
                raise

    def _backend_timed_out(self, model: str, phase: str, limit: float) -> None:
        self.metrics.backend_timeouts.labels(model, phase).inc()
        where = "before its first byte" if phase == "first_byte" else "mid-answer"
        log_event(
            log, "backend_timeout", f"backend for {model} sent nothing for {limit:g}s {where}",
            logging.WARNING, model=model, phase=phase,
        )  # fmt: skip

    async def _relay_error_event(
        self, response: UpstreamResponse, backend: ModelConfig, send: Send, outcome: _Outcome
    ) -> None:
        """A backend's error answer (a prompt too long, a 5xx) to a stream whose head the wait
        notices sent: its status cannot reach the client, so its error goes as an event."""
        body = b""
        with trio.move_on_after(backend.idle_timeout_secs):
            try:
                async for chunk in response.body():
                    body += chunk
                    if len(body) > MAX_ERROR_BODY_BYTES:
                        break
            except _BACKEND_BROKE:
                pass  # what came is told
        event = backend_error_event(response.status, body[:MAX_ERROR_BODY_BYTES])
        await send({"type": "http.response.body", "body": event, "more_body": True})
        outcome.complete = True

    async def _relay_body(
        self, response: UpstreamResponse, backend: ModelConfig, send: Send, outcome: _Outcome
    ) -> None:
        """Pass each chunk on as it comes, unchanged; a backend that breaks or goes silent
        mid-answer leaves the answer incomplete (`outcome.complete` stays false).

        The backend's silences are bounded by a watch (no cancel scope per chunk): it runs
        while we wait for the backend and is stopped while a chunk is being sent (a slow client
        is not a silent backend; client_send_timeout_secs bounds that)."""
        model, idle = backend.name, backend.idle_timeout_secs
        connection = current_connection.get()
        silence = trio.CancelScope()
        watch = self.watchdog.watch(idle, silence.cancel)
        try:
            with silence:
                watch.begin()
                async for chunk in response.body():
                    watch.end()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if connection is not None and connection.send_timed_out:
                        outcome.status = CLIENT_CLOSED  # cut by client_send_timeout_secs
                        return
                    watch.begin()
        except _BACKEND_BROKE as exc:  # anything else is a bug of ours, an internal_error
            log.warning("backend for %s broke mid-response: %r", model, exc)
            outcome.status = 502
            return
        finally:
            self.watchdog.forget(watch)
        if silence.cancelled_caught:
            self._backend_timed_out(model, "idle", idle)
            outcome.status = 504
            return
        outcome.complete = True


# How a backend's connection fails mid-answer: reset or closed, or a body that is not HTTP/1.1.
_BACKEND_BROKE = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    UpstreamClosed,
    UpstreamProtocolError,
)


class _WatchedSend:
    """An ASGI `send` that notes whether the answer has begun: once it has, an error can only
    cut it, not replace it with a 500."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


@dataclass
class _UpstreamRequest:
    model: str  # the configured model that serves it
    asked_for: str  # the name the client used (the model, or an alias)
    target: bytes  # path and query, exactly as routed
    body: bytes  # as the client sent it
    rename: bool = True  # the body's `model` becomes the name the backend knows the model by
    span: tuple[int, int] | None = None  # where the body holds the client's name, if known
    form: bool = False  # a multipart form (the span holds raw bytes, not a JSON string's)
    sent_as: str | None = None  # the backend's name for the model, as `sent` carries it
    sent: bytes = b""  # the body as the backend gets it

    def prepare(self, upstream_name: str) -> None:
        """Make the body for a backend that knows the model as `upstream_name`."""
        self.sent_as, self.sent = upstream_name, self._renamed(upstream_name)

    def _renamed(self, name: str) -> bytes:
        """The body naming `name` as its model. The name is put in place of the client's, so
        every other byte goes on as sent (numbers keep their digits, keys their order). Only a
        JSON body whose model could not be placed, or that names it twice (the backend would
        read the last, still the client's), is re-serialised: with ASCII escapes, so that any
        string valid JSON can hold, a lone surrogate `\\ud800` included, stays valid."""
        if not self.rename or self.asked_for == name:
            return self.body
        if self.span is not None:
            start, end = self.span
            value = name.encode() if self.form else json.dumps(name)[1:-1].encode()
            renamed = self.body[:start] + value + self.body[end:]
            if self.form or model_named_in(renamed) == name:
                return renamed
        payload = json.loads(self.body)
        payload["model"] = name
        return json.dumps(payload).encode()


def _not_served(asked_for: str, config: Config) -> ModelNotFound:
    known = ", ".join(config.models)
    return ModelNotFound(f"model {asked_for!r} is not served here; known models: {known}")


def _raw_path(scope: Scope) -> bytes:
    """The path as the client sent it (hypercorn always sets raw_path)."""
    return scope.get("raw_path") or scope["path"].encode("latin-1", errors="replace")


def _upstream_name(backend: ModelConfig) -> str:
    return backend.upstream_model or backend.name


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_error(send: Send, error: LlmuxError, end: bool = True) -> None:
    """The error in OpenAI shape; `end=False` leaves the (complete) answer open for the caller
    to end."""
    headers = [(b"content-type", b"application/json"), *error.headers()]
    body = error.body()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": not end})
