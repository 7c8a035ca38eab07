"""Messages between a worker and the controller, over a socket pair the worker inherits.

Why a socket pair and one message per request each way: a worker carries requests and streams,
the controller owns everything that decides (the switcher, hooks, policy, metrics). A worker
asks for a slot on a model and says when it is done with it; the events of a stream never cross
the channel. A worker that dies closes its end, and the controller releases its slots.

Each message is one JSON object, preceded by its length (4 bytes, big-endian).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import trio

HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a reload carries the config file's text


class ChannelClosed(Exception):
    """The other end closed the channel (or it broke)."""


class Channel:
    """Framed JSON messages on a trio stream; sends are serialised by a lock."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        async with self._send_lock:
            try:
                await self._stream.send_all(HEADER.pack(len(data)) + data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelClosed(str(exc)) from None

    async def receive(self) -> dict[str, Any]:
        while True:
            if len(self._buffer) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buffer)
                if length > MAX_MESSAGE_BYTES:
                    raise ChannelClosed(f"a message of {length} bytes")
                if len(self._buffer) >= HEADER.size + length:
                    data = bytes(self._buffer[HEADER.size : HEADER.size + length])
                    del self._buffer[: HEADER.size + length]
                    return json.loads(data)
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelClosed(str(exc)) from None
            if not chunk:
                raise ChannelClosed("the other end closed")
            self._buffer += chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def pack(data: bytes) -> str:
    """Bytes in a JSON message (paths, bodies: not always text)."""
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text)


def pack_headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[pack(name), pack(value)] for name, value in headers]


def unpack_headers(packed: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(unpack(name), unpack(value)) for name, value in packed]
