"""Limits with clear answers, API keys, and the admin API."""

from __future__ import annotations

import logging
from functools import partial

import httpx
import trio

from tests.conftest import chat, fake_model_block, llmux_running, raw_exchange, write_config

KEY = "sk-test-0123456789abcdef"
ADMIN = "admin-0123456789abcdef"


async def test_full_queue_answers_503_with_retry_after(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a, wake=f"sleep 1; {a.ctl('wake')}"),
        server={"max_queue_per_model": 2},
    )
    async with llmux_running(path) as (_, client):
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await client.post("/v1/chat/completions", json=chat("a")))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
                await trio.sleep(0.05)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 503]
    full = next(r for r in results if r.status_code == 503)
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1


async def test_in_flight_limit_queues_the_rest(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=0.02)
    path = write_config(tmp_path, fake_model_block(a), server={"max_in_flight_per_model": 2})
    async with llmux_running(path) as (_, client):
        results: list[int] = []

        async def one() -> None:
            response = await client.post("/v1/chat/completions", json=chat("a", max_tokens=10))
            results.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
    assert results == [200] * 8
    assert a.state()["peak_in_flight"] == 2


async def test_slow_body_gets_408_and_slow_head_is_cut(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a),
        server={"request_body_timeout_secs": 0.5, "request_head_timeout_secs": 1},
    )
    async with llmux_running(path) as (server, _):
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
        answer = await raw_exchange(server.url, head + b'{"model"', wait=3)
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
        began = trio.current_time()
        answer = await raw_exchange(
            server.url, b"POST /v1/chat/completions HTTP/1.1\r\nhos", wait=5
        )
        assert trio.current_time() - began < 3, "a trickling head must not hold the connection"


async def test_oversized_head_is_refused(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a), server={"max_header_bytes": 4096})
    async with llmux_running(path) as (_, client):
        response = await client.post(
            "/v1/chat/completions", json=chat("a"), headers={"x-big": "y" * 8000}
        )
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"
        assert (await client.get("/health")).status_code == 200


async def test_api_keys_guard_everything_but_health(fakes, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    (a,) = fakes.start("a", wake_delay=0.05)
    (tmp_path / "keys.txt").write_text(f"# team keys\n{KEY}\n")
    path = write_config(
        tmp_path,
        fake_model_block(a, wake="echo hook-secret >&2; exit 1"),
        top='[auth]\napi_keys_file = "keys.txt"\n',
    )
    async with llmux_running(path) as (_, client):
        good = {"authorization": f"Bearer {KEY}"}
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": KEY}):
            response = await client.post("/v1/chat/completions", json=chat("a"), headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/health")).status_code == 200
        for route in ("/metrics", "/llmux/status", "/v1/models"):
            assert (await client.get(route)).status_code == 401, route
            assert (await client.get(route, headers=good)).status_code == 200, route
        # With keys set, a failed hook's stderr stays out of answers by default.
        response = await client.post("/v1/chat/completions", json=chat("a"), headers=good)
        assert response.status_code == 503 and "hook-secret" not in response.text
        metrics = (await client.get("/metrics", headers=good)).text
    assert KEY not in metrics and KEY not in caplog.text


async def test_public_metrics_and_status_and_key_reload(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    auth = '[auth]\napi_keys = ["sk-first-key"]\npublic_metrics = true\npublic_status = true\n'
    path = write_config(tmp_path, fake_model_block(a), top=auth)
    async with llmux_running(path) as (server, client):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/llmux/status")).status_code == 200
        write_config(
            tmp_path, fake_model_block(a), top=auth.replace("sk-first-key", "sk-second-key")
        )
        assert await server.reload()
        old = await client.post(
            "/v1/chat/completions", json=chat("a"), headers={"authorization": "Bearer sk-first-key"}
        )
        new = await client.post(
            "/v1/chat/completions",
            json=chat("a"),
            headers={"authorization": "Bearer sk-second-key"},
        )
        assert (old.status_code, new.status_code) == (401, 200)


async def test_admin_api(fakes, tmp_path):
    a, b = fakes.start("a", "b/slash", wake_delay=0.05)
    path = write_config(
        tmp_path,
        fake_model_block(a) + fake_model_block(b),
        top=f'[auth]\nadmin_token = "{ADMIN}"\n',
    )
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with llmux_running(path) as (_, client):
        post = partial(client.post, headers=admin)
        assert (await client.post("/llmux/models/a/wake")).status_code == 401
        assert (
            await client.post("/llmux/models/a/wake", headers={"authorization": "Bearer x" * 3})
        ).status_code == 401
        response = await post("/llmux/models/a/wake")
        assert response.status_code == 200 and response.json() == {"model": "a", "state": "active"}
        assert a.state()["state"] == "awake"
        response = await post("/llmux/models/b%2Fslash/wake")
        assert response.json() == {"model": "b/slash", "state": "active"}
        assert a.state()["state"] == "asleep" and b.state()["state"] == "awake"
        response = await post("/llmux/models/b%2Fslash/sleep")
        assert response.json() == {"model": "b/slash", "state": "asleep"}
        assert b.state()["state"] == "asleep"
        await post("/llmux/models/a/wake")
        assert (await post("/llmux/sleep")).status_code == 200
        assert a.state()["state"] == "asleep"
        assert (await post("/llmux/models/nope/wake")).status_code == 404
        # Clients need no key here (no api_keys), but the admin API always needs the token.
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200


async def test_admin_api_is_absent_without_a_token(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(tmp_path, fake_model_block(a))
    async with llmux_running(path) as (_, client):
        response = await client.post(
            "/llmux/models/a/wake", headers={"authorization": "Bearer anything"}
        )
        assert response.status_code == 404
    assert a.state()["wakes"] == 0


def test_token_compare_checks_every_key():
    from llmux.http.auth import bearer_token, token_matches

    assert token_matches("b", ["a", "b", "c"]) and not token_matches("d", ["a", "b"])
    assert not token_matches(None, ["a"]) and not token_matches("", ["a"])
    assert bearer_token([(b"authorization", b"Bearer  tok ")]) == "tok"
    assert bearer_token([(b"authorization", b"Basic dXNlcg==")]) is None
