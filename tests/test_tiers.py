"""Switches as they really are: each sleep and wake measured per model and sleep level (cold
starts apart), and what a policy is told a switch costs built from those steps."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from llmux.config import parse_config
from llmux.core import events as ev
from llmux.core.commands import CancelHook, Refuse, RunHook, SetTimer
from llmux.core.costs import SwitchCostTracker
from llmux.core.group import GroupCore
from llmux.core.states import HookName, ModelState
from llmux.policy import FifoPolicy
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


def _core_with_a_cmd_model():
    raw = {
        "models": {
            "a": {"port": 9000, "cmd": "serve-a ${PORT}"},
            "b": {"port": 9001, "wake": "w", "sleep": "s"},
        }
    }
    config = parse_config(raw, Path("cold.toml")).group_config("default")
    core = GroupCore(config, FifoPolicy(), SwitchCostTracker())
    out = core.handle(ev.Started(0.0))
    for hook in [c for c in out if isinstance(c, RunHook)]:  # nothing serves at start-up
        core.handle(ev.HookDone(0.0, hook.job, ev.HookOutcome(ok=False)))
    return core


def test_a_cold_start_nobody_waits_for_is_stopped_and_is_no_failure():
    core = _core_with_a_cmd_model()
    (wake,) = [c for c in core.handle(ev.Arrived(1.0, 1, "a")) if isinstance(c, RunHook)]
    assert wake.hook is HookName.WAKE and core.models["a"].starts_cold
    assert CancelHook(wake.job) in core.handle(ev.Left(3.0, 1)), "its last waiter left"
    out = core.handle(ev.HookDone(3.1, wake.job, ev.HookOutcome(ok=False, cancelled=True)))
    assert core.models["a"].state is ModelState.ASLEEP and not core.op
    assert not [c for c in out if isinstance(c, Refuse | SetTimer)], "no back-off"
    assert core.costs.cold_starts == {} and core.costs.wakes == {}, "no cost sample"
    again = core.handle(ev.Arrived(3.2, 2, "a"))
    assert [c.hook for c in again if isinstance(c, RunHook)] == [HookName.WAKE], "at once"


def test_a_warm_wake_nobody_waits_for_completes():
    core = _core_with_a_cmd_model()
    (wake,) = [c for c in core.handle(ev.Arrived(1.0, 1, "b")) if isinstance(c, RunHook)]
    assert not [c for c in core.handle(ev.Left(1.5, 1)) if isinstance(c, CancelHook)]
    core.handle(ev.HookDone(2.0, wake.job, ev.HookOutcome(ok=True, duration=1.0)))
    assert core.models["b"].state is ModelState.ACTIVE


async def test_a_client_that_leaves_a_cold_start_stops_the_server_it_was_starting(tmp_path):
    """A `cmd` server takes 30 s to load; its only client gives up after 1 s: the start is
    stopped (its process too), nothing counts as failed, and the next request starts it."""
    slow = f"{FAKE_VLLM} --boot-secs 30"
    path = write_config(tmp_path, cmd_block("a", slow, kind="vllm"))
    async with llmux_running(path) as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=chat("a"), timeout=1.0)
        with trio.fail_after(5):
            while (
                server.app.fleet.servers.running("a")
                or server.app.fleet.models["a"].state != "asleep"
            ):
                await trio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "llmux_switch_total", to="a", result="cancelled") == 1
        assert metric_value(metrics, "llmux_hook_failures_total", model="a", hook="wake") is None
        assert metric_value(metrics, "llmux_wake_seconds_count", model="a", level="cold") is None
