"""What a front in front of several boxes relies on: /health turning 503 when a drain begins,
a public per-model readiness answer, and `llmux haproxy`'s configuration (checked by HAProxy
itself when it is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from llmux.fronts.haproxy import Box, haproxy_config
from tests.conftest import chat, fake_model_block, llmux_running, write_config


async def test_health_says_draining_and_each_model_says_if_it_is_ready(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=0.05)
    path = write_config(tmp_path, fake_model_block(a, aliases=["gpt-4o-mini"]))
    path.write_text(path.read_text() + '\n[auth]\napi_keys = ["sk-1"]\n')
    async with llmux_running(path) as (server, client):
        # Public, like /health: no key; an asleep model is ready (asking for it wakes it).
        answer = await client.get("/health/a")
        assert answer.status_code == 200
        assert answer.json() == {"model": "a", "ready": True, "state": "asleep"}
        assert (await client.get("/health/gpt-4o-mini")).json()["model"] == "a"
        unknown = await client.get("/health/nope")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert (await client.get("/v1/models")).status_code == 401  # the rest still needs a key
        assert (await client.get("/health")).status_code == 200

        key = {"authorization": "Bearer sk-1"}
        async with trio.open_nursery() as nursery:

            async def long_stream() -> None:
                body = chat("a", stream=True, max_tokens=40)
                async with client.stream(
                    "POST", "/v1/chat/completions", json=body, headers=key
                ) as response:
                    async for _ in response.aiter_bytes():
                        pass

            nursery.start_soon(long_stream)
            await trio.sleep(0.5)
            server.request_shutdown()  # the drain begins; the stream keeps it open
            await trio.sleep(0.3)
            health = await client.get("/health")
            assert health.status_code == 503 and health.json() == {"status": "draining"}
            ready = await client.get("/health/a")
            assert ready.status_code == 503 and ready.json()["ready"] is False


def test_the_haproxy_config_routes_every_model_and_alias_to_the_boxes_serving_it(tmp_path):
    boxes = [
        Box("box1", "http://10.0.0.1:3000", {"Qwen/Qwen2.5-7B": ("qwen",), "llama": ()}),
        Box("box2", "http://10.0.0.2:3000", {"llama": ("gpt-4o-mini",)}),
    ]
    config, mapping = haproxy_config(boxes, map_path=str(tmp_path / "m.map"))
    routes = dict(line.split() for line in mapping.splitlines())
    assert routes["qwen"] == routes["Qwen/Qwen2.5-7B"] and routes["gpt-4o-mini"] == routes["llama"]
    llama = config.split(f"backend {routes['llama']}")[1].split("\n\n")[0]
    assert "server box1 10.0.0.1:3000" in llama and "server box2 10.0.0.2:3000" in llama
    assert "hash-type consistent" in llama and "GET /health/llama" in llama
    qwen = config.split(f"backend {routes['qwen']}")[1].split("\n\n")[0]
    assert "box2" not in qwen and "GET /health/Qwen/Qwen2.5-7B" in qwen
    assert "retry-on 503 conn-failure empty-response" in config
    assert "option redispatch 1" in config and "option http-buffer-request" in config
    haproxy = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: the config was not checked by it")
    (tmp_path / "m.map").write_text(mapping)
    (tmp_path / "haproxy.cfg").write_text(config)
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_llmux_haproxy_says_which_box_it_cannot_read(tmp_path):
    from tests.conftest import PYTHON, free_port

    port = free_port()
    made = subprocess.run(
        [PYTHON, "-m", "llmux", "haproxy", f"box1=http://127.0.0.1:{port}", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert made.returncode == 2
    assert made.stderr.startswith(f"llmux: box1 (http://127.0.0.1:{port}): cannot read")
    assert not (tmp_path / "haproxy.cfg").exists()


EXAMPLE = Path(__file__).parents[1] / "examples" / "several-boxes"
EXAMPLE_BOXES = [
    Box("box1", "http://10.0.0.1:3000", {"llama": ("gpt-4o-mini",), "qwen": ()}),
    Box("box2", "http://10.0.0.2:3000", {"qwen": (), "mistral": ()}),
    Box("box3", "http://10.0.0.3:3000", {"llama": ("gpt-4o-mini",), "mistral": ()}),
]


def test_the_example_is_what_llmux_haproxy_writes_for_its_three_boxes():
    config, mapping = haproxy_config(EXAMPLE_BOXES, map_path="/etc/haproxy/llmux-models.map")
    assert (EXAMPLE / "haproxy.cfg").read_text() == config
    assert (EXAMPLE / "llmux-models.map").read_text() == mapping
