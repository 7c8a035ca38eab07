"""The errors a client can get, each mapped once to an HTTP status and the OpenAI error shape."""

from __future__ import annotations

import json


class LlmuxError(Exception):
    """An error that ends a request with an OpenAI-shaped JSON body."""

    status = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.code)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers this answer needs besides the body's (Retry-After, Allow, ...)."""
        return []


def retry_after_header(seconds: int) -> tuple[bytes, bytes]:
    """The Retry-After header: when a client may well be served (SDKs wait that long)."""
    return (b"retry-after", str(seconds).encode())


class InvalidRequest(LlmuxError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidPath(LlmuxError):
    """A path that means different things to different servers (dot segments, backslashes,
    an encoded slash outside a model name, not origin form): refused, never forwarded."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_path"


class InvalidQuery(LlmuxError):
    """A query string with bytes a client would have percent-encoded (a space, a raw `#`,
    anything outside printable ASCII): it would reach the backend's request line as is."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_query"


class AmbiguousFraming(LlmuxError):
    """Both Content-Length and Transfer-Encoding: servers on the way may split the stream into
    requests differently (request smuggling). Refused, and the connection is closed after."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


class Unauthorized(LlmuxError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer")]


class RequestTimeout(LlmuxError):
    """The client took longer than request_body_timeout_secs to send its body."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class QueueFull(LlmuxError):
    """Too many requests already wait for this model (max_queue_per_model)."""

    status = 503
    error_type = "server_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [retry_after_header(self.retry_after)]


class HeadersTooLarge(LlmuxError):
    status = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class RouteNotFound(LlmuxError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(LlmuxError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allowed).encode())]


class ModelNotFound(LlmuxError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class BodyTooLarge(LlmuxError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class BackendUnavailable(LlmuxError):
    """The active model's server refused, broke or answered nonsense."""

    status = 502
    error_type = "server_error"
    code = "backend_unavailable"


class BackendTimeout(LlmuxError):
    """The backend sent no first byte within its model's first_byte_timeout_secs."""

    status = 504
    error_type = "timeout_error"
    code = "backend_timeout"


class ModelUnavailable(LlmuxError):
    """The model could not be made active (a hook failed, or a switch was abandoned).

    A client is told whether to try again: `retry_after` seconds (Retry-After) when a retry may
    well succeed by then; `retry=False` (x-should-retry: false, which OpenAI's SDKs obey) when
    a retry within seconds cannot help, so that an SDK's automatic retries do not repeat a slow
    failure."""

    status = 503
    error_type = "server_error"
    code = "model_unavailable"
    retry = True

    def __init__(self, message: str, retry_after: int | None = None, retry: bool | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        if retry is not None:
            self.retry = retry

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = []
        if self.retry_after is not None:
            headers.append(retry_after_header(self.retry_after))
        if not self.retry:
            headers.append((b"x-should-retry", b"false"))
        return headers


class GpuMemoryShort(ModelUnavailable):
    """The model's GPUs did not have the memory to wake it, after waiting for it: a retry at
    once would wait again for what a sleeper keeps."""

    retry = False


class ServerNotStarted(ModelUnavailable):
    """The model's `cmd` server failed to start, and is not started again before its back-off
    ends (core/start_backoff.py): a retry sooner is refused the same way, a retry later starts
    it once more. Retry-After says when."""

    retry = False


SHUTDOWN_RETRY_AFTER_SECS = 5  # a restarted llmux (or another at that address) serves by then


class ShuttingDown(LlmuxError):
    """llmux stops taking requests (a restart, a deploy): transient for a client, which may try
    again in a few seconds."""

    status = 503
    error_type = "server_error"
    code = "shutting_down"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [retry_after_header(SHUTDOWN_RETRY_AFTER_SECS)]


class QueueTimeout(LlmuxError):
    status = 504
    error_type = "timeout_error"
    code = "queue_timeout"


class InternalError(LlmuxError):
    """A bug of llmux's: an error no other class names. The client learns only that; the log
    has the traceback (event `internal_error`)."""

    status = 500
    error_type = "server_error"
    code = "internal_error"


def error_body(message: str, error_type: str, code: str) -> bytes:
    """Serialise an error in the shape OpenAI clients parse: {"error": {message, type, code}}."""
    payload = {"error": {"message": message, "type": error_type, "code": code, "param": None}}
    return json.dumps(payload).encode()
