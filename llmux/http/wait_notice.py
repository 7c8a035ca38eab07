"""What a streaming request says while it waits for its model (`[server] stream_wait_notice`).

A wake can take a minute. A client, or a proxy between it and llmux, that hears nothing that
long may give up on the connection, and the person behind it does not know why it waits. So a
request that asked to stream (`"stream": true`) and still waits after WAIT_NOTICE_AFTER_SECS
gets its answer's head (200, text/event-stream) at once, then an SSE comment such as
`: waiting for qwen to wake, 2nd in line, about 7 s` every WAIT_NOTICE_EVERY_SECS. Comments are
part of SSE and every client skips them, OpenAI's SDKs included.

Once that head is out, a failure cannot be a status any more: it goes as an OpenAI-style error
event, `data: {"error": {...}}`, and the stream ends there, without `data: [DONE]` (which says
the answer is complete: a client that reads up to it would take the error for an empty answer).
The access log and the metrics keep the failure's own status, not the 200.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import trio

from llmux.core.waiting import WaitView
from llmux.errors import error_body
from llmux.http.asgi import Send
from llmux.http.listener import current_connection
from llmux.runtime.driver import WaitTicket

WAIT_NOTICE_AFTER_SECS = 1.0  # a wait shorter than this is not told: the answer comes as usual
# Every this long: less than the idle timeouts clients and proxies commonly keep (5 s at least).
WAIT_NOTICE_EVERY_SECS = 3.0
MAX_ERROR_BODY_BYTES = 64 * 1024  # of a backend's error answer, turned into an error event

HEAD = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each notice on as it comes
]


def asks_to_stream(body: bytes) -> bool:
    """Whether a JSON request body asks for a streamed answer (`"stream": true`)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # a body nested too deep asks for nothing
        return False
    return isinstance(payload, dict) and payload.get("stream") is True


def notice_text(view: WaitView) -> str:
    """The comment's words: for whom it waits, its place in line, and for how long."""
    model = " ".join(view.model.split())  # one line, whatever the configured name holds
    where = f"{_ordinal(view.position)} in line"
    if view.awake:
        return f"waiting for a free slot on {model}, {where}"
    text = f"waiting for {model} to {'start' if view.cold else 'wake'}, {where}"
    if view.seconds is not None and view.seconds >= 1:
        text += f", about {round(view.seconds)} s"
    return text


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def error_event(body: bytes) -> bytes:
    """An OpenAI error body (errors.py's shape) as the stream's last event."""
    return b"data: " + body + b"\n\n"


def backend_error_event(status: int, body: bytes) -> bytes:
    """A backend's error answer (a prompt too long, a 5xx) as an error event: its own error
    object if it sent one, on one line; else one in llmux's shape that names its status."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return error_event(json.dumps({"error": payload["error"]}).encode())
    client_error = 400 <= status < 500
    kind = "invalid_request_error" if client_error else "server_error"
    text = body[:500].decode(errors="replace")
    message = f"the backend answered {status}" + (f": {text}" if text else "")
    return error_event(error_body(message, kind, "backend_error"))


class StreamWaitNotice:
    """The notices of one waiting stream: `run` in the request's nursery, `stop` once the slot
    is granted (or the wait failed); `head_sent` says whether the answer has begun."""

    def __init__(self, send: Send, where: Callable[[WaitTicket], Awaitable[WaitView | None]]):
        self.ticket = WaitTicket()
        self.head_sent = False
        self._send = send
        self._where = where
        self._scope = trio.CancelScope()
        self._sending = trio.Lock()
        self._connection = current_connection.get()

    async def run(self) -> None:
        with self._scope:
            await trio.sleep(WAIT_NOTICE_AFTER_SECS)
            while True:
                view = await self._where(self.ticket)
                if view is not None:  # (None: granted meanwhile, or not in line: nothing to say)
                    async with self._sending:
                        # Never cut midway: the stream's next bytes would follow half a line.
                        with trio.CancelScope(shield=True):
                            await self._say(notice_text(view))
                if self._connection is not None and self._connection.send_timed_out:
                    return  # cut by client_send_timeout_secs: nobody reads what follows
                await trio.sleep(WAIT_NOTICE_EVERY_SECS)

    async def _say(self, text: str) -> None:
        if not self.head_sent:
            await self._send({"type": "http.response.start", "status": 200, "headers": HEAD})
            self.head_sent = True
        line = f": {text}\n\n".encode()
        await self._send({"type": "http.response.body", "body": line, "more_body": True})

    async def stop(self) -> None:
        """No notice goes out once this returns (one being sent is finished first)."""
        self._scope.cancel()
        async with self._sending:
            pass
