"""Read a request body within its bounds, and find its `model` as soon as the bytes show it.

Why the early look: a body may be 32 MiB. Buffering all of it only to answer "this model's queue
is full" or "no such model" wastes memory under exactly the load that fills queues. So the body is
scanned as it arrives; once its top-level `model` string is seen, llmux can refuse at once, and
after answering reads (and drops, unbuffered) the rest, so that a client still sending gets to
read the answer and keeps its connection.

The scanner is a hint, not a parser: the full `json.loads` of the whole body stays the authority.
A body whose `model` differs between the two (a duplicated key: json.loads keeps the last) is
refused, so a backend never serves a request llmux admitted for another model.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import TYPE_CHECKING

from llmux.errors import BodyTooLarge, InvalidRequest
from llmux.http.asgi import Receive, Scope

if TYPE_CHECKING:
    from llmux.http.form import FormModelScanner

DISCARD_LIMIT_BYTES = 64 * 1024 * 1024


class ClientDisconnected(Exception):
    """The client went away while its body was still being read."""


class _Next(Enum):
    """What the scanner expects next inside the top-level object."""

    KEY = "key"
    COLON = "colon"
    VALUE = "value"
    COMMA = "comma"


_STRUCTURE = re.compile(rb'[{}\[\]:,"]')
_STRING_STOP = re.compile(rb'["\\]')


class ModelScanner:
    """Finds the top-level `"model": "<string>"` of a JSON object while its bytes arrive.

    Feed it the whole body so far (it resumes where it stopped; a long string is skipped with
    one regex search, never rescanned). `done` turns true when the model is found, the object
    ends without one, or the body is not shaped as expected; `model` then holds the name or None,
    and `span` where the name's string lies in the body, between its quotes (an alias is
    replaced there by the backend's name, the other bytes left as the client sent them).
    """

    def __init__(self) -> None:
        self.model: str | None = None
        self.span: tuple[int, int] | None = None
        self.done = False
        self._pos = 0
        self._depth = 0
        self._string_start: int | None = None  # inside a string that began here
        self._next = _Next.KEY
        self._key: str | None = None

    def feed(self, buf: bytes | bytearray) -> None:
        while not self.done and self._pos < len(buf):
            if self._string_start is not None:
                if not self._scan_string(buf):
                    return
                continue
            found = _STRUCTURE.search(buf, self._pos)
            if found is None:
                self._pos = len(buf)
                return
            skipped = buf[self._pos : found.start()]
            if self._depth == 0 and skipped.strip(b" \t\r\n"):
                self._give_up()  # not a JSON object
                return
            if self._depth == 1 and self._next is _Next.VALUE and skipped.strip(b" \t\r\n"):
                self._scalar_value()  # a number, true, false or null was the value
            self._pos = found.end()
            self._structure(found.group(), found.start())

    def _scan_string(self, buf: bytes | bytearray) -> bool:
        """Advance inside a string; False when the buffer ends before it does."""
        stop = _STRING_STOP.search(buf, self._pos)
        if stop is None:
            self._pos = len(buf)
            return False
        if buf[stop.start()] == 0x5C:  # a backslash escapes the next byte
            if stop.start() + 1 >= len(buf):
                self._pos = stop.start()
                return False
            self._pos = stop.start() + 2
            return True
        start, self._string_start = self._string_start, None
        assert start is not None
        self._pos = stop.end()
        self._string_ended(bytes(buf[start : stop.end()]), start)
        return True

    def _structure(self, char: bytes, at: int) -> None:
        if self._depth == 0:
            if char != b"{":
                self._give_up()
                return
            self._depth = 1
            self._next = _Next.KEY
        elif char == b'"':
            self._string_start = at
        elif char in b"{[":
            if self._depth == 1 and self._next is _Next.VALUE:
                if self._key == "model":
                    self._give_up()  # `model` is not a string: the full parse will say so
                    return
                self._next = _Next.COMMA
            self._depth += 1
        elif char in b"}]":
            self._depth -= 1
            if self._depth == 0:
                self.done = True  # the object ended without a `model`
        elif self._depth == 1 and char == b":":
            self._next = _Next.VALUE
        elif self._depth == 1 and char == b",":
            self._next, self._key = _Next.KEY, None

    def _string_ended(self, token: bytes, start: int) -> None:
        if self._depth != 1:
            return
        if self._next is _Next.KEY:
            self._key = self._decode(token)
            self._next = _Next.COLON
        elif self._next is _Next.VALUE:
            if self._key == "model":
                self.model = self._decode(token)
                self.span = (start + 1, start + len(token) - 1) if self.model is not None else None
                self.done = True
            self._next = _Next.COMMA

    def _scalar_value(self) -> None:
        if self._key == "model":
            self._give_up()
        self._next = _Next.COMMA

    def _decode(self, token: bytes) -> str | None:
        try:
            value = json.loads(token)
        except (UnicodeDecodeError, ValueError):
            self._give_up()
            return None
        return value if isinstance(value, str) else None

    def _give_up(self) -> None:
        self.model = self.span = None
        self.done = True


class BodyReader:
    """Reads one request body through ASGI `receive`, within `limit` bytes."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        limit: int,
        scanner: ModelScanner | FormModelScanner | None = None,
    ) -> None:
        self._receive = receive
        self._limit = limit
        self._body = bytearray()
        self._more = True
        self.scanner = scanner or ModelScanner()  # or a form's (form.FormModelScanner)
        self._declared = _declared_length(scope)

    @property
    def unread(self) -> bool:
        """Whether some of the body has not arrived yet."""
        return self._more

    def check_declared_length(self) -> None:
        """Refuse at once a body whose Content-Length is over the limit."""
        if self._declared is not None and self._declared > self._limit:
            raise BodyTooLarge(
                f"request body of {self._declared} bytes exceeds server.max_body_bytes "
                f"({self._limit})"
            )

    async def read_until_model(self) -> str | None:
        """Read until the scanner is done or the body ends; the model it saw, if any."""
        while self._more and not self.scanner.done:
            await self._read_chunk()
            self.scanner.feed(self._body)
        return self.scanner.model

    async def read_all(self) -> bytes:
        while self._more:
            await self._read_chunk()
        return bytes(self._body)

    async def discard_rest(self) -> None:
        """Read and drop what is left (up to DISCARD_LIMIT_BYTES), holding none of it."""
        self._body = bytearray()
        budget = DISCARD_LIMIT_BYTES
        while self._more and budget > 0:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            budget -= len(message.get("body", b""))
            self._more = message.get("more_body", False)

    async def _read_chunk(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        self._body += message.get("body", b"")
        self._more = message.get("more_body", False)
        if len(self._body) > self._limit:
            raise BodyTooLarge(f"request body exceeds server.max_body_bytes ({self._limit})")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header") from None
    return None


def model_named_in(body: bytes) -> str:
    """The `model` a JSON body names, by the full parse (the authority)."""
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
