"""A lean HTTP/1.1 load generator on asyncio streams: keep-alive connections, latencies, SSE
event counting. The same client measures every target, so ratios compare like with like."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def request_bytes(path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(
    reader: asyncio.StreamReader, on_body: Callable[[bytes], None] | None = None
) -> tuple[int, float | None]:
    """Read one response; returns (status, time of the first body byte)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    first = None
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                return status, first
            data = await reader.readexactly(size + 2)
            if first is None:
                first = time.perf_counter()
            if on_body is not None:
                on_body(data)
    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    data = await reader.readexactly(length)
    first = time.perf_counter()
    if on_body is not None:
        on_body(data)
    return status, first


@dataclass
class LatencyRun:
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


async def latencies(port: int, payload: dict, concurrency: int, count: int) -> LatencyRun:
    """`count` requests over `concurrency` keep-alive connections; each latency in seconds."""
    run = LatencyRun()
    message = request_bytes("/v1/chat/completions", payload)
    per_connection = max(1, count // concurrency)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(per_connection):
                began = time.perf_counter()
                writer.write(message)
                status, _ = await read_response(reader)
                run.latencies.append(time.perf_counter() - began)
                assert status == 200, status
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.elapsed = time.perf_counter() - began
    return run


@dataclass
class StreamRun:
    events: int = 0
    elapsed: float = 0.0
    first_bytes: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0


async def streams(port: int, payload: dict, concurrency: int) -> StreamRun:
    """`concurrency` streams at once; counts SSE events and each stream's time to first byte."""
    run = StreamRun()
    message = request_bytes("/v1/chat/completions", {**payload, "stream": True})

    def count(data: bytes) -> None:
        run.events += data.count(b"data: {")

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            began = time.perf_counter()
            writer.write(message)
            status, first = await read_response(reader, count)
            assert status == 200, status
            if first is not None:
                run.first_bytes.append(first - began)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    run.elapsed = time.perf_counter() - began
    return run


async def open_streams(
    port: int, payload: dict, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open `count` long streams and read their headers; the caller closes the writers."""
    message = request_bytes("/v1/chat/completions", {**payload, "stream": True})

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(message)
        await reader.readuntil(b"\r\n\r\n")
        return reader, writer

    writers = []
    for start in range(0, count, 100):
        writers += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers
