"""A lean OpenAI-style backend for benchmarks: raw asyncio, so that it is never the bottleneck.

POST with `"stream": true` answers `max_tokens` SSE events (chunked), `--event-interval` apart
(0: as fast as the socket takes them; otherwise numbered, one per chunk); any other POST
answers a small chat completion. Every GET answers 200 (alive checks).
Usage: python -m benchmarks.lean_backend --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re

CHAT = json.dumps(
    {
        "id": "bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
EVENT = (
    b'data: {"id":"bench","object":"chat.completion.chunk",'
    b'"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
)
CHUNKED_EVENT = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


def numbered_event(index: int) -> bytes:
    """One SSE event that says its place in the stream, chunked, as vLLM sends one per token."""
    event = EVENT.replace(b"tok ", b"tok %d" % index)
    return b"%x\r\n%s\r\n" % (len(event), event)


DONE = b"data: [DONE]\n\n"
CHUNKED_DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)
TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')


class Backend(asyncio.Protocol):
    interval = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            match = LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self.answer(head, body)

    def answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"GET"):
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        elif b'"stream": true' in body or b'"stream":true' in body:
            match = TOKENS.search(body)
            self.task = asyncio.ensure_future(self.stream(int(match.group(1)) if match else 16))
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(CHAT), CHAT)
            )

    async def stream(self, events: int) -> None:
        write = self.transport.write
        write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        if self.interval:
            # Paced like a model: one event per token, each on its own, numbered so that the
            # client can check that every one arrived, in order. Each is due at its own time
            # from the start, so that the pace does not drift with the loop's load.
            began = asyncio.get_running_loop().time()
            for index in range(events):
                due = began + (index + 1) * self.interval
                await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
                if self.transport.is_closing():
                    return
                write(numbered_event(index))
        else:
            for start in range(0, events, 64):
                write(CHUNKED_EVENT * min(64, events - start))
                await asyncio.sleep(0)  # let other connections write too
                if self.transport.is_closing():
                    return
        write(CHUNKED_DONE)


async def serve(port: int, interval: float) -> None:
    Backend.interval = interval
    server = await asyncio.get_running_loop().create_server(
        Backend, "127.0.0.1", port, backlog=4096
    )
    print(
        f"lean backend listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
        flush=True,
    )
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--event-interval", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.event_interval))


if __name__ == "__main__":
    main()
