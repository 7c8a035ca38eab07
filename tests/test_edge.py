"""The edge, end to end: only the route table's paths reach a backend, exactly as routed, and
the client's credentials and hop-by-hop headers stay at llmux."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    raw_exchange,
    raw_post,
    write_config,
)

KEY = "sk-client-0123456789"
BODY = json.dumps({"model": "a", "messages": []}).encode()

# Every spelling of "one level up" a server might resolve, each aimed at vLLM's POST /sleep.
TRAVERSALS = [
    "/v1/../sleep?level=2",
    "/v1/chat/completions/../../sleep",
    "/v1/%2e%2e/sleep",
    "/v1/%2E%2E/sleep",
    "/v1/.%2e/sleep",
    "/v1/%2e./sleep",
    "/v1/%252e%252e/sleep",
    "/v1/%25252e%25252e/sleep",
    "/v1/..%2fsleep",
    "/v1/..%2Fsleep",
    "/v1/%2e%2e%2fsleep",
    "/v1/./../sleep",
    "/v1/.",
    "/v1/..",
    "/v1\\..\\sleep",
    "/v1/%5c..%5csleep",
    "/v1/chat%2fcompletions",
    "//sleep",
    "/v1//../sleep",
    "http://127.0.0.1:1/sleep",
    "*",
    "/v1/chat/completions#x",
]


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _error_code(answer: bytes) -> str:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"]


def _llmux_targets(received: dict) -> set[str]:
    """What reached a fake backend, apart from what its hooks asked for."""
    hooks = {"POST /fake/wake", "POST /fake/sleep", "GET /fake/alive", "GET /fake/state"}
    return set(received["targets"]) - hooks


async def test_no_traversal_reaches_a_backend_control_api(fakes, tmp_path):
    (a,) = fakes.start("a", api="vllm", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        for target in TRAVERSALS:
            answer = await raw_exchange(server.url, raw_post(target, BODY))
            assert _status(answer) == 400, (target, answer)
            assert _error_code(answer) == "invalid_path", target
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
    state = a.state()
    assert state["state"] == "awake" and state["sleeps"] == 0
    assert _llmux_targets(a.received()) == {"POST /v1/chat/completions"}


async def test_a_query_holding_what_clients_encode_is_refused_and_reaches_no_backend(
    fakes, tmp_path
):
    """The query goes upstream as received: a raw `#` would reach the backend's request line
    (which reads it as a fragment), as would a space or any other byte over HTTP/2."""
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a, passthrough_paths=["/tokenize"]))
    async with llmux_running(path) as (server, _):
        for target in (
            b"/v1/chat/completions?a#b",
            b"/v1/completions?x=1#",
            b"/upstream/a/tokenize?#x",
        ):
            answer = await raw_exchange(server.url, raw_post(target.decode(), BODY))
            assert _status(answer) == 400, (target, answer)
            assert _error_code(answer) == "invalid_query", target
        # A space or a byte outside ASCII breaks the HTTP/1.1 request line itself.
        for target in (b"/v1/chat/completions?a b", b"/v1/chat/completions?a=\xff"):
            data = raw_post("TARGET", BODY).replace(b"TARGET", target)
            answer = await raw_exchange(server.url, data)
            assert _status(answer) == 400, (target, answer)
            assert _error_code(answer) == "invalid_request", target
    assert _llmux_targets(a.received()) == set()
    assert a.state()["wakes"] == 0


async def _http2_prior_knowledge(url: str, target: bytes) -> list[h2.events.Event]:
    """One POST over HTTP/2 without TLS or upgrade (h2c with prior knowledge); the events that
    came back until the stream or the connection ended (or 5 s passed)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"llmux")]
    connection.send_headers(1, [*head, (b":path", target), (b"content-type", b"application/json")])
    connection.send_data(1, BODY, end_stream=True)
    events: list[h2.events.Event] = []
    ended = (h2.events.StreamEnded, h2.events.ConnectionTerminated)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(connection.data_to_send())
        with trio.move_on_after(5):
            while data := await stream.receive_some(65536):
                events += connection.receive_data(data)
                if any(isinstance(event, ended) for event in events):
                    break
                await stream.send_all(connection.data_to_send())
    return events


async def test_http2_without_tls_is_refused_at_once_and_reaches_no_backend(fakes, tmp_path):
    """llmux speaks HTTP/1.1 only (docs/security.md, "Protocol"): HTTP/2 with prior knowledge gets
    HTTP/2's own refusal, GOAWAY with HTTP_1_1_REQUIRED, and `Upgrade: h2c` is ignored. Over
    HTTP/2 the query of `:path` could hold a space or any byte, sent on to the backend."""
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    targets = [b"/v1/chat/completions", b"/v1/chat/completions?a b", b"/v1/completions?a#\xff"]
    async with llmux_running(path) as (server, _):
        for target in targets:
            began = trio.current_time()
            events = await _http2_prior_knowledge(server.url, target)
            assert trio.current_time() - began < 2, "a refusal, not a hang"
            assert not [e for e in events if isinstance(e, h2.events.ResponseReceived)], events
            (ended,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert ended.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
            assert ended.last_stream_id == 0  # no stream was taken: safe to retry over HTTP/1.1
        upgrade = (
            b"GET /v1/models HTTP/1.1\r\nhost: llmux\r\nconnection: Upgrade, HTTP2-Settings, "
            b"close\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        answer = await raw_exchange(server.url, upgrade)
        assert answer.startswith(b"HTTP/1.1 200 "), answer  # answered, not switched (101)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["object"] == "list"
    assert _llmux_targets(a.received()) == set()
    assert a.state()["wakes"] == 0


async def test_a_websocket_upgrade_gets_a_clear_refusal_not_a_bare_500(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    upgrade = (
        b"GET /v1/models HTTP/1.1\r\nhost: llmux\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    async with llmux_running(path) as (server, _):
        answer = await raw_exchange(server.url, upgrade)
    assert _status(answer) == 400, answer
    assert _error_code(answer) == "invalid_request"
    assert _llmux_targets(a.received()) == set()


async def test_only_the_route_table_is_forwarded_and_exactly_as_routed(fakes, tmp_path):
    (a,) = fakes.start("a", api="vllm", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        for target in ("/v1/load_lora_adapter", "/v1/chat/completions/x", "/sleep", "/v1/x"):
            response = await client.post(target, json={"model": "a", "lora_name": "x"})
            assert response.status_code == 404, target
            assert response.json()["error"]["code"] == "not_found"
        routed = ("/v1/completions?foo=bar&x=%2e%2e/y", "/v1/embeddings", "/rerank", "/infill")
        for target in routed:
            answer = await raw_exchange(server.url, raw_post(target, BODY))
            assert _status(answer) == 200, answer
        wrong = await client.put("/v1/chat/completions", json=chat("a"))
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert _llmux_targets(a.received()) == {f"POST {target}" for target in routed}


async def test_passthrough_reaches_only_allow_listed_paths(fakes, tmp_path):
    a, b = fakes.start("a", "b/c", api="vllm", wake_delay=0.05)
    path = write_config(
        tmp_path,
        fake_model_block(a, passthrough_paths=["/tokenize", "/v1/load_lora_adapter"])
        + fake_model_block(b),
    )
    async with llmux_running(path) as (server, client):
        forwarded = await client.post("/upstream/a/tokenize?add_special=1", json={"x": 1})
        assert forwarded.status_code == 404  # the fake has no /tokenize: its own answer
        assert forwarded.json()["error"]["message"] == "no route POST /tokenize"
        lora = await client.post("/upstream/a/v1/load_lora_adapter", json={"lora_name": "x"})
        assert lora.status_code == 200  # the fake answers any POST under /v1/
        for target in (
            "/upstream/a/tokenizer",
            "/upstream/a/sleep",
            "/upstream/a/",
            "/upstream/b%2Fc/tokenize",
            "/upstream/nope/tokenize",
        ):
            response = await client.post(target, json={})
            assert response.status_code == 404, target
        for target in ("/upstream/a/tokenize/../../sleep", "/upstream/a/tokenize/%2e%2e/sleep"):
            answer = await raw_exchange(server.url, raw_post(target, b"{}"))
            assert _status(answer) == 400, target
        assert (await client.post("/upstream/a%2Fx/tokenize", json={})).status_code == 404
    assert _llmux_targets(a.received()) == {
        "POST /tokenize?add_special=1",
        "POST /v1/load_lora_adapter",
    }
    assert _llmux_targets(b.received()) == set()
    assert a.state()["sleeps"] == 0


def _headers_seen(backend) -> dict[str, str]:
    (last,) = [r for r in backend.received()["recent"] if r["request"].startswith("POST /v1/")][-1:]
    return {name: value for name, value in last["headers"]}


@pytest.mark.parametrize("key_header", ["authorization", "x-api-key"])
async def test_client_credentials_and_connection_named_headers_stay_at_llmux(
    fakes, tmp_path, key_header
):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), top=f'[auth]\napi_keys = ["{KEY}"]\n')
    presented = f"Bearer {KEY}" if key_header == "authorization" else KEY
    headers = (
        f"{key_header}: {presented}\r\nx-api-key: {KEY}\r\nx-hop-secret: 1\r\nx-trace: kept\r\n"
    )
    async with llmux_running(path) as (server, _):
        hop = raw_post("/v1/chat/completions", BODY, headers).replace(
            b"connection: close", b"connection: close, x-hop-secret"
        )
        answer = await raw_exchange(server.url, hop)
        assert _status(answer) == 200, answer
    seen = _headers_seen(a)
    assert "authorization" not in seen and "x-api-key" not in seen
    assert "x-hop-secret" not in seen
    assert seen["connection"] == "keep-alive"  # llmux's own hop to the backend
    assert seen["x-trace"] == "kept"


async def test_backend_key_replaces_the_clients_and_without_llmux_keys_it_passes(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(
        tmp_path, fake_model_block(a, backend_api_key="backend-secret") + fake_model_block(b)
    )
    async with llmux_running(path) as (_, client):
        mine = {"authorization": "Bearer for-the-backend"}
        assert (await client.post("/v1/chat/completions", json=chat("a"), headers=mine)).is_success
        assert _headers_seen(a)["authorization"] == "Bearer backend-secret"
        # llmux checks no keys here: the client's key is for the backend, and goes on.
        assert (await client.post("/v1/chat/completions", json=chat("b"), headers=mine)).is_success
        assert _headers_seen(b)["authorization"] == "Bearer for-the-backend"


async def test_anthropic_sdk_key_header_is_accepted(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), top=f'[auth]\napi_keys = ["{KEY}"]\n')
    async with llmux_running(path) as (_, client):
        body = {"model": "a", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
        good = await client.post("/v1/messages", json=body, headers={"x-api-key": KEY})
        bad = await client.post("/v1/messages", json=body, headers={"x-api-key": "sk-wrong"})
    assert (good.status_code, bad.status_code) == (200, 401)


async def test_the_anthropic_sdk_through_llmux_with_its_key_header(fakes, tmp_path):
    """Anthropic's own SDK (it sends `x-api-key`): a message and a streamed message reach the
    model they name, and the key is checked and not forwarded."""
    anthropic = pytest.importorskip("anthropic")
    a, b = fakes.start("a", "b", wake_delay=0.05)
    top = f'[auth]\napi_keys = ["{KEY}"]\n'
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b), top=top)
    async with llmux_running(path) as (server, _):

        def use_sdk() -> tuple[str, str, str]:
            sdk = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
            said = [{"role": "user", "content": "hi"}]
            message = sdk.messages.create(model="a", max_tokens=3, messages=said)
            with sdk.messages.stream(model="b", max_tokens=4, messages=said) as stream:
                streamed = "".join(stream.text_stream)
            wrong = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
            try:
                wrong.messages.create(model="a", max_tokens=3, messages=said)
            except anthropic.AuthenticationError as exc:
                refused = str(exc)
            return message.content[0].text, streamed, refused

        text, streamed, refused = await trio.to_thread.run_sync(use_sdk)
    assert text == "a-0 a-1 a-2 "
    assert streamed == "b-0 b-1 b-2 b-3 "
    assert "401" in refused
    for fake in (a, b):
        assert fake.state()["rejected_while_asleep"] == 0
        assert "x-api-key" not in fake.received()["header_names"]


async def test_model_names_with_slashes_in_llmux_routes(fakes, tmp_path):
    (a,) = fakes.start("org/a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        for target in ("/v1/models/org%2Fa", "/v1/models/org/a"):
            answer = await raw_exchange(
                server.url,
                f"GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode(),
            )
            assert _status(answer) == 200, answer
            entry = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert entry["id"] == "org/a" and entry["object"] == "model"
        missing = await client.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
