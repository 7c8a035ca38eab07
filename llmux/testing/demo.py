"""`llmux demo`: three fake backends, hooks that are real subprocesses, and the proxy on :3000.

Everything it writes lives in a temporary folder that is removed on exit; the backends run inside
this process, so Ctrl-C stops everything at once.
"""

from __future__ import annotations

import shlex
import signal
import sys
import tempfile
from pathlib import Path

import trio

from llmux.config import DEFAULT_POLICY, load_config
from llmux.server import RunningServer, serve_forever
from llmux.testing.fake_backend import FakeBackend, serve_fake_backend

DEMO_MODELS = ("llama", "qwen", "mistral")
WAKE_DELAY_SECS = 1.5
SLEEP_DELAY_SECS = 0.3
TOKEN_INTERVAL_SECS = 0.05


def llmux_command() -> str:
    """How a hook calls this very llmux: the one-file binary itself, or this interpreter."""
    if getattr(sys, "frozen", False):
        return shlex.quote(sys.executable)
    return shlex.join([sys.executable, "-m", "llmux"])


def demo_config_text(backend_ports: dict[str, int], host: str, port: int, folder: Path) -> str:
    command = llmux_command()
    lines = [
        f'host = "{host}"',
        f"port = {port}",
        "",
        "[server]",
        f'state_dir = "{folder / "state"}"  # everything the demo writes stays in its folder',
        "",
        "[policy]",
        f'name = "{DEFAULT_POLICY}"',
        "request_timeout_secs = 60",
        "",
    ]
    for name, backend_port in backend_ports.items():
        lines += [
            f"[models.{name}]",
            f"port = {backend_port}",
            f'wake = "{command} fake-ctl wake --port {backend_port}"',
            f'sleep = "{command} fake-ctl sleep --port {backend_port}"',
            f'alive = "{command} fake-ctl alive --port {backend_port}"',
            "",
        ]
    return "\n".join(lines)


def usage_text(url: str) -> str:
    first, second = DEMO_MODELS[0], DEMO_MODELS[1]
    return f"""
llmux demo: proxy on {url} with fake models {", ".join(DEMO_MODELS)}
(each wake takes {WAKE_DELAY_SECS}s; watch llmux switch between them)

  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{first}", "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{second}", "stream": true, "max_tokens": 20,
            "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl -s {url}/metrics | grep llmux_switch
  llmux top --url {url}

Press Ctrl-C to stop.
"""


async def run_demo(host: str = "127.0.0.1", port: int = 3000) -> None:
    # Held until the temp folder is gone: a second Ctrl-C (the one-file binary's bootloader
    # forwards the terminal's to us too) must not interrupt the clean-up.
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM),
        tempfile.TemporaryDirectory(prefix="llmux-demo-") as folder,
    ):
        async with trio.open_nursery() as nursery:
            ports: dict[str, int] = {}
            for name in DEMO_MODELS:
                backend = FakeBackend(
                    name,
                    wake_delay=WAKE_DELAY_SECS,
                    sleep_delay=SLEEP_DELAY_SECS,
                    token_interval=TOKEN_INTERVAL_SECS,
                )
                urls = await nursery.start(serve_fake_backend, backend)
                ports[name] = int(urls[0].rsplit(":", 1)[1])
            config_path = Path(folder) / "config.toml"
            config_path.write_text(demo_config_text(ports, host, port, Path(folder)))
            config = load_config(config_path)

            def announce(server: RunningServer) -> None:
                print(usage_text(server.url), flush=True)

            await serve_forever(config, on_ready=announce)
            nursery.cancel_scope.cancel()
