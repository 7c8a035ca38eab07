"""llmux's upstream client beside httpx and httpcore, on trio, against the same lean backend:
CPU per request (small answers on one keep-alive connection) and per streamed event (one
stream of numbered events, as fast as the backend writes them). Interleaved rounds; medians.

    python -m benchmarks.upstream_client [--requests 3000] [--events 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpcore
import httpx
import trio

from benchmarks.__main__ import lean_backend
from llmux.http.upstream import UpstreamPool

PATH = b"/v1/chat/completions"


def body_of(tokens: int, stream: bool) -> bytes:
    flag = b', "stream": true' if stream else b""
    return b'{"model": "bench", "messages": [], "max_tokens": %d%s}' % (tokens, flag)


def head_of(port: int, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % (PATH, port, len(body))
    )


async def with_httpx(port: int, count: int, body: bytes) -> int:
    received = 0
    async with httpx.AsyncClient(timeout=None) as client:
        url = httpx.URL(f"http://127.0.0.1:{port}").copy_with(raw_path=PATH)
        for _ in range(count):
            request = client.build_request("POST", url, content=body)
            response = await client.send(request, stream=True)
            async for chunk in response.aiter_raw():
                received += len(chunk)
            await response.aclose()
    return received


async def with_httpcore(port: int, count: int, body: bytes) -> int:
    received = 0
    async with httpcore.AsyncConnectionPool() as pool:
        url = httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=PATH)
        headers = [(b"host", b"127.0.0.1:%d" % port), (b"content-length", b"%d" % len(body))]
        for _ in range(count):
            async with pool.stream("POST", url, headers=headers, content=body) as response:
                async for chunk in response.aiter_stream():
                    received += len(chunk)
    return received


async def with_llmux(port: int, count: int, body: bytes) -> int:
    received = 0
    pool = UpstreamPool(5.0)
    head = head_of(port, body)
    for _ in range(count):
        connection, response = await pool.request(port, head, body, method=b"POST")
        async for chunk in response.body():
            received += len(chunk)
        assert pool.release(port, connection, response)
    await pool.aclose()
    return received


CLIENTS = {"httpx": with_httpx, "httpcore": with_httpcore, "llmux": with_llmux}


def cpu_of(client, port: int, count: int, body: bytes) -> tuple[float, int]:
    began = time.process_time()
    received = trio.run(client, port, count, body)
    return time.process_time() - began, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backend = lean_backend()
    try:
        per_request: dict[str, list[float]] = {name: [] for name in CLIENTS}
        per_event: dict[str, list[float]] = {name: [] for name in CLIENTS}
        sizes: dict[str, set[int]] = {name: set() for name in CLIENTS}
        for _ in range(args.rounds):
            for name, client in CLIENTS.items():
                cpu, _ = cpu_of(client, backend.port, args.requests, body_of(1, False))
                per_request[name].append(cpu / args.requests * 1e6)
                cpu, received = cpu_of(client, backend.port, 1, body_of(args.events, True))
                per_event[name].append(cpu / args.events * 1e6)
                sizes[name].add(received)
    finally:
        backend.stop()
    print("| client | CPU per request | CPU per streamed event | vs llmux's client |")
    print("|---|---|---|---|")
    ours = statistics.median(per_request["llmux"]), statistics.median(per_event["llmux"])
    for name in CLIENTS:
        request, event = statistics.median(per_request[name]), statistics.median(per_event[name])
        print(
            f"| {name} | {request:.0f} us | {event:.2f} us "
            f"| {request / ours[0]:.2f}x / {event / ours[1]:.2f}x |"
        )
    # Every client read the same number of bytes of the stream (de-chunked).
    assert len({size for name in CLIENTS for size in sizes[name]}) == 1, sizes


if __name__ == "__main__":
    main()
