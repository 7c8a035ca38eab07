"""The HTTP edge: routing, the OpenAI error shape and statuses, endpoints, metrics labels."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    model_block,
    one_process_only,
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


def _planted_bug(*args: object, **kwargs: object) -> None:
    raise RuntimeError("planted bug")


def _logged(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def _assert_logged_once_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    (record,) = _logged(caplog, "internal_error")
    assert record.exc_info is not None and "planted bug" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text
    assert "Error in ASGI Framework" not in caplog.text  # not hypercorn's second copy


@one_process_only("the bug is planted in this process's app")
async def test_a_bug_before_the_grant_is_a_counted_json_500_that_wakes_nothing(
    fakes, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    monkeypatch.setattr("llmux.http.app.model_named_in", _planted_bug)
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("a"))
        metrics = (await client.get("/metrics")).text
    error = _assert_openai_error(response, 500, "internal_error")
    assert "planted" not in error["message"]  # the log has the bug, the client only its status
    assert metric_value(metrics, "llmux_requests_total", model="unknown", status="500") == 1
    assert metric_value(metrics, "llmux_internal_errors_total") == 1
    _assert_logged_once_with_traceback(caplog)
    assert [r.fields["status"] for r in _logged(caplog, "request")] == [500]
    assert a.state()["wakes"] == 0


@one_process_only("the bugs are planted in this process's app")
async def test_a_bug_once_granted_frees_the_slot_and_one_mid_answer_cuts_it(
    fakes, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (server, client):
        with monkeypatch.context() as planted:
            planted.setattr("llmux.http.app.forwarded_request_headers", _planted_bug)
            granted = await client.post("/v1/chat/completions", json=chat("a"))
        _assert_openai_error(granted, 500, "internal_error")
        _assert_logged_once_with_traceback(caplog)
        status = (await client.get("/llmux/status")).json()
        assert status["models"]["a"]["in_flight"] == 0  # the slot went back
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        caplog.clear()
        with monkeypatch.context() as planted:
            planted.setattr(server.app.watchdog, "watch", _planted_bug)  # after the head is sent
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("a", stream=True)
            ) as streamed:
                assert streamed.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):  # cut, as a broken backend's
                    await streamed.aread()
        _assert_logged_once_with_traceback(caplog)
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "llmux_requests_total", model="a", status="500") == 2
    assert metric_value(metrics, "llmux_requests_total", model="a", status="200") == 1
    assert metric_value(metrics, "llmux_internal_errors_total") == 2
    assert metric_value(metrics, "llmux_model_in_flight", model="a") == 0
