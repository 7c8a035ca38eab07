"""Fuzzing the HTTP edge: whatever a client sends, llmux answers a 4xx in OpenAI shape (never a
500 of its own), runs no hook for a model it does not serve, and keeps serving."""

from __future__ import annotations

import collections
import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmux.http.routes import ROUTES, Endpoint, ModelFrom
from tests.conftest import FakeFleet, LlmuxProcess, fake_model_block, write_config


@pytest.fixture(scope="module")
def llmux_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    fleet = FakeFleet()
    (a,) = fleet.start("a", wake_delay=0.01, token_interval=0.001)
    marker = folder / "hook-ran"
    hooks = {hook: f"echo $LLMUX_MODEL >> {marker}; {a.ctl(hook)}" for hook in ("wake", "sleep")}
    path = write_config(folder, fake_model_block(a, **hooks), server={"max_body_bytes": 65536})
    try:
        llmux = LlmuxProcess(path)
        yield llmux.url, marker, a
        llmux.stop()
    finally:
        fleet.stop_all()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps({"model": v, "messages": []}).encode()),
    st.text(min_size=1, max_size=30)
    .filter(lambda m: m != "a")
    .map(lambda m: json.dumps({"model": m, "messages": []}).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n),
    st.integers(1, 3).map(lambda n: b'{"model": "' + b"x" * (40_000 * n) + b'"}'),
    st.just(b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n--b--\r\n'),
    st.just(b'{"model": "a\xff\xfe"}'),
)
header_text = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}", fullmatch=True)  # RFC 9110 tokens
headers = st.dictionaries(
    header_text.filter(
        lambda h: (
            h.lower() not in {"content-length", "transfer-encoding", "host", "connection", "expect"}
        )
    ),
    st.from_regex(r"([!-~]([ -~]{0,38}[!-~])?)?", fullmatch=True),  # no edge whitespace
    max_size=5,
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"])
paths = st.one_of(
    st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/metrics",
            "/llmux/status",
            "/llmux/sleep",
            "/llmux/models/a/wake",
        ]
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
        lambda p: "/v1/" + p
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda p: "/" + p),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(method=methods, path=paths, headers=headers, body=bodies)
def test_anything_gets_a_clear_answer(llmux_url, method, path, headers, body):
    url, marker, _ = llmux_url
    # The whole URL as one string: a path such as "//host" joined to a base URL would be read as
    # a network-path reference, and the client would leave llmux for that host.
    target = url + path.replace("?", "%3F").replace("#", "%23")
    with httpx.Client(timeout=30) as client:
        response = client.request(method, target, headers=headers, content=body)
    assert response.status_code < 500 or response.status_code in (502, 503), response.text
    if response.status_code >= 400 and method != "HEAD":
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"]
    if marker.exists():
        assert set(marker.read_text().split()) <= {"a"}, "a hook ran for a model not configured"


def test_still_serving_and_no_hook_for_unknown_models(llmux_url):
    url, marker, backend = llmux_url
    assert httpx.get(url + "/health").status_code == 200
    ran = set(marker.read_text().split()) if marker.exists() else set()
    assert ran <= {"a"}
    response = httpx.post(
        url + "/v1/chat/completions", json={"model": "a", "messages": []}, timeout=30
    )
    assert response.status_code == 200
    assert backend.state()["rejected_while_asleep"] == 0


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.text(max_size=200),
    max_tokens=st.integers(1, 20),
    stream=st.booleans(),
    temperature=st.floats(0, 2),
)
def test_well_formed_traffic_from_the_openai_sdk(
    llmux_url, content, max_tokens, stream, temperature
):
    import openai

    url, _, _ = llmux_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": content}]
    if stream:
        chunks = client.chat.completions.create(
            model="a",
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = client.chat.completions.create(
            model="a", messages=messages, max_tokens=max_tokens, temperature=temperature
        )
        text = answer.choices[0].message.content
    assert text.split() == [f"a-{i}" for i in range(max_tokens)]


# ----- 10,000 hostile requests: only routed paths reach a backend, exactly as routed -----

KEY = "sk-fuzz-0123456789"
ALLOWED_PREFIX = "/tokenize"
API_PATHS = sorted(r.pattern for r in ROUTES if r.endpoint is Endpoint.PROXY)
# The fuzz sends JSON bodies: it aims them at the routes that take JSON.
JSON_API_PATHS = sorted(
    r.pattern
    for r in ROUTES
    if r.endpoint is Endpoint.PROXY and r.model_from is ModelFrom.JSON_BODY
)
# What an attacker aims at: the backends' control APIs, llmux's own, and near misses.
TARGETS = [
    *API_PATHS,
    "/upstream/a/tokenize",
    "/upstream/a/tokenize/x",
    "/upstream/a/sleep",
    "/upstream/a%2Fb/tokenize",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/release_memory_occupation",
    "/update_weights_from_disk",
    "/api/pull",
    "/v1/load_lora_adapter",
    "/fake/sleep",
    "/fake/wake",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/models/a",
    "/llmux/sleep",
    "/llmux/models/a/sleep",
]
DOTS = [
    "..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2e", "%252e%252e", "%25252e%25252e",
    "..%2f", "..%2F", "%2e%2e%2f", "..%5c", "..\\", "%c0%ae%c0%ae", ".%00.", "...", "..;",
]  # fmt: skip
CONTROL = ["\r\n", "\n", "\r", "%0d%0a", "%0a", "\x00", "%00", "\t", " ", "\x1b"]
CONNECTION_NAMES = ["x-hop-1", "x-hop-2", "authorization", "x-api-key", "content-type", "te"]


def _hostile_path(rng: random.Random) -> str:
    base = rng.choice(JSON_API_PATHS) if rng.random() < 0.6 else rng.choice(TARGETS)
    segments = base.split("/")[1:]
    for _ in range(rng.choice([0, 0, 0, 0, 1, 1, 2, 3])):
        where = rng.randrange(len(segments) + 1)
        kind = rng.random()
        if kind < 0.55:
            segments.insert(where, rng.choice(DOTS))
        elif kind < 0.7:
            segments.insert(where, "")  # an empty segment: //
        elif kind < 0.85 and segments:
            index = rng.randrange(len(segments))
            segments[index] = _percent_one(rng, segments[index])
        else:
            segments.insert(where, rng.choice(CONTROL))
    path = "/" + "/".join(segments)
    roll = rng.random()
    if roll < 0.1:
        path += "?level=2&x=" + rng.choice(DOTS) + "/sleep"
    elif roll < 0.13:
        path = "http://127.0.0.1:1" + path
    elif roll < 0.15:
        path += "#frag"
    elif roll < 0.17:
        path = path.replace("/", "\\", 1)
    return path


def _percent_one(rng: random.Random, segment: str) -> str:
    if not segment:
        return segment
    index = rng.randrange(len(segment))
    return segment[:index] + f"%{ord(segment[index]):02X}" + segment[index + 1 :]


def _hostile_request(rng: random.Random) -> tuple[str, str, bytes]:
    """(method, target, the raw request bytes)."""
    method = rng.choice(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "FOO"])
    target = _hostile_path(rng)
    model = rng.choice(["a"] * 8 + ["b", "a\r\nx: y", "A", ""])
    body = json.dumps({"model": model, "messages": [], "max_tokens": 1}).encode()
    if rng.random() < 0.05:
        body = body[:-1] + b', "model": "zz"}'
    named = rng.sample(CONNECTION_NAMES, rng.randrange(3))
    lines = [f"{method} {target} HTTP/1.1", "host: llmux", "content-type: application/json"]
    lines.append("connection: " + ", ".join(["close", *named]))
    auth = rng.random()
    if auth < 0.45:
        lines.append(f"authorization: Bearer {KEY}")
    elif auth < 0.8:
        lines.append(f"x-api-key: {KEY}")
    elif auth < 0.9:
        lines.append("authorization: Bearer sk-wrong")
    # Hop headers are sent only when the Connection list names them: they must never pass.
    lines += [
        f"{name}: {rng.choice(['1', 'secret'])}" for name in named if name.startswith("x-hop")
    ]
    if rng.random() < 0.15:
        field = rng.randrange(1, len(lines))
        # In the Connection line, only line breaks: anything else would rename its last token.
        controls = CONTROL[:3] if lines[field].startswith("connection:") else CONTROL
        lines[field] += rng.choice(controls) + "x-injected: 1"
    if rng.random() < 0.05:
        lines.append("transfer-encoding: chunked")
    lines.append(f"content-length: {len(body)}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return method, target, head.encode("latin-1", errors="replace") + body


def _upstream_remainder(line: str) -> str | None:
    """`METHOD /upstream/a/rest?q` (the model maybe percent-encoded) -> `METHOD /rest?q`."""
    from urllib.parse import unquote

    method, _, target = line.partition(" ")
    if not target.startswith("/upstream/"):
        return None
    model, slash, rest = target.removeprefix("/upstream/").partition("/")
    return f"{method} /{rest}" if slash and unquote(model) == "a" else None


def _dot_free(path: str) -> bool:
    from urllib.parse import unquote

    for _ in range(4):
        if any(s in (".", "..") for s in path.replace("\\", "/").split("/")):
            return False
        path = unquote(path)
    return True


@pytest.fixture(scope="module")
def hostile_llmux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    fleet = FakeFleet()
    (a,) = fleet.start("a", api="vllm", wake_delay=0.01, token_interval=0.0001)
    marker = folder / "hook-ran"
    hooks = {hook: f"echo {hook} >> {marker}; {a.ctl(hook)}" for hook in ("wake", "sleep")}
    block = fake_model_block(a, alive=None, passthrough_paths=[ALLOWED_PREFIX], **hooks)
    server = {"access_log": False, "request_body_timeout_secs": 2}
    path = write_config(folder, block, top=f'[auth]\napi_keys = ["{KEY}"]\n', server=server)
    try:
        llmux = LlmuxProcess(path)
        yield llmux.url, marker, a
        llmux.stop()
    finally:
        fleet.stop_all()


HOSTILE_REQUESTS = 10_000


async def _status_of(url: str, data: bytes) -> int:
    """Send one raw request and read one answer's head (0: no answer within 10 s)."""
    import trio

    host, port = url.removeprefix("http://").rsplit(":", 1)
    with trio.move_on_after(10):
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(data)
            answer = b""
            while b"\r\n" not in answer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
            if answer.startswith(b"HTTP/1.1 "):
                return int(answer.split(b" ", 2)[1])
    return 0


async def test_ten_thousand_hostile_requests_reach_only_routed_paths(hostile_llmux):
    import trio

    url, marker, backend = hostile_llmux
    rng = random.Random(13)
    requests = [_hostile_request(rng) for _ in range(HOSTILE_REQUESTS)]
    statuses: list[int] = []

    async def worker(share: list[tuple[str, str, bytes]]) -> None:
        for _, _, data in share:
            statuses.append(await _status_of(url, data))

    async with trio.open_nursery() as nursery:
        for k in range(8):
            nursery.start_soon(worker, requests[k::8])
    assert len(statuses) == HOSTILE_REQUESTS
    print("statuses:", sorted(collections.Counter(statuses).items()))
    assert 0 not in statuses and 500 not in statuses, "every request gets an HTTP answer"
    sent = {f"{method} {target}" for method, target, _ in requests}
    upstream_sent = {_upstream_remainder(line) for line in sent}
    received = backend.received()
    hook_runs = marker.read_text().split() if marker.exists() else []
    forwarded = 0
    for line, count in received["targets"].items():
        method, target = line.split(" ", 1)
        path = target.split("?", 1)[0]
        if path in ("/fake/wake", "/fake/sleep", "/fake/state"):
            continue
        forwarded += count
        if path.startswith(ALLOWED_PREFIX):
            assert path == ALLOWED_PREFIX or path.startswith(ALLOWED_PREFIX + "/"), line
            assert _dot_free(target), line
            assert f"{method} {target}" in upstream_sent, line
        else:
            assert path in API_PATHS and method == "POST", line
            assert line in sent, f"{line} reached the backend but was not sent as such"
    assert received["targets"].get("POST /fake/wake", 0) == hook_runs.count("wake")
    assert received["targets"].get("POST /fake/sleep", 0) == hook_runs.count("sleep")
    assert backend.state()["sleeps"] == hook_runs.count("sleep")
    assert forwarded > 800, "the run must also exercise routed requests"
    leaked = {"authorization", "x-api-key", "x-hop-1", "x-hop-2"}
    assert not leaked & set(received["header_names"]), leaked & set(received["header_names"])
    assert httpx.get(url + "/health").status_code == 200
