"""What a front in front of several boxes relies on: /health turning 503 when a drain begins,
a public per-model readiness answer, and `llmux haproxy`'s configuration (checked by HAProxy
itself when it is installed)."""

from __future__ import annotations

import json
import re
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
    assert routes["qwen"] == routes["Qwen/Qwen2.5-7B"]
    llama = config.split(f"backend {routes['llama']}")[1].split("\n\n")[0]
    assert "server box1 10.0.0.1:3000" in llama and "server box2 10.0.0.2:3000" in llama
    assert "hash-type consistent" in llama and "GET /health/llama" in llama
    qwen = config.split(f"backend {routes['qwen']}")[1].split("\n\n")[0]
    assert "box2" not in qwen and "GET /health/Qwen/Qwen2.5-7B" in qwen
    # An alias only box2 gives its llama goes to box2 alone: box1 would answer it 404.
    alias = config.split(f"backend {routes['gpt-4o-mini']}")[1].split("\n\n")[0]
    assert routes["gpt-4o-mini"] != routes["llama"] and "GET /health/gpt-4o-mini" in alias
    assert "box2" in alias and "box1" not in alias
    assert "retry-on 503 conn-failure empty-response" in config
    assert "option redispatch 1" in config and "option http-buffer-request" in config
    _haproxy_accepts(tmp_path, config, mapping)


def _haproxy_accepts(folder: Path, config: str, mapping: str) -> None:
    """`haproxy -c` finds the config valid, warnings included (the map at folder/m.map)."""
    haproxy = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: the config was not checked by it")
    (folder / "m.map").write_text(mapping)
    (folder / "haproxy.cfg").write_text(config)
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(folder / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr


# Valid model names (one printable word) holding every character HAProxy's config, its map
# files, its log-format strings, URL paths or JSON treat specially.
HOSTILE = "#it's\"a|b$c%d,(e)f;g{h}[i]/j:k?l&m=n+o~é<p>"
HOSTILE_ALIAS = "#%[var(txn.model)]'|"


def test_a_hostile_but_valid_name_is_escaped_wherever_it_is_written(tmp_path):
    boxes = [
        Box("box1", "http://10.0.0.1:3000", {HOSTILE: (HOSTILE_ALIAS,), "llama": ()}, True),
        Box("box2", "http://10.0.0.2:3000", {HOSTILE: ()}),
    ]
    config, mapping = haproxy_config(boxes, map_path=str(tmp_path / "m.map"))
    # One map line per name: a key (indented when it starts with `#`) and its backend.
    lines = mapping.splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 2 for line in lines)
    routes = dict(line.split() for line in lines)
    assert len({routes[HOSTILE], routes[HOSTILE_ALIAS], routes["llama"]}) == 3  # box1's alias
    assert all(line.startswith(" #") for line in lines if "#" in line)
    # One config line per entry: two model backends, the alias's, llmux_any; bodies one line.
    assert config.count("\nbackend ") == 4
    assert "GET /health/%23it%27s%22a%7Cb%24c%25d%2C%28e%29f%3Bg%7Bh%7D%5Bi%5D/j:k%3Fl" in config
    bodies = _bodies(config)
    assert len(bodies) == 8 + 2 + 3  # HAProxy's own errors, the front's two, one 503 a backend
    listing = bodies["http-response return status 200"]
    assert [m["id"] for m in listing["data"]] == [HOSTILE, HOSTILE_ALIAS, "llama"]
    assert listing["data"][1]["llmux"]["alias_of"] == HOSTILE
    not_found = bodies["http-response return status 404"]["error"]["message"]
    assert not_found == f"model 'ASKED' is not served here; known models: {HOSTILE}, llama"
    _haproxy_accepts(tmp_path, config, mapping)


def _bodies(config: str) -> dict[str, dict]:
    """Every JSON body in the config, by the words that come before it on its line, read as
    HAProxy reads a quoted word (a log-format's `%%` and its one sample made plain)."""
    bodies = {}
    for line in config.splitlines():
        found = re.search(
            r"^ +(.*?) content-type application/json (lf-)?string ('.*?')( if |$)", line
        )
        if found is None:
            continue
        text = found.group(3)[1:-1].replace("'\\''", "'")
        if found.group(2):
            text = re.sub(r"%\[[^\]]*\]", "ASKED", text).replace("%%", "%")
        key = found.group(1) if found.group(1) not in bodies else line
        bodies[key] = json.loads(text)
        if "error" in bodies[key]:
            assert set(bodies[key]["error"]) == {"message", "type", "code", "param"}
    return bodies


@pytest.mark.parametrize("name", ["two words", "line\nbreak", "bell\x07", "m" * 201])
def test_a_box_that_reports_a_name_no_map_line_can_hold_is_refused(name):
    boxes = [Box("box1", "http://10.0.0.1:3000", {"llama": (name,)})]
    with pytest.raises(ValueError, match="box1 serves a name the front cannot route"):
        haproxy_config(boxes, map_path="/m.map")


@pytest.mark.parametrize(
    ("option", "value"),
    [("bind", ":80 ssl"), ("check_interval", "1s\nbackend x"), ("map_path", "/a b/m.map"),
     ("map_path", "/m.map),x("), ("timeout", "10m#")],
)  # fmt: skip
def test_an_operator_value_haproxy_would_misread_is_refused(option, value):
    boxes = [Box("box1", "http://10.0.0.1:3000", {"llama": ()})]
    arguments = {"map_path": "/m.map", option: value}
    with pytest.raises(ValueError, match="HAProxy's config would misread"):
        haproxy_config(boxes, **arguments)
    with pytest.raises(ValueError, match="letters, digits"):
        haproxy_config([Box("box 1", "http://10.0.0.1:3000", {})], map_path="/m.map")


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
