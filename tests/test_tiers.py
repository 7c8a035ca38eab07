"""Switches as they really are: each sleep and wake measured per model and sleep level (cold
starts apart), and what a policy is told a switch costs built from those steps."""

from __future__ import annotations

import pytest

from llmux.core.costs import SwitchCostTracker
from tests.conftest import LLMUX, chat, llmux_running, metric_value, model_block, write_config

FAKE_VLLM = (
    f"exec {LLMUX} fake-backend --awake --api vllm --name ${{MODEL}} --port ${{PORT}} "
    "--wake-delay 0.1 --sleep-delay 0.05"
)


def cmd_block(name: str, cmd: str, **keys: object) -> str:
    return model_block(name, 1, cmd=cmd, **keys).replace("port = 1\n", "")


def test_sleeps_and_wakes_are_kept_per_model_and_level():
    costs = SwitchCostTracker()
    costs.observe_sleep("a", 1, 10.0)
    costs.observe_sleep("a", 2, 0.3)
    costs.observe_sleep("a", 2, 0.5)
    costs.observe_switch("a", "b", 6.5, 6.8, cold=False, level=2)
    costs.observe_switch(None, "b", 30.0, 30.0, cold=True)
    assert costs.sleep_steps == {("a", 1): 10.0, ("a", 2): pytest.approx(0.3 * 0.5 + 0.7 * 0.3)}
    assert costs.wake_steps == {("b", 2): 6.5, ("b", "cold"): 30.0}
    assert costs.wakes == {"b": 6.5}, "the cold start is not a warm wake"


async def test_each_step_is_measured_shown_and_what_a_policy_sees(tmp_path):
    """a sleeps at level 1, b at level 2 (vLLM fakes llmux starts): every sleep and wake lands
    in llmux_sleep_seconds / llmux_wake_seconds under its level (the first wakes under
    "cold"), /llmux/status shows the means per level, and the cost a policy is told for a
    switch is a's sleep plus b's wake from level 2."""
    models = cmd_block("a", FAKE_VLLM, kind="vllm") + cmd_block(
        "b", FAKE_VLLM, kind="vllm", sleep_level=2
    )
    path = write_config(tmp_path, models, policy={"name": "fifo"})
    async with llmux_running(path) as (server, client):
        for model in ("a", "b", "a", "b", "a"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
        metrics = (await client.get("/metrics")).text
        status = (await client.get("/llmux/status")).json()
        seen = server.app.fleet.switcher_of("b").snapshot()

    def count(histogram: str, model: str, level: str) -> float | None:
        return metric_value(metrics, f"llmux_{histogram}_seconds_count", model=model, level=level)

    assert count("sleep", "a", "1") == 2 and count("sleep", "b", "2") == 2
    assert count("wake", "a", "cold") == 1 and count("wake", "a", "1") == 2
    assert count("wake", "b", "cold") == 1 and count("wake", "b", "2") == 1
    assert count("sleep", "a", "2") is None and count("wake", "b", "1") is None
    steps = status["models"]["b"]["steps"]
    assert set(steps["sleep"]) == {"2"} and set(steps["wake"]) == {"2", "cold"}
    assert status["models"]["b"]["slept_level"] == 2
    assert seen.active == "a" and seen.models["b"].slept_level == 2
    expected = seen.sleep_costs[("a", 1)] + seen.wake_step_costs[("b", 2)]
    assert seen.estimated_cost("b") == pytest.approx(expected)
