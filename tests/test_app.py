"""The HTTP edge: routing, the OpenAI error shape and statuses, endpoints, metrics labels."""

from __future__ import annotations

import socket

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    model_block,
    write_config,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


async def test_bad_requests_get_400_and_reach_no_hook(fakes, tmp_path):
    (a,) = fakes.start("a")
    marker = tmp_path / "woken"
    path = write_config(tmp_path, fake_model_block(a, wake=f"touch {marker}; {a.ctl('wake')}"))
    async with llmux_running(path) as (_, client):
        cases = [
            b"{not json",
            b"\xff\xfe\x00garbage",
            b"[1, 2]",
            b'{"messages": []}',
            b'{"model": 42}',
            b'{"model": ["a"]}',
            b"[" * 100000,
        ]
        for body in cases:
            response = await client.post("/v1/chat/completions", content=body)
            _assert_openai_error(response, 400, "invalid_request")
    assert not marker.exists()


async def test_unknown_model_is_404_listing_known_ones_and_never_a_label(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("evil-model-xyz"))
        error = _assert_openai_error(response, 404, "model_not_found")
        assert "a" in error["message"] and "evil-model-xyz" in error["message"]
        metrics = (await client.get("/metrics")).text
    assert "evil-model-xyz" not in metrics
    assert metric_value(metrics, "llmux_requests_total", model="unknown", status="404") == 1


async def test_body_over_limit_is_413(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a), server={"max_body_bytes": 1000})
    async with llmux_running(path) as (_, client):
        big = chat("a", padding="x" * 2000)
        _assert_openai_error(
            await client.post("/v1/chat/completions", json=big), 413, "request_too_large"
        )

        async def chunked():
            for _ in range(20):
                yield b"x" * 100

        response = await client.post("/v1/chat/completions", content=chunked())
        _assert_openai_error(response, 413, "request_too_large")
        ok = await client.post("/v1/chat/completions", json=chat("a"))
        assert ok.status_code == 200


async def test_unreachable_backend_is_502(tmp_path):
    path = write_config(tmp_path, model_block("ghost", _free_port(), wake="true", sleep="true"))
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("ghost"))
        _assert_openai_error(response, 502, "backend_unavailable")
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "llmux_requests_total", model="ghost", status="502") == 1


async def test_wait_past_request_timeout_is_504(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a, wake=f"sleep 2; {a.ctl('wake')}"),
        policy={"request_timeout_secs": 0.5},
    )
    async with llmux_running(path) as (_, client):
        started = trio.current_time()
        response = await client.post("/v1/chat/completions", json=chat("a"))
        _assert_openai_error(response, 504, "queue_timeout")
        assert 0.4 < trio.current_time() - started < 1.9  # before the 2 s wake ends
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_request_queue_depth", model="a") == 0


async def test_every_v1_post_is_routed_by_model(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (_, client):
        for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
            response = await client.post(route, json={"model": "a", "prompt": "x", "input": "x"})
            assert response.status_code == 200, route
        query = await client.post("/v1/completions?foo=bar", json={"model": "a", "prompt": "x"})
        assert query.status_code == 200


async def test_models_health_metrics_and_unknown_routes(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a) + model_block("b/with.slash", _free_port(), wake="false", sleep="true"),
    )
    async with llmux_running(path) as (_, client):
        health = await client.get("/health")
        assert health.status_code == 200
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["a", "b/with.slash"]
        assert all(
            m["object"] == "model" and m["llmux"]["state"] == "asleep" for m in models["data"]
        )
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith(
            "text/plain"
        )
        assert list(text_string_to_metric_families(metrics.text))
        _assert_openai_error(await client.get("/nope"), 404, "not_found")
        wrong_method = await client.get("/v1/chat/completions")
        _assert_openai_error(wrong_method, 405, "method_not_allowed")
        assert wrong_method.headers["allow"] == "POST"


async def test_openai_sdk_works_through_llmux(fakes, tmp_path):
    import openai

    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (server, _):

        def use_sdk() -> tuple[str, str, list[str]]:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
            first = client.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "hi"}]
            )
            streamed = client.chat.completions.create(
                model="b", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
            )
            pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
            try:
                client.chat.completions.create(model="zzz", messages=[])
            except openai.NotFoundError as exc:
                missing = str(exc)
            return first.choices[0].message.content, missing, pieces

        content, missing, pieces = await trio.to_thread.run_sync(use_sdk)
    assert content.startswith("a-0")
    assert "zzz" in missing
    assert "".join(pieces) == "b-0 b-1 b-2 b-3 "
