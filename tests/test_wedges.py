"""What a review of the newer surfaces wedged llmux with, end to end: a policy's evictions, a
server that dies while a switch waits, a cold start taken for a warm switch. Each held a whole
group (or its cost estimate) hostage before; each is answered now."""

from __future__ import annotations

import logging
import os
import signal
import textwrap

import trio

from tests.conftest import (
    LLMUX,
    chat,
    llmux_running,
    metric_value,
    model_block,
    write_config,
)

FAKE_SERVER = f"exec {LLMUX} fake-backend --awake --name ${{MODEL}} --port ${{PORT}}"


def cmd_block(name: str, cmd: str, **keys: object) -> str:
    """A model with no port: llmux chooses one for its `cmd`."""
    return model_block(name, 1, cmd=cmd, **keys).replace("port = 1\n", "")


EVICT_TWICE = textwrap.dedent(
    """
    from llmux.policy import FifoPolicy

    class EvictTwice(FifoPolicy):
        '''A plug-in with a bug: it names the same model twice.'''

        def evict(self, target, snapshot):
            return ["a", "a"]
    """
)


async def test_an_eviction_naming_a_model_twice_is_replaced_and_the_group_serves_on(
    tmp_path, caplog
):
    """Break 1: capacity 80, three models of 40, a policy evicting ["a", "a"]: every request
    of the group got 504 and each later event failed again. Now the answer is checked, the
    default evictions serve, and the policy's mistake is said once and counted."""
    (tmp_path / "evict_twice.py").write_text(EVICT_TWICE)
    models = (
        "".join(cmd_block(name, FAKE_SERVER, memory_gb=40) for name in ("a", "b", "c"))
        + '[groups.gpu]\ncapacity = 80\nmodels = ["a", "b", "c"]\n'
    )
    policy = {"name": f"{tmp_path / 'evict_twice.py'}:EvictTwice", "request_timeout_secs": 20}
    path = write_config(tmp_path, models, policy=policy)
    caplog.set_level(logging.INFO)
    async with llmux_running(path) as (_, client):
        for model in ("a", "b", "c", "a", "b", "c"):
            with trio.fail_after(20):
                response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, (model, response.text)
        metrics = (await client.get("/metrics")).text
        errors = metric_value(metrics, "llmux_policy_errors_total", group="gpu", answer="evict")
        assert errors is not None and errors >= 2
    said = [r for r in caplog.records if "a model named twice" in r.getMessage()]
    assert len([r for r in said if r.levelno >= logging.ERROR]) == 1, "said once at error level"
    assert "the switching core failed" not in caplog.text


async def test_a_server_that_dies_while_a_switch_waits_is_drained_at_once(tmp_path):
    """Break 4: fifo with min_active_secs = 30; a's server dies while a switch to b waits for
    a's 30 s: a stayed ACTIVE, its requests got 502, and b waited the 30 s. Now the exit ends
    a at once: b is served within seconds, and a's requests wait for a wake instead of
    reaching a dead port."""
    models = cmd_block("a", FAKE_SERVER) + cmd_block("b", FAKE_SERVER)
    policy = {"name": "fifo", "min_active_secs": 30, "request_timeout_secs": 6}
    path = write_config(tmp_path, models, policy=policy, defaults={"alive_interval_secs": 300})
    async with llmux_running(path) as (server, client):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
        answers: dict[str, int] = {}

        async def ask(model: str) -> None:
            answers[model] = (
                await client.post("/v1/chat/completions", json=chat(model))
            ).status_code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "b")  # held back by a's min_active_secs
            await trio.sleep(0.5)
            assert server.app.fleet.models["a"].state == "active"
            os.kill(server.app.fleet.servers.pid("a"), signal.SIGKILL)
            await trio.sleep(0.3)
            with trio.fail_after(5):  # far less than the 30 s a would have held the switch
                while "b" not in answers:
                    await trio.sleep(0.05)
            nursery.start_soon(ask, "a")  # b holds min_active_secs now: a waits, then 504
        assert answers["b"] == 200
        assert answers["a"] == 504, "queued for a wake, never sent to a's dead port"
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_model_dead_total", model="a") == 1
        assert metric_value(metrics, "llmux_requests_total", model="a", status="502") is None


async def test_a_cold_start_is_not_taken_for_a_warm_switch(tmp_path):
    """Break 7: a vLLM server's first start (seconds) went into its pair's warm cost, so the
    policy waited as if every switch cost that. Now cold starts are their own figure: after a
    cold start and two warm switches a -> b, the policy sees the warm switches only."""
    vllm = f"{FAKE_SERVER} --api vllm --wake-delay 0.05 --sleep-delay 0.05 --boot-secs 2"
    models = cmd_block("a", vllm, kind="vllm") + cmd_block("b", vllm, kind="vllm")
    path = write_config(tmp_path, models, policy={"name": "fifo"})
    async with llmux_running(path) as (server, client):
        for model in ("a", "b", "a", "b", "a"):  # a cold, b cold from a, then warm switches
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
        seen = server.app.fleet.switcher_of("b").snapshot()
        assert seen.active == "a"
        warm, cold = seen.estimated_cost("b"), seen.cold_start_costs["b"]
        assert cold >= 2.0, "the start took its boot time"
        assert warm is not None and warm < 0.35 * cold, (warm, cold)
        status = (await client.get("/llmux/status")).json()
        costs = {(c["from"], c["to"]): c["seconds"] for c in status["switch_costs"]}
        assert costs[("cold", "b")] == cold and costs[("a", "b")] < 0.35 * cold
        assert ("idle", "a") not in costs, "a's first wake was a cold start, not a warm one"
        metrics = (await client.get("/metrics")).text
        ema = metric_value(metrics, "llmux_switch_cost_ema_seconds", to="b", **{"from": "cold"})
        assert ema == cold


SLOW = textwrap.dedent(
    """
    import time

    from llmux.policy import FifoPolicy

    class Slow(FifoPolicy):
        '''Sleeps in decide: the whole group waits while it does.'''

        def decide(self, event, snapshot):
            time.sleep(0.3)
            return super().decide(event, snapshot)
    """
)


async def test_a_slow_policy_is_said_once(tmp_path, caplog):
    """A policy runs in llmux's event loop; one that blocks it is named in a warning (once a
    minute at most), so that an operator can tell why every request waits."""
    (tmp_path / "slow.py").write_text(SLOW)
    models = cmd_block("a", FAKE_SERVER) + cmd_block("b", FAKE_SERVER)
    path = write_config(tmp_path, models, policy={"name": f"{tmp_path / 'slow.py'}:Slow"})
    caplog.set_level(logging.INFO)
    async with llmux_running(path) as (_, client):
        for model in ("a", "b"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200
    slow = [r for r in caplog.records if getattr(r, "event", None) == "core_slow"]
    assert len(slow) == 1 and "slow.py:Slow" in slow[0].getMessage()
