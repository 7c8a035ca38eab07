"""Streams at a model's pace, as users feel them: each stream's steady rate and its time to
first token, through llmux, beside the backend direct, the stack's floor and nginx.

A case is N streams of E numbered events, one per chunk, `interval` apart (50 tokens/s is
0.02 s), started all at once ("burst") or spread over one second ("ramp"). Per stream the
client notes when it started, when each event came and whether every event came, in order.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass, field

from benchmarks.loadgen import read_response, request_bytes

NUMBER = re.compile(rb'"content":"tok (\d+)"')
CONNECT_ATTEMPTS = 50  # a burst may meet a full listen queue: the kernel retries the SYN


@dataclass
class Stream:
    started: float = 0.0
    first: float | None = None
    last: float = 0.0
    events: int = 0
    in_order: bool = True
    error: str = ""

    @property
    def steady_rate(self) -> float | None:
        """Events per second after the first one: the pace the client sees once it flows."""
        if self.first is None or self.events < 2 or self.last <= self.first:
            return None
        return (self.events - 1) / (self.last - self.first)


@dataclass
class PacedRun:
    expected: int
    streams: list[Stream] = field(default_factory=list)

    @property
    def complete(self) -> int:
        """Streams that delivered every event, in order."""
        return sum(1 for s in self.streams if s.events == self.expected and s.in_order)

    def rates(self) -> list[float]:
        return [r for s in self.streams if (r := s.steady_rate) is not None]

    def first_tokens(self) -> list[float]:
        return [s.first - s.started for s in self.streams if s.first is not None]


async def paced_streams(port: int, count: int, events: int, ramp: float) -> PacedRun:
    run = PacedRun(expected=events)
    message = request_bytes(
        "/v1/chat/completions",
        {"model": "bench", "messages": [], "max_tokens": events, "stream": True},
    )

    async def one(index: int) -> None:
        stream = Stream()
        run.streams.append(stream)
        if ramp:
            await asyncio.sleep(ramp * index / count)
        stream.started = time.perf_counter()

        def on_body(data: bytes) -> None:
            now = time.perf_counter()
            for match in NUMBER.finditer(data):
                if int(match.group(1)) != stream.events:
                    stream.in_order = False
                stream.events += 1
                if stream.first is None:
                    stream.first = now
                stream.last = now

        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(message)
            status, _ = await read_response(reader, on_body)
            if status != 200:
                stream.error = f"status {status}"
        except (OSError, asyncio.IncompleteReadError) as exc:
            stream.error = repr(exc)
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return run


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def summary(run: PacedRun) -> dict[str, float]:
    firsts = run.first_tokens()
    return {
        "rate": statistics.median(run.rates()) if run.rates() else float("nan"),
        "ttft_p50": percentile(firsts, 0.50),
        "ttft_p99": percentile(firsts, 0.99),
        "lost": float(len(run.streams) - run.complete),
    }
