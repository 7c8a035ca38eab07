"""Fuzzing the HTTP edge: whatever a client sends, llmux answers a 4xx in OpenAI shape (never a
500 of its own), runs no hook for a model it does not serve, and keeps serving."""

from __future__ import annotations

import json
import subprocess
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PYTHON, FakeFleet, fake_model_block, write_config


@pytest.fixture(scope="module")
def llmux_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    fleet = FakeFleet()
    (a,) = fleet.start("a", wake_delay=0.01, token_interval=0.001)
    marker = folder / "hook-ran"
    hooks = {hook: f"echo $LLMUX_MODEL >> {marker}; {a.ctl(hook)}" for hook in ("wake", "sleep")}
    path = write_config(folder, fake_model_block(a, **hooks), server={"max_body_bytes": 65536})
    proc = subprocess.Popen(
        [PYTHON, "-m", "llmux", "serve", "-c", str(path), "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "llmux listening on" in line:
            url = line.split("llmux listening on ", 1)[1].split()[0]
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield url, marker, a
    proc.terminate()
    proc.wait(timeout=15)
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
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.request(
            method, path.replace("?", "%3F").replace("#", "%23"), headers=headers, content=body
        )
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
