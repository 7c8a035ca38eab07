"""The stack's floor: a trivial ASGI app on hypercorn and trio that streams the lean backend's
numbered events at the same pace itself, with no upstream. What it costs per event is what
hypercorn and trio cost, so llmux's figures are read against it, measured in the same run.

Usage: python -m benchmarks.floor_app --event-interval 0.02 [--backlog 2048]
"""

from __future__ import annotations

import argparse
import re
import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from benchmarks.lean_backend import CHAT, EVENT

TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')
DONE = b"data: [DONE]\n\n"


def app_for(interval: float):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[1]  # startup or shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if b'"stream": true' not in body and b'"stream":true' not in body:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": CHAT})
            return
        match = TOKENS.search(body)
        events = int(match.group(1)) if match else 16
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        began = trio.current_time()
        for index in range(events):
            await trio.sleep_until(began + (index + 1) * interval)
            event = EVENT.replace(b"tok ", b"tok %d" % index)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": DONE})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--event-interval", type=float, default=0.02)
    parser.add_argument("--backlog", type=int, default=2048)
    args = parser.parse_args()
    sock = socket.socket()  # bound here, so that its ephemeral port is known before serving
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.backlog = args.backlog
    config.accesslog = None
    config.keep_alive_max_requests = 1 << 30
    print(f"floor app listening on http://127.0.0.1:{port}", flush=True)
    trio.run(serve, app_for(args.event_interval), config)


if __name__ == "__main__":
    main()
