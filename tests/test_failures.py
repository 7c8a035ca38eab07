"""Hook failures in a switch: never two models awake, waiters answered, retries bounded."""

from __future__ import annotations

import trio

from tests.conftest import (
    chat,
    fake_model_block,
    llmux_running,
    metric_value,
    process_running,
    write_config,
)


async def test_sleep_failure_with_alive_passing_abandons_the_switch(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    blocks = fake_model_block(a, sleep="echo cannot sleep >&2; exit 3") + fake_model_block(b)
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        response = await client.post("/v1/chat/completions", json=chat("b"))
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_unavailable"
        assert "cannot sleep" in error["message"]
        # a still serves, b was never woken.
        models = {
            m["id"]: m["llmux"]["state"] for m in (await client.get("/v1/models")).json()["data"]
        }
        assert models == {"a": "active", "b": "asleep"}
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_switch_total", to="b", result="abandoned") == 1
        assert metric_value(metrics, "llmux_hook_failures_total", model="a", hook="sleep") == 1
    assert b.state()["wakes"] == 0
    assert a.state()["state"] == "awake"


async def test_sleep_failure_with_alive_failing_continues(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    # The sleep hook puts a to sleep, then reports failure anyway: alive tells the truth.
    blocks = fake_model_block(a, sleep=f"{a.ctl('sleep')}; exit 1") + fake_model_block(b)
    path = write_config(tmp_path, blocks)
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200


async def test_wake_failure_cleans_up_answers_503_and_retries_later(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    flag = tmp_path / "broken"
    flag.write_text("yes")
    cleanup = tmp_path / "cleanup-ran"
    wake = f"if [ -e {flag} ]; then echo 'CUDA out of memory' >&2; exit 1; fi; {a.ctl('wake')}"
    sleep = f"touch {cleanup}; {a.ctl('sleep')}"
    path = write_config(tmp_path, fake_model_block(a, wake=wake, sleep=sleep))
    async with llmux_running(path) as (_, client):
        first, second = await _two_concurrent(client, "a")
        for response in (first, second):
            assert response.status_code == 503
            assert "CUDA out of memory" in response.json()["error"]["message"]
            # A retry may succeed once the group's back-off is over (a wake hook, no `cmd`).
            assert response.headers["retry-after"] == "2"
            assert "x-should-retry" not in response.headers
        assert cleanup.exists(), "the target's sleep hook must run after a failed wake"
        models = (await client.get("/v1/models")).json()["data"]
        assert models[0]["llmux"]["state"] == "asleep"
        flag.unlink()
        started = trio.current_time()
        retried = await client.post("/v1/chat/completions", json=chat("a"))
        assert retried.status_code == 200
        # The retry waited out the backoff after the failed switch instead of spinning.
        assert trio.current_time() - started >= 1.0
        metrics = (await client.get("/metrics")).text
        assert (
            metric_value(
                metrics, "llmux_switch_total", **{"from": "idle", "to": "a", "result": "failed"}
            )
            == 1
        )
        assert metric_value(metrics, "llmux_hook_failures_total", model="a", hook="wake") == 1


async def test_hook_errors_hidden_when_not_exposed(fakes, tmp_path):
    (a,) = fakes.start("a")
    path = write_config(
        tmp_path,
        fake_model_block(a, wake="echo secret-token-123 >&2; exit 1"),
        server={"expose_hook_errors": False},
    )
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 503
        assert "secret-token-123" not in response.text
        assert "log" in response.json()["error"]["message"]


async def test_wake_timeout_kills_hook_and_answers_503(fakes, tmp_path):
    (a,) = fakes.start("a")
    pidfile = tmp_path / "hook.pid"
    path = write_config(
        tmp_path,
        fake_model_block(a, wake=f"echo $$ > {pidfile}; sleep 60", wake_timeout_secs=0.5),
    )
    async with llmux_running(path) as (_, client):
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 503
        assert "timed out" in response.json()["error"]["message"]
        assert response.headers["x-should-retry"] == "false", "a retry would wait as long"
    pid = int(pidfile.read_text())
    assert not process_running(pid)


async def _two_concurrent(client, model):
    results = []

    async def one() -> None:
        results.append(await client.post("/v1/chat/completions", json=chat(model)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    return results
