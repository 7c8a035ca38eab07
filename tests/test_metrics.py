"""Metrics: the original tool's names and meanings, our additions, per-app registries, cost EMA."""

from __future__ import annotations

import re
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from llmux.core.costs import SwitchCostTracker
from llmux.observe.metrics import Metrics
from tests.conftest import chat, fake_model_block, llmux_running, metric_value, write_config

ORIGINAL_METRICS = Path(__file__).parent / "data" / "original-metric-names.txt"


def original_names() -> list[str]:
    return ORIGINAL_METRICS.read_text().split()


def test_original_name_list_matches_the_reference_if_present():
    reference = Path(__file__).parents[2] / "shared" / "seed" / "original-metrics-module.txt"
    if not reference.exists():
        pytest.skip("the reference module is not beside this checkout")
    names = re.findall(r'describe_\w+!\(\s*"(llmux_[a-z_]+)"', reference.read_text())
    assert sorted(names) == sorted(original_names())


async def test_every_original_metric_is_exposed_after_a_switch(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.05)
    path = write_config(tmp_path, fake_model_block(a) + fake_model_block(b))
    async with llmux_running(path) as (_, client):
        began = time.time()
        for model in ("a", "b"):
            assert (await client.post("/v1/chat/completions", json=chat(model))).status_code == 200
            if model == "a":
                between = time.time()
        text = (await client.get("/metrics")).text
    # When each switch ended, for `llmux top` to stamp it with.
    ended = {"from": "idle", "to": "a", "result": "ok"}
    assert began <= metric_value(text, "llmux_switch_last_time_seconds", **ended) <= between
    ended = {"from": "a", "to": "b", "result": "ok"}
    assert between <= metric_value(text, "llmux_switch_last_time_seconds", **ended) <= time.time()
    exposed = set(re.findall(r"^# HELP (llmux_[a-z_]+) ", text, re.M))
    for name in original_names():
        assert name in exposed, name
    assert (
        metric_value(text, "llmux_switch_total", **{"from": "idle", "to": "a", "result": "ok"}) == 1
    )
    assert metric_value(text, "llmux_switch_total", **{"from": "a", "to": "b", "result": "ok"}) == 1
    assert metric_value(text, "llmux_model_state", model="b", state="active") == 1
    assert metric_value(text, "llmux_model_state", model="a", state="asleep") == 1
    assert metric_value(text, "llmux_model_active_duration_seconds_count", model="a") == 1
    assert metric_value(text, "llmux_hook_duration_seconds_count", model="b", hook="wake") == 1
    assert metric_value(text, "llmux_requests_total", model="a", status="200") == 1
    assert metric_value(text, "llmux_request_queue_wait_seconds_count", model="b") == 1
    assert metric_value(text, "llmux_switch_cost_ema_seconds", **{"from": "idle", "to": "a"}) > 0


async def test_cost_ema_counts_hooks_not_the_drain(fakes, tmp_path):
    a, b = fakes.start("a", "b", wake_delay=0.0, sleep_delay=0.0, token_interval=0.05)
    blocks = fake_model_block(a, sleep=f"sleep 0.3; {a.ctl('sleep')}") + fake_model_block(
        b, wake=f"sleep 0.2; {b.ctl('wake')}"
    )
    # FIFO switches while the stream runs, so the switch includes its drain.
    path = write_config(tmp_path, blocks, policy={"name": "fifo"})
    async with llmux_running(path) as (_, client):
        await client.post("/v1/chat/completions", json=chat("a", max_tokens=1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(client.post, "/v1/chat/completions", json=chat("a", max_tokens=30))
            )
            await trio.sleep(0.1)
            nursery.start_soon(
                partial(client.post, "/v1/chat/completions", json=chat("b", max_tokens=1))
            )
        text = (await client.get("/metrics")).text
    cost = metric_value(text, "llmux_switch_cost_ema_seconds", **{"from": "a", "to": "b"})
    switch = metric_value(text, "llmux_switch_duration_seconds_sum", **{"from": "a", "to": "b"})
    drain = metric_value(text, "llmux_switch_drain_duration_seconds_sum", model="a")
    assert drain > 1.0  # the 30-token stream
    assert 0.5 <= cost < 1.2  # sleep 0.3 + wake 0.2 + process start-up, drain excluded
    assert switch >= drain + cost * 0.9


def test_ema_alpha_and_wakes_from_idle_and_cold_starts_kept_apart():
    tracker = SwitchCostTracker()
    assert tracker.observe_switch("a", "b", 8.0, 10.0, cold=False) == 10.0
    assert tracker.observe_switch("a", "b", 8.0, 20.0, cold=False) == pytest.approx(13.0)
    assert tracker.observe_switch(None, "b", 5.0, 5.0, cold=False) == 5.0  # from idle
    assert tracker.observe_switch("a", "b", 49.0, 50.0, cold=True) == 50.0  # whatever was active
    assert tracker.switches == {("a", "b"): pytest.approx(0.3 * 20 + 0.7 * 10)}
    assert tracker.idle_wakes == {"b": 5.0}
    assert tracker.cold_starts == {"b": 50.0}
    assert tracker.wakes == {"b": pytest.approx(0.3 * 5 + 0.7 * 8)}  # warm wakes only
    assert tracker.table() == [
        ("a", "b", pytest.approx(13.0)),
        ("idle", "b", 5.0),
        ("cold", "b", 50.0),
    ]


def test_each_app_has_its_own_registry():
    first, second = Metrics(["a"]), Metrics(["a"])
    first.requests_total.labels("a", "200").inc()
    assert metric_value(first.exposition().decode(), "llmux_requests_total", model="a") == 1
    assert metric_value(second.exposition().decode(), "llmux_requests_total", model="a") is None
