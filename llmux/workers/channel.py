"""Messages between a worker and the controller, over a socket pair the worker inherits.

Why a socket pair and one message per request each way: a worker carries requests and streams,
the controller owns everything that decides (the switcher, hooks, policy, metrics). A worker
asks for a slot on a model and says when it is done with it; the events of a stream never cross
the channel. A worker that dies closes its end, and the controller releases its slots.

Each message is one JSON object, preceded by its length (4 bytes, big-endian).

Why every send has a deadline, and a channel can be broken off: a peer that is stopped or stuck
stops reading, its socket buffer fills, and a send to it would wait forever (holding the send
lock, so every later send too). A send that does not finish within its deadline gives up on the
peer: the channel is closed and marked `broken`, and the controller treats the worker as dead.
A send cancelled once part of its frame is out breaks the channel as well: the next frame would
be read as the rest of this one. So the receiving end never sees half a frame followed by more
bytes: it sees a whole frame, or the end. Bytes that do not parse as a message (or a message
that stalls midway) break the channel too, and raise ChannelClosed like any end of it.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import trio

HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a reload carries the config file's text
TIMEOUT_SECS = 5.0  # a peer that has not taken a message, or finished one, in this long is stuck


class ChannelClosed(Exception):
    """The other end closed the channel, or it was broken off (see `Channel.broken`)."""


class Channel:
    """Framed JSON messages on a connected trio socket; sends are serialised by a lock."""

    def __init__(self, sock: trio.socket.SocketType, timeout: float = TIMEOUT_SECS) -> None:
        self._socket = sock
        self.timeout = timeout
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self.broken: str | None = None  # why we gave up on the peer, if we did

    async def send(self, message: dict[str, Any], timeout: float | None = None) -> None:
        """Send one message within `timeout` (the channel's own if None), or raise
        ChannelClosed; a send that runs out of time breaks the channel off."""
        data = json.dumps(message, separators=(",", ":")).encode()
        frame = memoryview(HEADER.pack(len(data)) + data)
        timeout = self.timeout if timeout is None else timeout
        sent = 0
        with trio.move_on_after(timeout) as deadline:
            async with self._send_lock:
                try:
                    while sent < len(frame):
                        self._raise_if_closed()
                        sent += await self._socket.send(frame[sent:])
                    return
                except (OSError, trio.ClosedResourceError) as exc:
                    raise ChannelClosed(str(exc)) from None
                except trio.Cancelled:
                    if sent and not deadline.cancel_called:  # cancelled from outside
                        self.break_off("a message to it was cut off midway")
                    raise
        raise ChannelClosed(self.break_off(f"it took no message for {timeout:g} s"))

    async def receive(self) -> dict[str, Any]:
        """The next message, or ChannelClosed. The wait for one is not bounded (a quiet peer
        is fine), but once one has begun, it must go on within the channel's timeout."""
        while (message := self._take()) is None:
            with trio.move_on_after(self.timeout if self._buffer else math.inf) as stalled:
                chunk = await self._receive_some()
            if stalled.cancelled_caught:
                raise ChannelClosed(self.break_off(f"a message stalled for {self.timeout:g} s"))
            if not chunk:
                raise ChannelClosed("the other end closed" + (" midway" if self._buffer else ""))
            self._buffer += chunk
        return message

    def _take(self) -> dict[str, Any] | None:
        """The first whole message of the buffer, if there is one."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES:
            raise ChannelClosed(self.break_off(f"it sent a message of {length} bytes"))
        if len(self._buffer) < HEADER.size + length:
            return None
        data = bytes(self._buffer[HEADER.size : HEADER.size + length])
        del self._buffer[: HEADER.size + length]
        try:
            message = json.loads(data)
        except ValueError:  # not JSON, or not UTF-8
            message = None
        if not isinstance(message, dict):
            raise ChannelClosed(self.break_off("it sent a message that does not parse"))
        return message

    async def _receive_some(self) -> bytes:
        self._raise_if_closed()
        try:
            return await self._socket.recv(65536)
        except (OSError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(str(exc)) from None

    def _raise_if_closed(self) -> None:
        if self._socket.fileno() == -1:
            raise ChannelClosed(self.broken or "closed")

    def break_off(self, reason: str) -> str:
        """Give up on the peer: close the channel (a task waiting on it gets ChannelClosed)
        and remember why (the first reason given). Returns the reason."""
        if self.broken is None:
            self.broken = reason
        self._socket.close()
        return self.broken

    async def aclose(self) -> None:
        self._socket.close()
        await trio.lowlevel.checkpoint()


def pack(data: bytes) -> str:
    """Bytes in a JSON message (paths, bodies: not always text)."""
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text)


def pack_headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[pack(name), pack(value)] for name, value in headers]


def unpack_headers(packed: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(unpack(name), unpack(value)) for name, value in packed]
