"""Aliases and upstream names: other names route to a model, and the backend is sent the name it
knows the model by."""

from __future__ import annotations

import logging

import pytest

from llmux.config import ConfigError, load_config
from tests.conftest import (
    TEST_WORKERS,
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    stream_all,
    write_config,
)


async def test_aliases_route_and_the_backend_gets_its_upstream_name(fakes, tmp_path):
    llama, qwen = fakes.start("llama", "qwen", wake_delay=0.05)
    blocks = fake_model_block(
        llama, aliases=["gpt-4o-mini", "fast"], upstream_model="meta/llama-3.1-8b"
    ) + fake_model_block(qwen, aliases=["gpt-4o"])
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (_, client):
        by_alias = await client.post("/v1/chat/completions", json=chat("gpt-4o-mini"))
        by_name = await client.post("/v1/chat/completions", json=chat("llama"))
        status, text = await stream_all(client, "fast", 3)
        other = await client.post("/v1/chat/completions", json=chat("gpt-4o"))
        unknown = await client.post("/v1/chat/completions", json=chat("gpt-5"))
        listed = (await client.get("/v1/models")).json()["data"]
        metrics = (await client.get("/metrics")).text
    # The fake backend answers with the `model` it was sent.
    assert by_alias.status_code == 200
    assert by_alias.json()["model"] == "meta/llama-3.1-8b"
    assert by_name.json()["model"] == "meta/llama-3.1-8b"
    assert status == 200 and '"model": "meta/llama-3.1-8b"' in text.replace('":"', '": "')
    assert other.status_code == 200 and other.json()["model"] == "qwen"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    # Aliases are not listed unless asked for; metrics count requests under the model's name.
    assert [m["id"] for m in listed] == ["llama", "qwen"]
    assert 'llmux_requests_total{model="llama",status="200"} 3.0' in metrics
    assert llama.state()["wakes"] == 1  # one model, whatever it was called


async def test_v1_models_can_list_aliases(fakes, tmp_path):
    (llama,) = fakes.start("llama", wake_delay=0.05)
    path = write_config(
        tmp_path,
        fake_model_block(llama, aliases=["gpt-4o-mini"]),
        server={"list_aliases": True},
    )
    async with llmux_running(path) as (_, client):
        listed = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in listed] == ["llama", "gpt-4o-mini"]
    assert listed[1]["llmux"]["alias_of"] == "llama"


async def test_upstream_names_are_not_client_names_and_renames_rewrite(fakes, tmp_path):
    (llama,) = fakes.start("llama", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(llama, upstream_model="llama-upstream"))
    raw = b'{"model":"llama-upstream","messages":[{"role":"user","content":"\\u00e9"}]}'
    async with llmux_running(path) as (_, client):
        same = await client.post("/v1/chat/completions", content=raw)
    assert same.status_code == 404  # the upstream name is not a name clients use
    path = write_config(tmp_path, fake_model_block(llama, upstream_model="x/y"))
    async with llmux_running(path) as (_, client):
        renamed = await client.post(
            "/v1/chat/completions", content=raw.replace(b"llama-upstream", b"llama")
        )
    assert renamed.status_code == 200 and renamed.json()["model"] == "x/y"


async def test_any_valid_json_reaches_an_alias_with_only_its_model_changed(fakes, tmp_path, caplog):
    """A lone surrogate (`\\ud800`) is valid JSON that no UTF-8 encoder takes: it once made the
    rename fail after the model was woken, with a bare 500 nobody counted. Now the backend's
    name is put in place of the alias, and the client's other bytes go on untouched."""
    caplog.set_level(logging.INFO)
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a, aliases=["fast"], upstream_model="x/y"))
    odd = (
        b'{ "model" :  "fast" , "messages": [{"role": "user", "content": "\\ud800 caf\xc3\xa9"}],'
        b' "temperature": 0.10000000000000000001, "max_tokens": 3}'
    )
    twice = b'{"model": "fast", "messages": [], "model": "fast"}'
    async with llmux_running(path) as (_, client):
        surrogate = await client.post("/v1/chat/completions", content=odd)
        duplicated = await client.post("/v1/chat/completions", content=twice)
        metrics = (await client.get("/metrics")).text
    assert surrogate.status_code == 200, surrogate.text
    assert surrogate.json()["model"] == "x/y"  # the fake answers with the `model` it read
    assert duplicated.status_code == 200 and duplicated.json()["model"] == "x/y"
    sent = next(r for r in a.received()["recent"] if r["request"].startswith("POST /v1/"))
    # Only the name changed length: the rest (spaces, digits, UTF-8) went on byte for byte.
    assert int(dict(sent["headers"])["content-length"]) == len(odd) - len("fast") + len("x/y")
    assert metric_value(metrics, "llmux_requests_total", model="a", status="200") == 2
    assert metric_value(metrics, "llmux_internal_errors_total") == 0
    if TEST_WORKERS == 1:  # with workers, they write the request lines
        logged = [r.fields for r in caplog.records if getattr(r, "event", None) == "request"]
        assert [(f["model"], f["status"]) for f in logged] == [("a", 200), ("a", 200)]
    assert a.state()["wakes"] == 1


@pytest.mark.parametrize(
    ("blocks", "problem"),
    [
        ('aliases = ["b"]', "'b' is already a model's name"),
        ('aliases = ["x"]\n[models.b]\nport = 2\nwake = "true"\nsleep = "true"\naliases = ["x"]',
         "'x' is also an alias of 'a'"),
        ('aliases = [""]', "must be a non-empty string"),
        ('upstream_model = " "', "must not be empty"),
        ("memory_gb = 10\nsize = 2", "memory_gb or size, not both"),
        ("memory_gb = -1", "must be a positive number"),
        ("ttl_secs = -5", "must be zero or a positive number"),
    ],
)  # fmt: skip
def test_bad_aliases_and_sizes_are_refused(tmp_path, blocks, problem):
    text = f'[models.a]\nport = 1\nwake = "true"\nsleep = "true"\n{blocks}\n'
    if "[models.b]" not in text:
        text += '[models.b]\nport = 2\nwake = "true"\nsleep = "true"\n'
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_resolve_names_and_aliases(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[models.a]\nport = 1\nwake = "true"\nsleep = "true"\naliases = ["gpt-4o-mini"]\n'
    )
    config = load_config(path)
    assert config.resolve("a") == "a"
    assert config.resolve("gpt-4o-mini") == "a"
    assert config.resolve("gpt-4o") is None
    assert config.models["a"].aliases == ("gpt-4o-mini",)
