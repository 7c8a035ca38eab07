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
from llmux.core.depth import default_sleep_depth, depth_costs
from llmux.core.group import GroupCore
from llmux.core.host_ram import HostRam
from llmux.core.policy_answers import checked_depth
from llmux.core.states import HookName, ModelState
from llmux.policy import FifoPolicy, ModelView, Snapshot
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


def _snapshot_with(costs: dict[int, tuple[float, float]], demand: float = 0.0) -> Snapshot:
    sleeps = {("m", level): s for level, (s, _) in costs.items()}
    wakes = {("m", level): w for level, (_, w) in costs.items()}
    view = ModelView("m", ModelState.ACTIVE, 0, None, 0, sleep_level=None)
    return Snapshot(
        0.0, {"m": view}, "m", 0.0, False, {}, {}, sleep_costs=sleeps, wake_step_costs=wakes,
        demand={"m": demand},
    )  # fmt: skip


def test_auto_chooses_the_depth_that_causes_least_waiting():
    profile_a = {1: (10.57, 2.19), 2: (0.31, 6.53)}
    quiet, busy = 0.002, 0.05  # requests per second: one every ~8 minutes, one every 20 s
    # A switch keeps requests waiting through the sleep: level 2's short sleep wins.
    assert default_sleep_depth("m", 1, _snapshot_with(profile_a, quiet)) == 2
    # Nobody waits (an idle or admin sleep), the box is quiet and the model is wanted again:
    # the quick wake is worth the long sleep.
    assert default_sleep_depth("m", 0, _snapshot_with(profile_a, quiet)) == 1
    # The same sleep on a busy box: someone would arrive during its 10 s and wait for it.
    assert default_sleep_depth("m", 0, _snapshot_with(profile_a, busy)) == 2
    # A small model (level 1 cheap both ways) stays at level 1 even with requests waiting.
    small = {1: (0.2, 0.3), 2: (0.1, 0.9)}
    assert default_sleep_depth("m", 1, _snapshot_with(small, busy)) == 1
    # Not wanted lately: the next wake may be far off; nothing is worth holding host RAM for.
    assert default_sleep_depth("m", 0, _snapshot_with(profile_a, 0.0)) == 2


def test_auto_estimates_a_depth_it_has_not_measured_from_the_other():
    only_two = {2: (0.3, 6.5)}
    # Level 1's figures come from level 2's by the published ratios (its sleep ~34x level 2's,
    # its wake a third), not from a blind try.
    costs = depth_costs("m", _snapshot_with(only_two))
    assert costs[1].sleep == pytest.approx(0.3 * 10.57 / 0.31) and not costs[1].measured
    assert costs[1].wake == pytest.approx(6.5 * 2.19 / 6.53)
    assert default_sleep_depth("m", 2, _snapshot_with(only_two, 0.05)) == 2
    # Where the estimate wins, level 1 is chosen, and so measured.
    assert default_sleep_depth("m", 0, _snapshot_with(only_two, 0.002)) == 1


class AnswersDepth:
    def __init__(self, answer) -> None:
        self.answer = answer

    def decide(self, event, snapshot):
        return FifoPolicy().decide(event, snapshot)

    def sleep_depth(self, model, waiting, snapshot):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def test_a_policy_may_choose_the_depth_and_a_wrong_answer_falls_back():
    snapshot = _snapshot_with({1: (10.57, 2.19), 2: (0.31, 6.53)}, 0.05)
    assert checked_depth(AnswersDepth(1), "m", 3, snapshot) == (1, None)
    for wrong in (0, 3, True, "1", 1.0, None, SystemExit(2)):
        level, problem = checked_depth(AnswersDepth(wrong), "m", 3, snapshot)
        assert level == 2 and problem is not None, wrong  # the default's answer
    level, problem = checked_depth(AnswersDepth(UnshowableError(None)), "m", 3, snapshot)
    assert level == 2 and "repr fails" in problem.problem
    assert checked_depth(LookupFails(), "m", 3, snapshot) == (2, None), "taken as absent"


class UnshowableError(Exception):
    def __repr__(self):  # returns no string: repr() itself raises TypeError
        return self.args[0]


class LookupFails:
    def decide(self, event, snapshot):
        return FifoPolicy().decide(event, snapshot)

    @property
    def sleep_depth(self):
        raise RuntimeError("attribute boom")


def test_a_depth_policy_that_cannot_even_be_shown_does_not_stop_the_group():
    """A sleep_depth raising an exception whose repr fails: the sleep goes on at the default
    depth and the group serves on (it used to abort the switch and wait for a sleep never
    asked for)."""
    models = {
        n: {"port": 9000 + i, "kind": "vllm", "sleep_level": "auto"} for i, n in enumerate("ab")
    }
    config = parse_config({"models": models}, Path("d.toml")).group_config("default")
    core = GroupCore(config, AnswersDepth(UnshowableError(None)), SwitchCostTracker())
    for hook in [c for c in core.handle(ev.Started(0.0)) if isinstance(c, RunHook)]:
        core.handle(ev.HookDone(0.0, hook.job, ev.HookOutcome(ok=False)))
    sleeps = _serve_in_turn(core, "aba")
    assert [s.level for s in sleeps] == [2, 2]
    assert {m.name: m.state for m in core.models.values()}["a"] is ModelState.ACTIVE


def _vllm_core(ram_gb: float | None, **keys: object) -> GroupCore:
    models = {
        name: {
            k: v
            for k, v in {"port": 9000 + i, "kind": "vllm", "weights_gb": 10, **keys}.items()
            if v is not None
        }
        for i, name in enumerate("abc")
    }
    config = parse_config({"models": models}, Path("ram.toml")).group_config("default")
    core = GroupCore(config, FifoPolicy(), SwitchCostTracker(), HostRam(ram_gb))
    for hook in [c for c in core.handle(ev.Started(0.0)) if isinstance(c, RunHook)]:
        core.handle(ev.HookDone(0.0, hook.job, ev.HookOutcome(ok=False)))
    return core


def _serve_in_turn(core: GroupCore, models: str) -> list[RunHook]:
    """Ask for each model in turn, every hook succeeding; the sleeps asked for."""
    sleeps, now = [], 1.0
    for rid, name in enumerate(models, 1):
        pending = [c for c in core.handle(ev.Arrived(now, rid, name)) if isinstance(c, RunHook)]
        while pending:
            hook = pending.pop(0)
            sleeps += [hook] if hook.hook is HookName.SLEEP else []
            now += 1.0
            done = core.handle(ev.HookDone(now, hook.job, ev.HookOutcome(ok=True, duration=1)))
            pending += [c for c in done if isinstance(c, RunHook)]
        core.handle(ev.Finished(now, rid))
    return sleeps


def test_a_model_whose_weights_are_unknown_is_taken_for_the_largest_known():
    core = _vllm_core(ram_gb=15, weights_gb=None)
    core.handle(ev.Arrived(1.0, 1, "a"))
    record = core.models["a"]
    assert core.weights_of(record) == 0, "nothing known yet"
    record.host_gb = 12.0  # a's level-1 sleep was measured
    assert core.weights_of(core.models["b"]) == 12.0
    # Across groups too: they share one machine's RAM.
    other = GroupCore(core.config, FifoPolicy(), SwitchCostTracker(), core.host_ram)
    assert other.weights_of(other.models["c"]) == 12.0
    sleeps = _serve_in_turn(_vllm_core(ram_gb=15, weights_gb=None), "abc")
    assert [s.level for s in sleeps] == [1, 1], "no figure at all: nothing to hold them to"


def test_a_reload_of_sleep_level_alone_keeps_what_the_sleeper_holds():
    """The server keeps running asleep as it slept (a new sleep_level changes no launch), so
    its level and its weights in host RAM are still counted; a new port is another server."""
    core = _vllm_core(ram_gb=15)
    _serve_in_turn(core, "ab")
    assert (core.models["a"].slept_level, core.host_ram.held_gb()) == (1, 10)

    def reload(**keys: object) -> None:
        models = {
            name: {"port": 9000 + i, "kind": "vllm", "weights_gb": 10}
            for i, name in enumerate("abc")
        }
        models["a"].update(keys)
        config = parse_config({"models": models}, Path("ram.toml")).group_config("default")
        core.handle(ev.Reloaded(50.0, config))

    reload(sleep_level=2)
    assert (core.models["a"].slept_level, core.host_ram.held_gb()) == (1, 10)
    reload(sleep_level=2, port=9100)
    assert (core.models["a"].slept_level, core.host_ram.held_gb()) == (None, 0)


def test_a_level_1_sleep_that_would_not_fit_in_host_ram_sleeps_at_level_2():
    core = _vllm_core(ram_gb=15)
    sleeps = _serve_in_turn(core, "abc")
    assert [(s.model, s.level) for s in sleeps] == [("a", 1), ("b", 2)], "10 + 10 > 15 GiB"
    assert core.host_ram.held_gb() == 10
    unlimited = _serve_in_turn(_vllm_core(ram_gb=None), "abc")
    assert [s.level for s in unlimited] == [1, 1]


async def test_host_ram_is_measured_and_a_sleep_that_would_not_fit_goes_deeper(tmp_path, caplog):
    """Two vLLM fakes llmux starts, each filling 64 MiB of host RAM at a level-1 sleep, no
    `weights_gb`, and room for one sleeper's weights: llmux measures a's level-1 sleep (the
    server's resident memory before and after), takes b, not measured yet, for as large, and
    so puts b to sleep at level 2 while a sleeps at level 1; b's wake then reloads its weights
    (no garbage answers)."""
    fat = f"{FAKE_VLLM} --weights-mb 64"
    models = cmd_block("a", fat, kind="vllm") + cmd_block("b", fat, kind="vllm")
    path = write_config(tmp_path, models, policy={"name": "fifo"}, top="[machine]\nram_gb = 0.1\n")
    async with llmux_running(path) as (server, client):
        for model in ("a", "b", "a", "b"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
            assert "garbage" not in response.text
        metrics = (await client.get("/metrics")).text
        status = (await client.get("/llmux/status")).json()
        states = {
            name: httpx.get(m.config.base_url + "/fake/state").json()
            for name, m in server.app.fleet.models.items()
        }
        # A reload that lowers ram_gb under what a holds: said, nothing evicted.
        path.write_text(path.read_text().replace("ram_gb = 0.1", "ram_gb = 0.01"))
        assert await server.reload()

    def sleeps(model: str, level: str) -> float | None:
        return metric_value(metrics, "llmux_sleep_seconds_count", model=model, level=level)

    assert sleeps("a", "1") == 2 and sleeps("a", "2") is None
    assert sleeps("b", "2") == 1 and sleeps("b", "1") is None, "b's weights taken as a's"
    over = [r for r in caplog.records if getattr(r, "event", None) == "host_ram_over"]
    assert len(over) == 1 and "more than [machine] ram_gb = 0.01" in over[0].getMessage()
    assert 0.05 < status["machine"]["sleeping_weights_gb"] < 0.1  # a's 64 MiB, measured
    assert metric_value(metrics, "llmux_host_ram_capacity_bytes") == pytest.approx(0.1 * 2**30)
    assert all(state["garbage_answers"] == 0 for state in states.values())


async def test_auto_sleeps_a_switch_victim_at_level_2_and_wakes_it_the_level_2_way(tmp_path):
    """`sleep_level = "auto"` through the live proxy: a switch's victim, with a request waiting
    for the target, sleeps at level 2 (the short sleep: level 1's would keep that request
    waiting ~10 s by the prior), and its next wake reloads its weights."""
    models = cmd_block("a", FAKE_VLLM, kind="vllm", sleep_level="auto") + cmd_block(
        "b", FAKE_VLLM, kind="vllm", sleep_level="auto"
    )
    path = write_config(tmp_path, models, policy={"name": "fifo"})
    async with llmux_running(path) as (server, client):
        for model in ("a", "b", "a"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200 and "garbage" not in response.text
        status = (await client.get("/llmux/status")).json()
        metrics = (await client.get("/metrics")).text
        states = {
            name: httpx.get(m.config.base_url + "/fake/state").json()
            for name, m in server.app.fleet.models.items()
        }
    assert status["models"]["b"]["slept_level"] == 2
    assert metric_value(metrics, "llmux_sleep_seconds_count", model="a", level="2") == 1
    assert metric_value(metrics, "llmux_wake_seconds_count", model="a", level="2") == 1
    assert all(state["garbage_answers"] == 0 for state in states.values())
