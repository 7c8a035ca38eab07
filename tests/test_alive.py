"""The alive hook is used: start-up adoption, periodic checks, checks after a refused connection."""

from __future__ import annotations

import trio

from tests.conftest import chat, fake_model_block, llmux_running, metric_value, write_config


async def _states(client) -> dict[str, str]:
    return {m["id"]: m["llmux"]["state"] for m in (await client.get("/v1/models")).json()["data"]}


async def _wait_for_state(client, model: str, state: str, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while (await _states(client))[model] != state:
            await trio.sleep(0.05)


async def test_already_serving_model_is_adopted_at_start(fakes, tmp_path):
    (a,) = fakes.start("a")
    (b,) = fakes.start("b", awake=True)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        await _wait_for_state(client, "b", "active")
        response = await client.post("/v1/chat/completions", json=chat("b"))
        assert response.status_code == 200
    assert b.state()["wakes"] == 0, "an adopted model must not be woken again"
    assert a.state()["state"] == "asleep"


async def test_several_serving_at_start_keeps_first_in_config_order(fakes, tmp_path):
    a, b, c = fakes.start("a", "b", "c", awake=True)
    # Config order c, a, b: c is kept, the others are put to sleep.
    path = write_config(tmp_path, fake_model_block(c) + fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        await _wait_for_state(client, "c", "active")
        # llmux says asleep once each sleep hook has exited, after the backend itself went to sleep.
        await _wait_for_state(client, "a", "asleep")
        await _wait_for_state(client, "b", "asleep")
        assert (await _states(client)) == {"c": "active", "a": "asleep", "b": "asleep"}
        assert (a.state()["state"], b.state()["state"]) == ("asleep", "asleep")
    assert c.state()["state"] == "awake"


async def test_failing_alive_marks_active_model_asleep_and_next_request_wakes_it(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a), defaults={"alive_interval_secs": 0.2})
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        # The backend stops serving behind llmux's back (crash, OOM, someone ran its sleep).
        await trio.to_thread.run_sync(lambda: __import__("httpx").post(a.url + "/fake/sleep"))
        await _wait_for_state(client, "a", "asleep")
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_model_dead_total", model="a") == 1
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 200
    assert a.state()["wakes"] == 2
    assert a.state()["rejected_while_asleep"] == 0


async def test_alive_not_checked_while_requests_in_flight(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05, token_interval=0.05)
    counter = tmp_path / "alive-count"
    alive = f"echo x >> {counter}; {a.ctl('alive')}"
    path = write_config(
        tmp_path, fake_model_block(a, alive=alive), defaults={"alive_interval_secs": 0.1}
    )
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        before = len(counter.read_text().splitlines())
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=20))  # 1 s busy
        during = len(counter.read_text().splitlines()) - before
        await trio.sleep(0.6)
        after = len(counter.read_text().splitlines()) - before
    assert during <= 1, "alive checks ran while a request was in flight"
    assert after >= 2, "alive checks did not resume once idle"


async def test_refused_connection_triggers_alive_check(fakes, tmp_path):
    (a,) = fakes.start("a", wake_delay=0.05)
    # A long interval: only the refused connection can trigger the check.
    path = write_config(tmp_path, fake_model_block(a), defaults={"alive_interval_secs": 3600})
    async with llmux_running(path) as (_, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        a.stop()  # the backend process dies
        response = await client.post("/v1/chat/completions", json=chat("a"))
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "backend_unavailable"
        await _wait_for_state(client, "a", "asleep")
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_model_dead_total", model="a") == 1
